"""A person's requests to a folder's engine: list and restore kept versions, override, revert (I/O shell).

Each runs in a worker thread under the folder's lock, as the shell's own batches do, and what the
engine returns is routed to the folder's current links there (the worker's view) and then sent.
An engine's refusal (`LookupError`: no such version, not that folder type) or a disk error
becomes a `UserError` with the message for the person.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread

from agent.errors import UserError
from agent.sync.clock import Now
from agent.sync.engine import Outgoing, SyncEngine
from agent.sync.messages import SyncMessage
from agent.sync.state import _Folder, _Link

T = TypeVar("T")
Publish = Callable[[_Folder, Now], list[Outgoing]]  # the shell's status publication, under the lock
Clock = Callable[[], Now]  # the shell's clock (the one its batches read)


async def versions(folders: list[_Folder], name: str, publish: Publish, clock: Clock) -> list[dict[str, Any]]:
    """The kept versions of `name` in `folders`, newest first within each folder."""
    result: list[dict[str, Any]] = []
    for f in folders:

        def listing(eng: SyncEngine, now: Now, f: _Folder = f) -> tuple[list[dict[str, Any]], list[Outgoing]]:
            return [{"folder": f.config.id, **dataclasses.asdict(k)} for k in eng.list_versions(name)], []

        result.extend(await engine_op(f, listing, publish, clock))
    return result


async def restore(f: _Folder, name: str, at: float | None, publish: Publish, clock: Clock) -> dict[str, Any]:
    """Put the version of `name` kept at or before `at` (None: the newest) back as a local change."""

    def op(eng: SyncEngine, now: Now) -> tuple[dict[str, Any], list[Outgoing]]:
        kept, out = eng.restore(name, at, now)
        return {"folder": f.config.id, **dataclasses.asdict(kept)}, out

    return await engine_op(f, op, publish, clock)


async def override(f: _Folder, publish: Publish, clock: Clock) -> dict[str, Any]:
    """A send-only folder's state wins on every peer."""
    differs = f.snapshot.remote_differs
    await engine_op(f, lambda eng, now: (None, eng.override(now)), publish, clock)
    return {"folder": f.config.id, "overridden": differs}


async def revert(f: _Folder, publish: Publish, clock: Clock) -> dict[str, Any]:
    """A receive-only folder's local changes are undone (kept as versions)."""
    changed = f.snapshot.locally_changed
    await engine_op(f, lambda eng, now: (None, eng.revert(now)), publish, clock)
    return {"folder": f.config.id, "reverted": changed}


async def engine_op(
    f: _Folder, op: Callable[[SyncEngine, Now], tuple[T, list[Outgoing]]], publish: Publish, clock: Clock
) -> T:
    """Run `op` on the folder's engine in a worker thread, under its lock; send what it returns.

    :raises UserError: the engine refused, or the disk failed.
    """
    await f.started.wait()

    def run() -> tuple[T, list[tuple[_Link, SyncMessage]]]:
        with f.lock:
            now = clock()
            result, out = op(f.engine, now)
            # resolved under the lock, as the shell's batches do: `current` is the worker's view
            routed = [(ls, msg) for peer, msg in out + publish(f, now) if (ls := f.current.get(peer))]
            return result, routed

    try:
        result, routed = await anyio.to_thread.run_sync(run)
    except LookupError as exc:
        raise UserError(str(exc.args[0]) if exc.args else str(exc)) from None
    except OSError as exc:
        raise UserError(f"folder {f.config.id!r}: {exc}") from None
    for ls, msg in routed:
        ls.push(msg)
    f.wake.set()
    return result
