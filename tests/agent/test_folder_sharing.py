"""Folders shared by choice, with three real agents on loopback (fresh installs: they pair inside
the pairing window with no command).

A shares folder `photos` with B only. C, trusted like B, claims a folder with the same id: it must
never receive a record or a byte of it, while B syncs it. B also offers folder `docs`, which A
does not have: A keeps it as an offer, and `tofu-agent folder accept docs` starts syncing it in
the running agent. Waits are conditions with deadlines, never sleeps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.agents import AgentProc, cli
from testkit.homes import new_home, write_config
from testkit.wait import wait_for

pytestmark = pytest.mark.slow

SECRET = b"only for B " * 5000


def _folder(st: dict[str, Any] | None, folder_id: str) -> dict[str, Any] | None:
    return next((f for f in (st or {}).get("folders", []) if f["id"] == folder_id), None)


def _id(home: Path) -> str:
    r = cli(home, "id", "--json")
    assert r.returncode == 0, r.stderr
    device_id: str = json.loads(r.stdout)["device_id"]
    return device_id


@pytest.fixture
def three() -> Iterator[tuple[AgentProc, AgentProc, AgentProc]]:
    homes = [new_home("tf-"), new_home("tf-"), new_home("tf-")]
    ids = [_id(h) for h in homes]
    write_config(
        homes[0],
        "# A: photos for B only\n"
        f'[[folder]]\nid = "photos"\npath = "{homes[0] / "photos"}"\ndevices = ["{ids[1]}"]  # B\n',
    )
    write_config(
        homes[1],
        f'[[folder]]\nid = "photos"\npath = "{homes[1] / "photos"}"\n'
        f'[[folder]]\nid = "docs"\npath = "{homes[1] / "docs"}"\ndevices = "household"\n',
    )
    write_config(homes[2], f'[[folder]]\nid = "photos"\npath = "{homes[2] / "photos"}"\n')
    (homes[0] / "photos").mkdir()
    (homes[0] / "photos" / "secret.jpg").write_bytes(SECRET)
    (homes[1] / "docs").mkdir()
    (homes[1] / "docs" / "notes.txt").write_bytes(b"docs from B")
    a, b, c = AgentProc(homes[0], "alpha"), AgentProc(homes[1], "beta"), AgentProc(homes[2], "gamma")
    try:
        a.start()
        b.start(peers=[a])
        c.start(peers=[a])
        yield a, b, c
    finally:
        for p in (a, b, c):
            p.kill()


def test_a_folder_shared_with_one_device_never_reaches_another(three: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    a, b, c = three
    ida, idb, idc = (_id(p.home) for p in three)
    for other in (idb, idc):
        a.wait_peer(other, connected=True, trust="tofu", timeout=30)

    # B gets the file
    got = b.home / "photos" / "secret.jpg"
    wait_for(lambda: got.exists() and got.read_bytes() == SECRET, 30, "B to receive photos/secret.jpg")

    # C's claim of `photos` is an offer on A, and its hello was all that happened
    def offered() -> list[dict[str, Any]]:
        st = a.status() or {}
        return [o for o in st.get("offered_folders", []) if o["id"] == "photos" and o["device_id"] == idc]

    wait_for(offered, 20, "A to record C's claim of photos as an offer")

    # B's `docs` is an offer too; accepting it starts it in the running agent
    wait_for(lambda: any(o["id"] == "docs" for o in (a.status() or {}).get("offered_folders", [])), 20, "docs offer")
    listed = cli(a.home, "folders")
    assert "docs" in listed.stdout and "photos" in listed.stdout, listed.stdout
    r = cli(a.home, "folder", "accept", "docs")
    assert r.returncode == 0, r.stderr
    assert "RESTART" not in r.stdout and "applied" in r.stdout, r.stdout
    config_text = (a.home / "config" / "config.toml").read_text()
    assert "# A: photos for B only" in config_text and "# B" in config_text  # comments kept
    notes = a.home / "docs" / "notes.txt"
    wait_for(lambda: notes.exists() and notes.read_bytes() == b"docs from B", 30, "A to sync the accepted docs")
    assert not any(o["id"] == "docs" for o in (a.status() or {}).get("offered_folders", []))

    # by now C has had every chance: nothing of `photos` reached it
    assert not (c.home / "photos" / "secret.jpg").exists()
    assert [p.name for p in (c.home / "photos").iterdir() if not p.name.startswith(".tofu")] == []
    c_photos = _folder(c.status(), "photos")
    assert c_photos is not None and c_photos["files"] == 0 and c_photos["need_files"] == 0
    a_photos = _folder(a.status(), "photos")
    assert a_photos is not None
    assert [p["device_id"] for p in a_photos["peers"]] == [idb], "A's photos session is with B only"
    assert a_photos["devices"] == [idb]
    for p in (a, b, c):
        assert "closing connection" not in p.log(), p.log()
    assert ida not in {o["device_id"] for o in (a.status() or {}).get("offered_folders", [])}
