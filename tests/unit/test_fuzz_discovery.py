"""Fuzz the mDNS PeerTable as a state machine: arbitrary TXT records, names and removals in any order.

test_discovery.py checks one hostile observation at a time. Here a model follows a whole sequence:
the table stays within its bounds, every event is consistent with what it emitted before (a
PeerGone only for a device it announced on that service, a PeerSeen only for a valid record),
and `peers()` always equals what the events said.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agent.identity.keys import new_device_id
from agent.net.discovery import SERVICE_TYPE, PeerGone, PeerSeen, PeerTable, encode_txt

OWN = new_device_id()
IDS = [new_device_id() for _ in range(4)] + [OWN]
FP = "ab" * 32
MAX = 5

names = st.sampled_from([f"n{i}.{SERVICE_TYPE}" for i in range(8)] + [f"N0.{SERVICE_TYPE}", "x._http._tcp.local."])
valid_txt = st.builds(lambda d, n: dict(encode_txt(d, FP, n)), st.sampled_from(IDS), st.text(max_size=70))
junk_txt = st.dictionaries(st.binary(max_size=6), st.none() | st.binary(max_size=90), max_size=5)
bent_txt = st.builds(
    lambda t, k, v: {**t, k: v},
    valid_txt,
    st.sampled_from([b"v", b"id", b"fp", b"name"]),
    st.none() | st.binary(max_size=70),
)
addresses = st.lists(
    st.sampled_from(
        ["10.0.0.1", "10.0.0.2", "127.0.0.1", "::1", "fe80::1", "224.0.0.1", "0.0.0.0", "2001:db8::1", "x"]
    ),
    max_size=12,
)
ports = st.none() | st.integers(-2, 70000)


class TableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = PeerTable(OWN, max_services=MAX, max_addresses=3)
        self.model: dict[str, PeerSeen] = {}  # service name (lower) -> last PeerSeen

    def _apply(self, events: list[PeerSeen | PeerGone]) -> None:
        for ev in events:
            key = ev.service_name.lower()
            if isinstance(ev, PeerGone):
                assert key in self.model and self.model[key].device_id == ev.device_id
                del self.model[key]
            else:
                assert ev.device_id != OWN and 0 < len(ev.addresses) <= 3 and 0 < ev.port < 65536
                if key in self.model:
                    assert self.model[key].device_id == ev.device_id, "an id change must be Gone then Seen"
                self.model[key] = ev

    @rule(name=names, txt=valid_txt | junk_txt | bent_txt, addrs=addresses, port=ports)
    def observe(self, name: str, txt: dict[bytes, bytes | None], addrs: list[str], port: int | None) -> None:
        self._apply(self.table.observe(name, txt, addrs, port))

    @rule(name=names)
    def remove(self, name: str) -> None:
        self._apply(self.table.remove(name))

    @invariant()
    def consistent(self) -> None:
        assert len(self.table) <= MAX
        assert {p.service_name.lower(): p for p in self.table.peers()} == self.model


TableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_peer_table_state_machine = pytest.mark.slow(TableMachine.TestCase)
