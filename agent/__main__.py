"""`python -m agent` is the same as the `tofu-agent` command."""

from __future__ import annotations

import sys

from agent.cli.entry import main

sys.exit(main())
