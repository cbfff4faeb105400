"""The pairing machine: codes, SPAKE2 with key confirmation, burning, expiry, and relays."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ErrorCode, RemoteProtocolError, TofuError, UserError
from agent.identity.keys import new_device_id
from agent.net.pairing_net import (
    NotThisPairing,
    PairConfirm,
    PairedPeer,
    PairingExchange,
    PairPake,
    encode_pair_txt,
    parse_pair_txt,
)
from agent.pairing.code import (
    CODE_SECRET_BITS,
    CONFIRM_LEN,
    DEFAULT_TTL,
    PAKE_MESSAGE_LEN,
    BadPairingMessage,
    PairingCode,
    PairingError,
    PairingExpired,
    PairingResult,
    PairingSession,
    PairingSessionOver,
    Role,
    State,
    WrongCodeError,
    new_code,
    parse_code,
)
from agent.pairing.words import WORDS
from agent.wire.handshake import PeerAuthenticated
from agent.wire.messages import WireMessage, decode_message, encode_message

T0 = 1_000_000.0
CODE = "7-guitar-orbit"


@dataclass(frozen=True)
class Device:
    device_id: str
    fingerprint: str

    def session(self, role: Role, code: str = CODE, created_at: float = T0) -> PairingSession:
        return PairingSession(role, code, self.device_id, self.fingerprint, created_at)


def device() -> Device:
    return Device(new_device_id(), secrets.token_hex(32))


def exchange_pake(
    a: PairingSession, b: PairingSession, a_sees: Device, b_sees: Device, now: float = T0 + 1
) -> tuple[bytes, bytes]:
    """Run the first round; `a_sees` is what a's connection showed for its peer."""
    msg_a, msg_b = a.start(now), b.start(now)
    conf_a = a.receive_pake(msg_b, a_sees.device_id, a_sees.fingerprint, now)
    conf_b = b.receive_pake(msg_a, b_sees.device_id, b_sees.fingerprint, now)
    return conf_a, conf_b


# -- codes ----------------------------------------------------------------------------------------


def test_new_code_shape() -> None:
    for _ in range(50):
        code = parse_code(new_code())
        assert 1 <= code.nameplate <= 999
        assert len(code.words) == 2
        assert all(w in WORDS for w in code.words)
    assert CODE_SECRET_BITS == 22


def test_new_code_uses_the_random_source() -> None:
    assert new_code(lambda n: 0) == f"1-{WORDS[0]}-{WORDS[0]}"
    assert new_code(lambda n: n - 1) == f"999-{WORDS[-1]}-{WORDS[-1]}"


@pytest.mark.parametrize("text", ["7-guitar-orbit", " 7 Guitar ORBIT ", "7-guitar orbit", "007-guitar-orbit"])
def test_parse_code_normalises(text: str) -> None:
    assert parse_code(text) == PairingCode(7, ("guitar", "orbit"))
    assert str(parse_code(text)) == "7-guitar-orbit"


@pytest.mark.parametrize(
    "text", ["", "guitar-orbit", "7-guitar", "7-guitar-orbit-extra", "0-guitar-orbit", "1000-guitar-orbit",
             "7-guitat-orbit", "7_guitar_orbit", "x-guitar-orbit", "7-gu1tar-orbit"],
)  # fmt: skip
def test_parse_code_rejects(text: str) -> None:
    with pytest.raises(UserError) as info:
        parse_code(text)
    assert "\n" not in str(info.value)


def test_session_rejects_a_bad_code_before_anything_happens() -> None:
    with pytest.raises(UserError):
        device().session("waiting", code="7-guitar")


