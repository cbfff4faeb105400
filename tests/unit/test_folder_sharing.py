"""Folders shared by choice, at the sync shell: a trusted peer that claims a folder id it was not
given gets no index record and no block, whatever it sends; its hello is kept as an offer.

These drive the real `SyncService` message path (`peer_opened`, `message`, the folder's `_work`
batch and the block server) with stand-in links whose send queues the test reads, as
tests/unit/test_sync_clock.py drives the shell.
"""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agent.config import Config, FolderConfig, from_mapping, resolve_devices
from agent.errors import ConfigError, RemoteProtocolError
from agent.host.paths import Paths
from agent.identity.keys import Identity
from agent.net.link import PeerLink
from agent.sync.messages import BlockError, FolderHello, Index, IndexUpdate, Progress, Request, Response, SyncMessage
from agent.sync.offers import MAX_OFFERS, load_offers, offers_path
from agent.sync.service import SyncService
from agent.sync.state import _Folder, _Link
from agent.trust.model import DeviceRecord, TrustLevel
from testkit.engines import A_ID, B_ID, C_ID, wire, write

DATA = b"holiday photo " * 1000
SHA = hashlib.sha256(DATA).digest()  # its one block


class FakeLink:
    """What the service reads of a PeerLink."""

    def __init__(self, device_id: str, name: str) -> None:
        self.device_id = device_id
        self.peer = SimpleNamespace(name=name, device_id=device_id)


class NoTasks:
    """Stands in for the service's task group: send loops are not run, the test reads the queues."""

    def start_soon(self, *args: Any) -> None:
        pass


def _service(tmp: Path, devices: tuple[str, ...] | None) -> tuple[SyncService, _Folder]:
    home = tmp / "a"
    root = tmp / "photos"
    root.mkdir()
    write(root / "secret.jpg", DATA)
    paths = Paths(config_dir=home / "config", data_dir=home / "data", runtime_dir=home / "run", home=home)
    paths.data_dir.mkdir(parents=True)
    config = Config(folders=(FolderConfig("photos", root, devices),))
    svc = SyncService(paths, config, cast(Identity, SimpleNamespace(device_id=A_ID)))
    svc._open_folders()
    svc._tg = cast(Any, NoTasks())
    f = svc.folders[0]
    svc._start_engine(f)
    return svc, f


def _step(svc: SyncService, f: _Folder) -> list[tuple[_Link, SyncMessage]]:
    """One batch of the folder's worker, as `_run_folder` runs it; what it routes, pushed."""
    items = list(f.inbox)
    f.inbox.clear()
    out, errors = svc._work(f, items, set(), False)
    assert not errors
    for ls, msg in out:
        ls.push(msg)
    return out


def _sent(ls: _Link) -> list[SyncMessage]:
    return [m for _, m in ls.queue]


async def _open(svc: SyncService, device_id: str, name: str) -> tuple[FakeLink, _Link]:
    link = FakeLink(device_id, name)
    await svc.peer_opened(cast(PeerLink, link))
    return link, svc._by_link[cast(PeerLink, link)]


@pytest.mark.anyio
async def test_a_peer_claiming_a_folder_not_shared_with_it_gets_no_record_and_no_block(tmp_path: Path) -> None:
    svc, f = _service(tmp_path, (B_ID,))
    try:
        link_b, b = await _open(svc, B_ID, "bob")
        link_c, c = await _open(svc, C_ID, "carol")
        assert b.shared == {"photos"} and c.shared == frozenset()
        assert [(kind, ls.device_id) for kind, ls, _ in f.inbox] == [("open", B_ID)]

        # both say hello for `photos`; C's is an offer and never reaches the engine
        hello = FolderHello("photos", bytes(16), b"", 0)
        await svc.message(cast(PeerLink, link_b), wire(hello))
        await svc.message(cast(PeerLink, link_c), wire(hello))
        out = _step(svc, f)
        assert {ls.device_id for ls, _ in out} == {B_ID}
        assert any(isinstance(m, Index) and m.files for m in _sent(b)), "B gets the index"
        assert [(o.folder, o.device_id, o.name) for o in svc.offers.items] == [("photos", C_ID, "carol")]
        assert svc.offered() == [{"id": "photos", "device_id": C_ID, "name": "carol", "first_seen": pytest.approx(
            svc.offers.items[0].first_seen)}]  # fmt: skip

        # C asks for the block anyway, with the right hash: answered INVALID, never served
        req = Request("photos", "secret.jpg", 0, len(DATA), SHA, 7)
        await svc.message(cast(PeerLink, link_c), wire(req))
        assert _sent(c) == [Response(7, b"", BlockError.INVALID)]
        assert all(folder is None for folder, _ in c.queue)
        # and B gets it served from the folder
        await svc.message(cast(PeerLink, link_b), wire(Request("photos", "secret.jpg", 0, len(DATA), SHA, 8)))
        folder, queued = b.queue[-1]
        assert folder is f and isinstance(queued, Request)
        assert f.server.serve([queued])[0] == Response(8, DATA, BlockError.NONE)

        # an index or progress from C for `photos` is refused as for a folder we do not have
        for bad in (IndexUpdate("photos", ()), Progress("photos", 0, 0)):
            with pytest.raises(RemoteProtocolError):
                await svc.message(cast(PeerLink, link_c), wire(bad))
        # nothing the engine makes for the folder is pushed to C, whoever addresses it
        c.push(Index("photos", ()))
        c.push(Progress("photos", 1, 1))
        assert _sent(c) == [Response(7, b"", BlockError.INVALID)]
        _step(svc, f)
        assert not any(getattr(m, "folder", None) == "photos" for m in _sent(c))
    finally:
        svc._close_folder(f)


