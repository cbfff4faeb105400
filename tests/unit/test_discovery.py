"""Discovery without a network: TXT records, instance names, the peer table and the fake bus."""

from __future__ import annotations

import secrets

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from zeroconf import BadTypeInNameException
from zeroconf._utils.name import service_type_name

from agent.identity.keys import new_device_id
from agent.net.discovery import (
    MAX_INSTANCE_BYTES,
    MAX_TXT_BYTES,
    SERVICE_TYPE,
    DiscoveryError,
    FakeBus,
    FakeDiscovery,
    PeerGone,
    PeerSeen,
    PeerTable,
    TxtRecord,
    encode_txt,
    instance_name,
    normalise_addresses,
    parse_txt,
    txt_wire_size,
)
from agent.net.mdns import ZeroconfDiscovery

ID = new_device_id()
FP = "ab" * 32


def props(**kw: bytes | None) -> dict[bytes, bytes | None]:
    base: dict[bytes, bytes | None] = {b"v": b"1", b"id": new_device_id().encode(), b"fp": FP.encode()}
    base[b"name"] = b"peer"
    for k, v in kw.items():
        if v is None:
            base.pop(k.encode(), None)
        else:
            base[k.encode()] = v
    return base


def svc(label: str) -> str:
    return f"{label}.{SERVICE_TYPE}"


# -- TXT ------------------------------------------------------------------------------------------


@given(st.text())
def test_encoded_txt_is_small_and_parses_back(name: str) -> None:
    txt = encode_txt(ID, FP, name)
    assert txt_wire_size(txt) <= MAX_TXT_BYTES
    parsed = parse_txt(txt)
    assert isinstance(parsed, TxtRecord)
    assert (parsed.device_id, parsed.fingerprint) == (ID, FP)
    assert parsed.name == txt[b"name"].decode()


def test_long_name_is_truncated_on_a_character_boundary() -> None:
    txt = encode_txt(ID, FP, "ü" * 200)
    assert txt_wire_size(txt) <= MAX_TXT_BYTES
    assert set(txt[b"name"].decode()) == {"ü"}
    assert next(iter(txt)) == b"v"


@pytest.mark.parametrize(("device_id", "fp"), [("short", FP), (ID, "AB" * 32), (ID.lower(), FP), (ID, FP[:-1])])
def test_encode_rejects_malformed_identity(device_id: str, fp: str) -> None:
    with pytest.raises(ValueError):
        encode_txt(device_id, fp, "x")


@given(
    st.dictionaries(
        st.one_of(st.sampled_from([b"v", b"id", b"fp", b"name"]), st.binary(max_size=10)),
        st.one_of(st.none(), st.binary(max_size=300), st.sampled_from([b"1", ID.encode(), FP.encode()])),
        max_size=8,
    )
)
def test_arbitrary_txt_parses_or_is_ignored(properties: dict[bytes, bytes | None]) -> None:
    result = parse_txt(properties)
    assert isinstance(result, TxtRecord | str)


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"v": b"2"}, "version"),
        ({"v": None}, "version"),
        ({"id": b"A" * 31}, "id"),
        ({"id": None}, "id"),
        ({"fp": FP.upper().encode()}, "fp"),
        ({"name": None}, "name"),
        ({"name": b"x" * 129}, "name"),
        ({"name": b"\xff\xfe"}, "undecodable"),
        ({"junk": b"x" * 400}, "too large"),
    ],
)
def test_bad_txt_is_ignored_with_a_reason(override: dict[str, bytes | None], reason: str) -> None:
    result = parse_txt(props(**override))
    assert isinstance(result, str)
    assert reason in result


def test_unknown_keys_are_tolerated_and_names_cleaned() -> None:
    result = parse_txt(props(extra=b"future", name=b"  evil\x1b[31m\nname  "))
    assert isinstance(result, TxtRecord)
    assert result.name == "evil[31mname"


# -- instance names -------------------------------------------------------------------------------


@given(st.text())
def test_instance_name_is_a_valid_label_with_room_for_renames(name: str) -> None:
    label = instance_name(name, ID)
    assert len(label.encode()) <= MAX_INSTANCE_BYTES
    assert label.endswith(f" ({ID[:6]})")
    assert "." not in label
    assert all(ch.isprintable() for ch in label)
    service_type_name(f"{label}-99.{SERVICE_TYPE}")  # what zeroconf checks after a rename


