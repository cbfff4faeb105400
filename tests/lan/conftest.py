"""tests/lan runs in private network namespaces; where that is impossible, skip with the reason."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit.netns import Lan, netns_available


@pytest.fixture(autouse=True)
def _needs_netns() -> None:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def lan3() -> Iterator[Lan]:
    """A fresh three-host LAN, deleted afterwards whatever happens."""
    with Lan(3) as lan:
        yield lan