@pytest.mark.anyio
async def test_sharing_changes_apply_to_open_links_at_once(tmp_path: Path) -> None:
    svc, f = _service(tmp_path, (B_ID,))
    try:
        link_c, c = await _open(svc, C_ID, "carol")
        await svc.message(cast(PeerLink, link_c), wire(FolderHello("photos", bytes(16), b"", 0)))
        _step(svc, f)
        assert not c.queue

        # share with C: its session opens with the hello it sent, its offer is settled
        cfg = Config(folders=(FolderConfig("photos", f.config.path, (B_ID, C_ID)),))
        result = await svc.apply_folders(cfg)
        assert result == {"changed": ["photos"], "added": [], "restart": []}
        assert c.shared == {"photos"} and not svc.offers.items
        _step(svc, f)
        assert any(isinstance(m, Index) and m.files for m in _sent(c))

        # unshare: queued records and block requests of the folder go, the session closes
        c.queue.clear()
        await svc.message(cast(PeerLink, link_c), wire(Request("photos", "secret.jpg", 0, len(DATA), SHA, 9)))
        c.push(Progress("photos", 0, 0))
        await svc.apply_folders(Config(folders=(FolderConfig("photos", f.config.path, (B_ID,)),)))
        assert c.shared == frozenset()
        assert _sent(c) == [Response(9, b"", BlockError.INVALID)]
        _step(svc, f)
        assert C_ID not in f.engine.peers
        # what C still sends about it on this link is dropped, not used
        await svc.message(cast(PeerLink, link_c), wire(IndexUpdate("photos", ())))
        assert not f.inbox
    finally:
        svc._close_folder(f)


def test_offers_are_bounded_and_private(tmp_path: Path) -> None:
    from agent.sync.offers import Offers

    path = offers_path(tmp_path)
    offers = Offers(path)
    for i in range(MAX_OFFERS + 10):
        assert offers.add(f"f{i}", C_ID, "carol", float(i))
    assert not offers.add("f70", C_ID, "carol", 999.0)
    kept = load_offers(path)
    assert len(kept) == MAX_OFFERS and kept[0].folder == "f10"  # the oldest went first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert isinstance(json.loads(path.read_text()), list)


def _record(device_id: str, name: str, trust: TrustLevel = TrustLevel.TOFU) -> DeviceRecord:
    return DeviceRecord(device_id=device_id, name=name, fingerprint="ab" * 32, trust=trust, first_seen=0.0,
                        last_seen=0.0)  # fmt: skip


def test_devices_config_and_resolution(tmp_path: Path) -> None:
    def folders(devices: object) -> tuple[FolderConfig, ...]:
        data = {"folder": [{"id": "photos", "path": "p", "devices": devices}, {"id": "d", "path": "q"}]}
        return from_mapping(data, tmp_path, tmp_path / "f").folders

    assert folders("household")[0].devices is None
    assert folders(["laptop", B_ID, "laptop"])[0].devices == ("laptop", B_ID)
    assert folders([])[0].devices == ()
    assert folders([B_ID])[1].devices is None  # no `devices` key: household
    assert from_mapping({}, tmp_path, tmp_path / "f").folders[0].devices is None
    for bad in ("everyone", [1], [""], "x" * 65, [B_ID, None]):
        with pytest.raises(ConfigError):
            folders(bad)

    records = [
        _record(A_ID, "laptop"),
        _record(B_ID, "phone"),
        _record("B" * 8 + "C" * 24, "phone"),
        _record(C_ID, "tv", TrustLevel.PENDING),
    ]
    assert resolve_devices(("laptop",), records) == {A_ID}
    assert resolve_devices(("AAAAAAAA",), records) == {A_ID}  # a unique prefix of 8
    assert resolve_devices(("AAAAAAA",), records) == frozenset()  # too short
    assert resolve_devices(("phone", "BBBBBBBB"), records) == frozenset()  # ambiguous: nobody
    assert resolve_devices(("tv",), records) == frozenset()  # not trusted
    assert resolve_devices((C_ID,), records) == {C_ID}  # an id is an id
