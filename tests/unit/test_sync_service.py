"""The sync shell's send path: small messages share TLS writes, in order, within a size bound."""

from __future__ import annotations

from typing import Any, cast

import pytest

from agent.net.link import PeerLink
from agent.sync.messages import IndexUpdate, Progress, Request, Response, SyncMessage
from agent.sync.sender import SEND_BATCH_BYTES, send_group
from agent.sync.state import _Link


class _Writes:
    """Stands in for a PeerLink: records each `send_many` call (one TLS write)."""

    def __init__(self) -> None:
        self.writes: list[list[Any]] = []

    async def send_many(self, messages: Any) -> None:
        self.writes.append(list(messages))


@pytest.mark.anyio
async def test_small_messages_share_writes_in_order_and_big_ones_go_alone() -> None:
    link = _Writes()
    ls = _Link(cast(PeerLink, link), "D" * 32, "peer")
    requests = [Request("default", f"f{i}", 0, 4096, bytes(32), i) for i in range(3000)]
    blocks = [Response(i, bytes(1024 * 1024)) for i in range(3)]
    small = [Response(i, bytes(4096)) for i in range(200)]
    messages: list[SyncMessage] = [*requests, *blocks, *small, IndexUpdate("default", ()), Progress("default", 0, 0)]
    await send_group(ls, messages, {})
    assert [m for w in link.writes for m in w] == messages  # nothing lost, nothing reordered
    assert len(link.writes) < 20, "3,000 small requests should share a few writes"
    for w in link.writes:
        size = sum(len(m.data) + 32 if isinstance(m, Response) else 128 for m in w)
        assert len(w) == 1 or size <= SEND_BATCH_BYTES
    assert all(len(w) == 1 for w in link.writes if isinstance(w[0], Response) and len(w[0].data) > SEND_BATCH_BYTES)
