"""The daemon's `AgentBackend` for kept versions, restore, override, revert and pausing: each reaches
the folders' engines (or config.toml) as the control socket and the CLI do."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from agent.app.ui_backend import AgentBackend
from agent.errors import UserError
from agent.host.paths import Paths
from agent.trust.store import TrustStore
from agent.ui.backend import ChangeFeed, ThisDevice

pytestmark = pytest.mark.anyio

KEPT = {"folder": "docs", "path": ".tofu-versions/a.txt~x", "name": "a.txt", "kept_at": 1_765_103_405.5, "size": 3}


class Engines:
    """A stand-in for `SyncService`'s requests of a person; it records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def versions(self, folder_id: str | None, name: str = "") -> list[dict[str, Any]]:
        self.calls.append(("versions", folder_id, name))
        return [KEPT | {"by": ""}]

    async def restore(self, folder_id: str, name: str, at: float | None) -> dict[str, Any]:
        self.calls.append(("restore", folder_id, name, at))
        if name != "a.txt":
            raise UserError(f"no kept version of {name!r}")
        return KEPT | {"by": ""}

    async def override(self, folder_id: str) -> dict[str, Any]:
        self.calls.append(("override", folder_id))
        return {"folder": folder_id, "overridden": 4}

    async def revert(self, folder_id: str) -> dict[str, Any]:
        self.calls.append(("revert", folder_id))
        return {"folder": folder_id, "reverted": 2}


class Daemon:
    """What `AgentBackend` is built from: a few of the daemon's own methods."""

    def __init__(self, tmp: Path, engines: Engines | None) -> None:
        self.sync = engines
        self.paths = Paths(tmp / "config", tmp / "data", tmp / "run", home=tmp)
        self.applied = 0

    async def folders_changed(self) -> dict[str, Any]:
        self.applied += 1
        return {"changed": [], "added": [], "restart": []}

    async def status(self) -> dict[str, Any]:
        return {}

    async def rotate_key(self) -> dict[str, Any]:
        return {}


def make(daemon: Daemon) -> AgentBackend:
    return AgentBackend(
        store=cast(TrustStore, None),
        feed=ChangeFeed(),
        this=lambda: ThisDevice("A" * 32, "me", "0" * 64),
        status=daemon.status,
        trust_changed=lambda device_id, record: None,
        set_window=lambda seconds: {},
        rotate_key=daemon.rotate_key,
        folders_changed=daemon.folders_changed,
        paths=daemon.paths,
        sync=lambda: daemon.sync,
    )


async def test_versions_restore_override_revert_reach_the_engines(tmp_path: Path) -> None:
    engines = Engines()
    backend = make(Daemon(tmp_path, engines))
    assert await backend.versions("docs") == [KEPT | {"by": ""}]
    before = backend.feed.version
    message = await backend.act("restore", None, folder="docs", path="a.txt", at=repr(KEPT["kept_at"]))
    assert "restored a.txt in docs as it was before 2025-12-07 10:30:05 UTC" in message
    assert backend.feed.version > before
    assert "4 names" in await backend.act("folder_override", None, folder="docs")
    assert "2 local changes undone" in await backend.act("folder_revert", None, folder="docs")
    assert engines.calls == [
        ("versions", "docs", ""),
        ("restore", "docs", "a.txt", KEPT["kept_at"]),
        ("override", "docs"),
        ("revert", "docs"),
    ]


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ({"folder": "docs", "path": "b.txt", "at": "1"}, "no kept version of 'b.txt'"),
        ({"folder": "docs", "path": "a.txt", "at": "soon"}, "not a time"),
        ({"folder": "docs", "path": "a.txt", "at": "nan"}, "not a time"),
        ({"folder": "docs", "path": "/"}, "needs the path of a file"),
        ({"path": "a.txt"}, "needs a folder"),
    ],
)
async def test_a_bad_restore_is_refused_with_a_reason(tmp_path: Path, args: dict[str, str], why: str) -> None:
    backend = make(Daemon(tmp_path, Engines()))
    with pytest.raises(UserError, match=why):
        await backend.act("restore", None, **args)


async def test_an_agent_without_folders_says_so(tmp_path: Path) -> None:
    backend = make(Daemon(tmp_path, None))
    with pytest.raises(UserError, match="syncs no folders"):
        await backend.versions(None)
    with pytest.raises(UserError, match="syncs no folders"):
        await backend.act("folder_override", None, folder="docs")


async def test_pause_and_resume_edit_the_config_and_apply_it(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, Engines())
    daemon.paths.config_dir.mkdir()
    daemon.paths.config_file.write_text(f'[[folder]]\nid = "docs"\npath = "{tmp_path / "docs"}"\n')
    backend = make(daemon)
    assert "paused: no data moves" in await backend.act("folder_pause", None, folder="docs")
    assert "paused = true" in daemon.paths.config_file.read_text() and daemon.applied == 1
    assert "syncing again" in await backend.act("folder_resume", None, folder="docs")
    assert "paused" not in daemon.paths.config_file.read_text() and daemon.applied == 2
    with pytest.raises(UserError, match="no folder 'photos'"):
        await backend.act("folder_pause", None, folder="photos")