def test_session_rejects_bad_arguments() -> None:
    dev = device()
    with pytest.raises(ValueError):
        PairingSession("both", CODE, dev.device_id, dev.fingerprint, T0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PairingSession("waiting", CODE, "nope", dev.fingerprint, T0)


# -- success --------------------------------------------------------------------------------------


def test_pairing_succeeds_with_the_right_code() -> None:
    alice, bob = device(), device()
    a, b = alice.session("waiting"), bob.session("joining", code=" 7 GUITAR orbit")
    conf_a, conf_b = exchange_pake(a, b, a_sees=bob, b_sees=alice)
    assert len(conf_a) == len(conf_b) == 32 and conf_a != conf_b
    assert a.receive_confirm(conf_b, T0 + 2) == PairingResult(bob.device_id, bob.fingerprint)
    assert b.receive_confirm(conf_a, T0 + 2) == PairingResult(alice.device_id, alice.fingerprint)
    assert a.state is b.state is State.PAIRED
    assert a.get_timer() is None and a.nameplate == 7


def test_start_without_now_and_timer_before_the_end() -> None:
    a = device().session("waiting")
    assert a.get_timer() == T0 + DEFAULT_TTL
    assert a.start()[:1] == b"A"
    assert device().session("joining").start()[:1] == b"B"


def test_a_finished_session_cannot_be_used_again() -> None:
    alice, bob = device(), device()
    a, b = alice.session("waiting"), bob.session("joining")
    _conf_a, conf_b = exchange_pake(a, b, bob, alice)
    a.receive_confirm(conf_b, T0 + 2)
    with pytest.raises(PairingSessionOver):
        a.receive_confirm(conf_b, T0 + 2)
    with pytest.raises(PairingSessionOver):
        a.start(T0 + 2)
    assert a.state is State.PAIRED


# -- wrong codes and burning ----------------------------------------------------------------------


@pytest.mark.parametrize("other_code", ["7-guitar-order", "8-guitar-orbit", "7-orbit-guitar"])
def test_wrong_code_fails_on_both_sides(other_code: str) -> None:
    alice, bob = device(), device()
    a, b = alice.session("waiting"), bob.session("joining", code=other_code)
    conf_a, conf_b = exchange_pake(a, b, bob, alice)
    with pytest.raises(WrongCodeError) as info_a:
        a.receive_confirm(conf_b, T0 + 2)
    with pytest.raises(WrongCodeError) as info_b:
        b.receive_confirm(conf_a, T0 + 2)
    assert "the pairing code was wrong" in str(info_a.value)
    assert "ask for a new code" in str(info_b.value)
    assert a.state is b.state is State.FAILED
    assert a.get_timer() is None


def test_a_burnt_session_refuses_even_the_right_confirmation() -> None:
    alice, bob = device(), device()
    a, b = alice.session("waiting"), bob.session("joining")
    _conf_a, conf_b = exchange_pake(a, b, bob, alice)
    with pytest.raises(WrongCodeError):
        a.receive_confirm(b"\x00" * 32, T0 + 2)
    for attempt in (
        lambda: a.receive_confirm(conf_b, T0 + 2),
        lambda: a.start(T0 + 2),
        lambda: a.receive_pake(b"B" + b"\x00" * 32, bob.device_id, bob.fingerprint, T0 + 2),
    ):
        with pytest.raises(PairingSessionOver, match="codes work once"):
            attempt()
    assert a.state is State.FAILED


def test_out_of_order_calls_burn_the_session() -> None:
    alice, bob = device(), device()
    a = alice.session("waiting")
    with pytest.raises(PairingSessionOver, match="out of order"):
        a.receive_confirm(b"\x00" * 32, T0)
    with pytest.raises(PairingSessionOver):
        a.start(T0)
    b = bob.session("joining")
    b.start(T0)
    with pytest.raises(PairingSessionOver):
        b.start(T0)
    assert b.state is State.FAILED


# -- expiry ---------------------------------------------------------------------------------------


def test_expired_before_start() -> None:
    a = device().session("waiting")
    with pytest.raises(PairingExpired, match="expired"):
        a.start(T0 + DEFAULT_TTL)
    assert a.state is State.FAILED
    with pytest.raises(PairingSessionOver):
        a.start(T0 + 1)


def test_expired_between_messages() -> None:
    alice, bob = device(), device()
    a, b = alice.session("waiting"), bob.session("joining")
    msg_a, msg_b = a.start(T0 + 1), b.start(T0 + 1)
    with pytest.raises(PairingExpired):
        a.receive_pake(msg_b, bob.device_id, bob.fingerprint, T0 + DEFAULT_TTL + 1)
    conf_b = b.receive_pake(msg_a, alice.device_id, alice.fingerprint, T0 + 2)
    assert conf_b
    with pytest.raises(PairingExpired):
        b.receive_confirm(b"\x00" * 32, T0 + DEFAULT_TTL)
    assert a.state is b.state is State.FAILED


def test_custom_ttl() -> None:
    dev = device()
    s = PairingSession("waiting", CODE, dev.device_id, dev.fingerprint, created_at=T0, ttl=10.0)
    with pytest.raises(PairingExpired):
        s.start(T0 + 10.0)


# -- relays ---------------------------------------------------------------------------------------


def test_relay_without_the_code_fails_on_both_sides() -> None:
    # The relay runs its own PAKE with each side (it must guess the code) using its own keys.
    alice, bob = device(), device()
    relay_to_alice, relay_to_bob = device(), device()
    a, b = alice.session("waiting"), bob.session("joining")
    ra = relay_to_alice.session("joining", code="7-guitar-order")
    rb = relay_to_bob.session("waiting", code="7-guitar-order")
    _conf_a, conf_ra = exchange_pake(a, ra, a_sees=relay_to_alice, b_sees=alice)
    conf_rb, _conf_b = exchange_pake(rb, b, a_sees=bob, b_sees=relay_to_bob)
    with pytest.raises(WrongCodeError):
        a.receive_confirm(conf_ra, T0 + 2)
    with pytest.raises(WrongCodeError):
        b.receive_confirm(conf_rb, T0 + 2)


def test_relay_forwarding_messages_with_its_own_keys_fails() -> None:
    # The relay terminates each connection with a key of its own but passes every pairing message
    # through, so alice and bob share a SPAKE2 key. Each transcript holds the fingerprint its side saw
    # (the relay's), so the confirmations differ and both refuse. Knowing the code would not help the
    # relay here: making other confirmations needs the SPAKE2 key, which the code alone does not give.
    alice, bob = device(), device()
    a, b = alice.session("waiting"), bob.session("joining")
    alice_sees = Device(bob.device_id, secrets.token_hex(32))  # the relay claims bob's id, its own key
    bob_sees = Device(alice.device_id, secrets.token_hex(32))
    conf_a, conf_b = exchange_pake(a, b, a_sees=alice_sees, b_sees=bob_sees)
    with pytest.raises(WrongCodeError):
        a.receive_confirm(conf_b, T0 + 2)
    with pytest.raises(WrongCodeError):
        b.receive_confirm(conf_a, T0 + 2)


def test_a_relay_that_knows_the_code_pairs_as_itself() -> None:
    # The limit of any PAKE, stated in docs/SECURITY.md: whoever holds the code can run a pairing of
    # its own with each side. Each side then pins the key it really talked to (the relay's), never a
    # key it was only told about, so the code must go only to the person at the other machine.
    alice, bob, relay = device(), device(), device()
    a = alice.session("waiting")
    r = Device(bob.device_id, relay.fingerprint).session("joining")  # bob's id, the relay's key
    _conf_a, conf_r = exchange_pake(a, r, a_sees=Device(bob.device_id, relay.fingerprint), b_sees=alice)
    assert a.receive_confirm(conf_r, T0 + 2) == PairingResult(bob.device_id, relay.fingerprint)
    assert bob.fingerprint != relay.fingerprint


def test_relay_changing_only_a_device_id_fails() -> None:
    alice, bob, mallory = device(), device(), device()
    a, b = alice.session("waiting"), bob.session("joining")
    conf_a, conf_b = exchange_pake(a, b, a_sees=Device(mallory.device_id, bob.fingerprint), b_sees=alice)
    with pytest.raises(WrongCodeError):
        a.receive_confirm(conf_b, T0 + 2)
    with pytest.raises(WrongCodeError):
        b.receive_confirm(conf_a, T0 + 2)


def test_reflected_confirmation_fails() -> None:
    alice, bob = device(), device()
    a, b = alice.session("waiting"), bob.session("joining")
    conf_a, _ = exchange_pake(a, b, bob, alice)
    with pytest.raises(WrongCodeError):
        a.receive_confirm(conf_a, T0 + 2)


def test_reflected_pake_message_fails() -> None:
    alice, bob = device(), device()
    a = alice.session("waiting")
    msg_a = a.start(T0)
    with pytest.raises(BadPairingMessage):
        a.receive_pake(msg_a, bob.device_id, bob.fingerprint, T0)
    assert a.state is State.FAILED


def test_two_waiting_sides_fail() -> None:
    alice, bob = device(), device()
    a, b = alice.session("waiting"), bob.session("waiting")
    msg_a, msg_b = a.start(T0), b.start(T0)
    with pytest.raises(BadPairingMessage):
        a.receive_pake(msg_b, bob.device_id, bob.fingerprint, T0)
    with pytest.raises(BadPairingMessage):
        b.receive_pake(msg_a, alice.device_id, alice.fingerprint, T0)


def test_pairing_with_itself_fails() -> None:
    alice = device()
    a, b = alice.session("waiting"), alice.session("joining")
    _msg_a, msg_b = a.start(T0), b.start(T0)
    with pytest.raises(BadPairingMessage, match="itself"):
        a.receive_pake(msg_b, alice.device_id, alice.fingerprint, T0)


@pytest.mark.parametrize(("peer_id", "peer_fp"), [("nope", "0" * 64), ("A" * 32, "nope")])
def test_malformed_peer_identity_fails(peer_id: str, peer_fp: str) -> None:
    a = device().session("waiting")
    a.start(T0)
    msg_b = device().session("joining").start(T0)
    with pytest.raises(BadPairingMessage):
        a.receive_pake(msg_b, peer_id, peer_fp, T0)


@settings(max_examples=60)
@given(st.one_of(st.binary(max_size=40), st.binary(min_size=32, max_size=32).map(lambda b: b"B" + b)))
def test_any_pake_bytes_give_a_confirmation_or_a_pairing_error(msg: bytes) -> None:
    bob = device()
    a = device().session("waiting")
    a.start(T0)
    try:
        conf = a.receive_pake(msg, bob.device_id, bob.fingerprint, T0)
    except PairingError as exc:
        assert exc.code is ErrorCode.MALFORMED
        assert a.state is State.FAILED
        return
    assert len(conf) == 32
    with pytest.raises(WrongCodeError):
        a.receive_confirm(b"\x00" * 32, T0)


# -- errors ---------------------------------------------------------------------------------------


def test_errors_are_user_errors_with_wire_codes() -> None:
    for cls in (WrongCodeError, PairingExpired, BadPairingMessage, PairingSessionOver):
        assert issubclass(cls, PairingError)
        assert issubclass(cls, UserError) and issubclass(cls, TofuError)
    assert WrongCodeError.code is ErrorCode.AUTH_FAILED
    assert PairingExpired.code is ErrorCode.TIMEOUT
    assert BadPairingMessage.code is ErrorCode.MALFORMED


# -- the pairing connection's messages and exchange (agent.pairing_net, pure parts) ---------------


def _peer(d: Device, name: str = "peer") -> PeerAuthenticated:
    return PeerAuthenticated(d.device_id, name, d.fingerprint, b"cert", (), 1)


def _exchanges(code_w: str = CODE, code_j: str = CODE) -> tuple[Device, Device, PairingExchange, PairingExchange]:
    w, j = device(), device()
    ew, ej = PairingExchange(w.session("waiting", code_w)), PairingExchange(j.session("joining", code_j))
    ew.authenticated(_peer(j, "joiner"))
    ej.authenticated(_peer(w, "waiter"))
    return w, j, ew, ej


def _wire(messages: list[WireMessage]) -> list[WireMessage]:
    """Through the encoder and decoder, as on the connection."""
    return [decode_message(encode_message(m)) for m in messages]


def test_exchange_pairs_in_three_messages() -> None:
    w, j, ew, ej = _exchanges()
    assert ew.opened(T0) == []
    first = _wire(ej.opened(T0))
    assert [m.TYPE for m in first] == ["pair_pake"] and ew.session.state is State.EXPECT_START
    reply = _wire(ew.received(first[0], T0))
    assert [m.TYPE for m in reply] == ["pair_pake", "pair_confirm"] and ew.started
    confirm = _wire(ej.received(reply[0], T0))
    assert ej.received(reply[1], T0) == [] and ej.result == PairedPeer(w.device_id, "waiter", w.fingerprint)
    assert ew.received(confirm[0], T0) == [] and ew.result == PairedPeer(j.device_id, "joiner", j.fingerprint)


def test_exchange_wrong_code_fails_on_both_sides() -> None:
    _, _, ew, ej = _exchanges(code_j="7-guitar-oxygen")
    reply = ew.received(ej.opened(T0)[0], T0)
    confirm = ej.received(reply[0], T0)
    with pytest.raises(WrongCodeError):
        ej.received(reply[1], T0)
    with pytest.raises(WrongCodeError):
        ew.received(confirm[0], T0)
    assert ew.session.state is State.FAILED and ej.session.state is State.FAILED


def test_another_nameplate_does_not_burn_the_waiting_code() -> None:
    _, _, ew, ej = _exchanges(code_j="8-guitar-orbit")
    with pytest.raises(NotThisPairing):
        ew.received(ej.opened(T0)[0], T0)
    assert not ew.started and ew.session.state is State.EXPECT_START


def test_a_second_joiner_is_refused_while_the_first_pairs() -> None:
    w, _, ew, ej = _exchanges()
    ew.received(ej.opened(T0)[0], T0)
    other = PairingExchange(ew.session)
    other.authenticated(_peer(device()))
    intruder = PairingExchange(device().session("joining"))
    intruder.authenticated(_peer(w))
    with pytest.raises(NotThisPairing):
        other.received(intruder.opened(T0)[0], T0)
    assert ew.session.state is State.EXPECT_CONFIRM  # the first pairing goes on


def test_messages_out_of_turn_burn_an_owned_session() -> None:
    _, _, ew, ej = _exchanges()
    ew.received(ej.opened(T0)[0], T0)
    with pytest.raises(BadPairingMessage):
        ew.received(PairPake(7, b"\x00" * PAKE_MESSAGE_LEN), T0)
    assert ew.session.state is State.FAILED


def test_a_confirm_first_is_refused_without_burning() -> None:
    _, _, ew, _ = _exchanges()
    with pytest.raises(NotThisPairing):
        ew.received(PairConfirm(b"\x00" * CONFIRM_LEN), T0)
    assert ew.session.state is State.EXPECT_START


def test_peer_closing_maps_to_plain_errors() -> None:
    _, _, ew, ej = _exchanges()
    ej.opened(T0)
    assert isinstance(ej.peer_closed(ErrorCode.AUTH_FAILED, ""), WrongCodeError)
    assert ej.session.state is State.FAILED
    assert isinstance(ew.peer_closed(ErrorCode.TIMEOUT, ""), PairingExpired)
    err = ew.peer_closed(ErrorCode.NOT_TRUSTED, "pinned elsewhere")
    assert isinstance(err, UserError) and "pinned elsewhere" in str(err)


@given(st.binary(max_size=200))
def test_pairing_message_decoding_never_raises_anything_else(body: bytes) -> None:
    for t in ("pair_pake", "pair_confirm"):
        try:
            decode_message(msgpack.packb({"t": t, "nameplate": 7, "msg": body, "mac": body}))
        except RemoteProtocolError:
            pass
        try:
            decode_message(body)
        except RemoteProtocolError:
            pass


def test_pairing_messages_check_their_sizes() -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(msgpack.packb({"t": "pair_pake", "nameplate": 0, "msg": b"\x00" * PAKE_MESSAGE_LEN}))
    with pytest.raises(RemoteProtocolError):
        decode_message(msgpack.packb({"t": "pair_confirm", "mac": b"\x00" * 31}))


@pytest.mark.parametrize("nameplate", [1, 7, 999])
def test_pair_txt_round_trip_and_carries_no_secret(nameplate: int) -> None:
    txt = encode_pair_txt(nameplate)
    assert set(txt) == {b"v", b"n"}
    assert parse_pair_txt(dict(txt)) == nameplate


@given(st.dictionaries(st.binary(max_size=4), st.one_of(st.none(), st.binary(max_size=8)), max_size=4))
def test_pair_txt_parsing_never_raises(props: dict[bytes, bytes | None]) -> None:
    value = parse_pair_txt(props)
    assert value is None or 1 <= value <= 999
