"""Which folders each peer link is given, and the folders peers offer us (plain functions).

A folder is shared with the devices its config lists (`devices`; None is every trusted device),
resolved against the trust store when a link opens (the daemon's `resolve_devices`). A link
carries the set of folder ids shared with its peer (`_Link.shared`): only those get "open" (so
only their engines ever address that peer), `_Link.push` drops any message naming another
folder, and the service handles a peer's FolderHello, Index, Progress or Request for a folder
outside the set exactly as one for a folder we do not have. Its FolderHello becomes an offer
(`agent/sync/offers.py`) and is kept on the link, so sharing the folder later (the service's
`apply_folders`, through `reshare`) opens that folder's session at once without a reconnect.

Everything here gets what it reads as arguments: the link, the folder configs, the service's
folders by id, its `Offers` and its device resolver.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from agent.config import FolderConfig
from agent.sync.messages import BlockError, FolderHello, Request, Response, SyncMessage
from agent.sync.offers import Offers
from agent.sync.state import _Folder, _Link

log = logging.getLogger(__name__)

MAX_HELLOS_PER_LINK = 64  # FolderHellos of folders we do not share, kept per link (and new offers per link)

# Which device ids a folder's `devices` entries name (ids, prefixes, names), against the trust
# store now; called in a worker thread. Without one, only exact device ids match.
DeviceResolver = Callable[[tuple[str, ...]], frozenset[str]]


def shared_with(
    device_id: str, folders: Sequence[FolderConfig], resolve_devices: DeviceResolver,
    paused_devices: frozenset[str] = frozenset(),
) -> frozenset[str]:  # fmt: skip
    """The ids of `folders` shared with `device_id` (in a worker thread: may read the trust store).
    A paused folder, or a paused device, shares nothing: no data moves, the link and trust stay."""
    shared: set[str] = set()
    resolved: dict[tuple[str, ...], frozenset[str]] = {}
    if device_id in paused_devices:
        return frozenset()
    for cfg in folders:
        if cfg.paused:
            continue
        if cfg.devices is None:
            shared.add(cfg.id)  # household: every trusted device, and only those get a link
            continue
        if cfg.devices not in resolved:
            try:
                resolved[cfg.devices] = resolve_devices(cfg.devices)
            except Exception:
                log.exception("folder %r: cannot resolve its devices; not shared this time", cfg.id)
                resolved[cfg.devices] = frozenset()
        if device_id in resolved[cfg.devices]:
            shared.add(cfg.id)
    return frozenset(shared)


def reshare(ls: _Link, shared: frozenset[str], folders: Mapping[str, _Folder]) -> None:
    """Close the sessions of folders no longer shared with `ls`'s peer, open the new ones
    (`folders`: the service's folders by id)."""
    old, ls.shared = ls.shared, shared
    for fid in old - shared:
        ls.was_shared.add(fid)
        # nothing more of it leaves: queued records go, queued block requests are refused
        kept: deque[tuple[_Folder | None, SyncMessage]] = deque()
        for folder, msg in ls.queue:
            if folder is not None and isinstance(msg, Request) and msg.folder == fid:
                kept.append((None, Response(msg.request_id, b"", BlockError.INVALID)))
            elif getattr(msg, "folder", None) != fid:
                kept.append((folder, msg))
        ls.queue = kept
        if fid in folders:
            folders[fid].put("close", ls)
        log.info("folder %r is no longer shared with %s (%s..)", fid, ls.name, ls.device_id[:8])
    for fid in shared - old:
        ls.was_shared.discard(fid)
        f = folders.get(fid)
        if f is None:
            continue
        f.put("open", ls)
        hello = ls.hellos.pop(fid, None)
        if hello is not None:  # what it said when the link opened: the session starts now
            f.put("msg", ls, hello, 64)
        log.info("folder %r is now shared with %s (%s..)", fid, ls.name, ls.device_id[:8])
    ls.wake.set()


def satisfied_offers(
    offers: Offers, configs: Sequence[FolderConfig], resolve_devices: DeviceResolver
) -> set[tuple[str, str]]:
    """The offers whose folder we now have and share with the device that offered it."""
    by_id = {c.id: c for c in configs}
    done: set[tuple[str, str]] = set()
    for o in list(offers.items):
        cfg = by_id.get(o.folder)
        if cfg is not None and o.folder in shared_with(o.device_id, [cfg], resolve_devices):
            done.add((o.folder, o.device_id))
    return done


def keep_offer(ls: _Link, hello: FolderHello, offers: Offers, folders: Mapping[str, _Folder]) -> None:
    """`ls`'s peer said hello for a folder not shared with it: keep it as an offer (`folders`:
    the service's folders by id, for the log line)."""
    if hello.folder in ls.hellos or len(ls.hellos) < MAX_HELLOS_PER_LINK:
        ls.hellos[hello.folder] = hello
    if ls.new_offers >= MAX_HELLOS_PER_LINK:
        return
    if offers.add(hello.folder, ls.device_id, ls.name, time.time()):
        ls.new_offers += 1
        have = "have but do not share with it" if hello.folder in folders else "do not have"
        log.info("%s (%s..) offers folder %r, which we %s; accept it with: tofu-agent folder accept %s",
                 ls.name, ls.device_id[:8], hello.folder, have, hello.folder)  # fmt: skip
