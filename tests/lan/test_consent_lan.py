"""A stranger on the home network gets nothing until a person accepts it (issue 15, hostile).

Real agents in network namespaces that find each other over mDNS. A already trusts a household
(so its pairing window is closed, as on any day after the first) and holds a file in its default
folder. A stranger with a fresh identity appears on the LAN and claims folder `default`. It must
get no index record and no byte; A lists it as pending; after `trust accept` it syncs.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.host.paths import resolve_paths
from agent.sync.service import index_path
from testkit.agents import cli, fill_trust_store
from testkit.lan import LanAgent, cleanup_all
from testkit.netns import Lan
from testkit.wait import wait_for

pytestmark = [pytest.mark.lan, pytest.mark.slow, pytest.mark.timeout(180)]

SECRET = b"the household's photos" * 1000


def _remote_records(home: Path) -> int:
    """Index records the agent at `home` holds from any peer (0 if it has no index yet)."""
    db = Path(index_path(resolve_paths(home), "default"))
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        count: int = conn.execute("SELECT count(*) FROM files WHERE device != ''").fetchone()[0]
    return count


def test_a_stranger_claiming_the_default_folder_gets_nothing_until_accepted() -> None:
    with Lan(2) as lan:
        a = LanAgent(lan, 0, "desktop")
        stranger = LanAgent(lan, 1, "visitor")
        try:
            fill_trust_store(a.home, 2)  # an existing household: the window stays closed
            (a.home / "f").mkdir()
            (a.home / "f" / "secret.bin").write_bytes(SECRET)
            a.start("--folder", str(a.home / "f"))
            st = a.status_fast()
            assert st is not None and st["pairing_window"]["open"] is False
            stranger.start("--folder", str(stranger.home / "f"))

            a.wait_peer(stranger.device_id, timeout=30, trust="pending")
            stranger.wait_peer(a.device_id, timeout=30, refused_us="waiting for approval on desktop")
            pending = cli(a.home, "pending", "--json")
            assert stranger.device_id in pending.stdout and stranger.fingerprint in pending.stdout
            # it asked (and keeps asking every second); it got no index record and no byte
            assert _remote_records(stranger.home) == 0
            folder = (stranger.status_fast() or {}).get("folders", [{}])[0]
            assert folder.get("bytes_received", 0) == 0 and folder.get("files", 0) == 0
            assert not (stranger.home / "f" / "secret.bin").exists()

            assert cli(a.home, "trust", "accept", stranger.device_id).returncode == 0
            wait_for(
                lambda: (
                    (stranger.home / "f" / "secret.bin").exists()
                    and (stranger.home / "f" / "secret.bin").read_bytes() == SECRET
                ),
                30,
                "the accepted device to receive the folder",
            )
        except AssertionError:
            for x in (a, stranger):
                print(f"--- {x.name} ---\n{x.log()[-4000:]}")
            raise
        finally:
            cleanup_all([a, stranger])
