"""A home in a box: real agents, a seeded random schedule of file operations and faults on all of
them at once, then a quiet phase and a checker over the recorded history (issue 21).

    scripts/soak --minutes 2 --agents 3 --seed 1234      # one run
    scripts/soak --minutes 30 --agents 5 --seeds 4       # four seeds in a row
    scripts/soak --netns --agents 3 --minutes 2          # namespaces over a bridge, mDNS, link cuts

`runner.py` starts the agents and drives the schedule, `history.py` is what it records,
`checker.py` judges the end state against the history, `test_soak.py` is the short CI version.
"""