def test_same_host_name_gives_different_instances() -> None:
    assert instance_name("laptop", new_device_id()) != instance_name("laptop", new_device_id())
    assert instance_name("", ID) == f"unnamed ({ID[:6]})"
    assert instance_name("my.host.lan", ID) == f"my-host-lan ({ID[:6]})"


def test_overlong_label_would_be_refused_by_zeroconf() -> None:
    # The reason for MAX_INSTANCE_BYTES: zeroconf refuses labels over 63 bytes.
    with pytest.raises(BadTypeInNameException):
        service_type_name(f"{'x' * 64}.{SERVICE_TYPE}")


# -- addresses ------------------------------------------------------------------------------------


def test_addresses_ipv4_first_filtered_and_capped() -> None:
    raw = [
        "fe80::1%eth0",
        "2001:db8::1",
        "10.0.0.2",
        "10.0.0.2",
        "0.0.0.0",
        "224.0.0.251",
        "127.0.0.1",
        "junk",
    ]
    assert normalise_addresses(raw) == ("10.0.0.2", "2001:db8::1")
    assert normalise_addresses(raw, allow_loopback=True) == ("10.0.0.2", "127.0.0.1", "2001:db8::1")
    assert normalise_addresses(raw, allow_link_local_v6=True)[-1] == "fe80::1%eth0"
    many = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(1000)]
    assert len(normalise_addresses(many, max_addresses=8)) == 8


# -- the peer table -------------------------------------------------------------------------------


def test_table_add_update_remove() -> None:
    table = PeerTable(ID)
    p = props()
    (seen,) = table.observe(svc("a"), p, ["10.0.0.2"], 22000)
    assert isinstance(seen, PeerSeen)
    assert seen.addresses == ("10.0.0.2",)
    assert table.observe(svc("a"), p, ["10.0.0.2"], 22000) == []  # nothing new, no event
    (moved,) = table.observe(svc("a"), p, ["10.0.0.3"], 22000)
    assert isinstance(moved, PeerSeen) and moved.addresses == ("10.0.0.3",)
    assert table.remove(svc("A")) == [PeerGone(seen.device_id, svc("a"))]  # DNS names ignore case
    assert table.remove(svc("a")) == []
    assert table.peers() == ()


def test_table_ignores_self_bad_port_and_foreign_types() -> None:
    ignored: list[tuple[str, str]] = []
    table = PeerTable(ID, on_ignored=lambda name, reason: ignored.append((name, reason)))
    assert table.observe(svc("me"), props(id=ID.encode()), ["10.0.0.2"], 22000) == []
    assert table.observe(svc("p"), props(), ["10.0.0.2"], 0) == []
    assert table.observe(svc("p"), props(), ["10.0.0.2"], None) == []
    assert table.observe(svc("p"), props(), ["127.0.0.1"], 22000) == []
    assert table.observe("x._http._tcp.local.", props(), ["10.0.0.2"], 22000) == []
    assert [r for _, r in ignored] == [
        "our own advertisement",
        "bad port",
        "bad port",
        "no usable address",
        "not our service type",
    ]


def test_table_turns_a_spoiled_record_into_gone_and_a_new_id_into_gone_then_seen() -> None:
    table = PeerTable(ID)
    (first,) = table.observe(svc("a"), props(), ["10.0.0.2"], 1)
    assert isinstance(first, PeerSeen)
    gone, seen = table.observe(svc("a"), props(), ["10.0.0.2"], 1)
    assert gone == PeerGone(first.device_id, svc("a"))
    assert isinstance(seen, PeerSeen) and seen.device_id != first.device_id
    assert table.observe(svc("a"), props(v=b"9"), ["10.0.0.2"], 1) == [PeerGone(seen.device_id, svc("a"))]
    assert len(table) == 0


def test_table_is_bounded_under_a_flood() -> None:
    table = PeerTable(ID, max_services=256, max_addresses=8)
    addresses = [f"10.1.{i}.{j}" for i in range(10) for j in range(1, 100)]
    events = [e for i in range(1000) for e in table.observe(svc(f"f{i}"), props(), addresses, 1)]
    assert len(table) == 256 == len(events)
    assert all(isinstance(e, PeerSeen) and len(e.addresses) == 8 for e in events)
    # A tracked service may still change while the table is full.
    assert len(table.observe(svc("f0"), props(), ["10.9.9.9"], 1)) == 2


@given(
    name=st.one_of(st.text(max_size=300), st.just(svc("ok"))),
    properties=st.dictionaries(st.binary(max_size=8), st.one_of(st.none(), st.binary(max_size=80)), max_size=6),
    addresses=st.lists(st.one_of(st.text(max_size=50), st.ip_addresses().map(str)), max_size=20),
    port=st.one_of(st.none(), st.integers(min_value=-(2**40), max_value=2**40)),
)
def test_table_never_raises_on_hostile_input(
    name: str, properties: dict[bytes, bytes | None], addresses: list[str], port: int | None
) -> None:
    table = PeerTable(ID)
    table.observe(name, properties, addresses, port)
    table.observe(name, props(), addresses, port)
    table.remove(name)
    assert len(table) == 0


def test_event_validation() -> None:
    with pytest.raises(ValueError):
        PeerSeen(ID, "n", FP, (), 1, svc("a"))
    with pytest.raises(ValueError):
        PeerSeen(ID, "n", "nope", ("10.0.0.1",), 1, svc("a"))


# -- the fake -------------------------------------------------------------------------------------


def fake(bus: FakeBus, name: str, port: int = 22000) -> FakeDiscovery:
    return FakeDiscovery(bus, device_id=new_device_id(), name=name, fingerprint=secrets.token_hex(32), port=port)


def drain(d: FakeDiscovery) -> list[PeerSeen | PeerGone]:
    out: list[PeerSeen | PeerGone] = []
    while True:
        try:
            out.append(d.events.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            return out


@pytest.mark.anyio
async def test_fakes_see_each_other_update_and_say_goodbye() -> None:
    bus = FakeBus()
    a, b = fake(bus, "laptop", 1000), fake(bus, "laptop", 2000)
    async with a, b:
        (b_seen,) = drain(a)
        (a_seen,) = drain(b)
        assert isinstance(b_seen, PeerSeen) and b_seen.device_id == b.device_id and b_seen.port == 2000
        assert isinstance(a_seen, PeerSeen) and a_seen.addresses == ("127.0.0.1",)
        assert a.service_name != b.service_name  # same host name, different instance
        new_fp = secrets.token_hex(32)
        await b.update(new_fp)
        (updated,) = drain(a)
        assert isinstance(updated, PeerSeen) and updated.fingerprint_hint == new_fp
        assert a.peers() == (updated,)
        await b.stop()
        assert drain(a) == [PeerGone(b.device_id, updated.service_name)]
    received = [e async for e in b.events]  # the stream ends after stop
    assert received == []


@pytest.mark.anyio
async def test_fake_crash_leaves_a_lingering_record_and_forgeries_are_ignored() -> None:
    bus = FakeBus()
    a, b = fake(bus, "a"), fake(bus, "b")
    await a.start()
    await b.start()
    drain(a)
    b.crash()
    assert drain(a) == []  # no goodbye from a killed process
    bus.publish(svc("evil"), props(v=b"2"), ["10.0.0.9"], 1)
    bus.publish(svc("evil2"), props(id=a.device_id.encode()), ["10.0.0.9"], 1)
    assert drain(a) == []
    c = fake(bus, "c")
    await c.start()
    # b's record lingers; the forgery of a's id is valid from c's point of view (ids are claims).
    seen = [(e.device_id, e.service_name) for e in drain(c)]
    assert seen == [(a.device_id, a.service_name), (b.device_id, b.service_name), (a.device_id, svc("evil2"))]
    await a.stop()
    await c.stop()


@pytest.mark.anyio
async def test_fake_lifecycle_errors() -> None:
    bus = FakeBus()
    a = fake(bus, "a")
    with pytest.raises(DiscoveryError):
        await a.update(FP)
    await a.start()
    with pytest.raises(DiscoveryError):
        await a.start()
    with pytest.raises(ValueError):
        await a.update("not a fingerprint")
    await a.stop()
    await a.stop()  # idempotent


def test_zeroconf_discovery_validates_without_touching_the_network() -> None:
    with pytest.raises(ValueError):
        ZeroconfDiscovery(device_id=ID, name="x", fingerprint="bad", port=1)
    with pytest.raises(ValueError):
        ZeroconfDiscovery(device_id=ID, name="x", fingerprint=FP, port=70000)
    d = ZeroconfDiscovery(device_id=ID, name="x", fingerprint=FP, port=1)
    assert d.service_name is None and d.peers() == ()
