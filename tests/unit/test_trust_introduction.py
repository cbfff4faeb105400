"""Household introductions (pure): signed statements and what one may change here."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from agent.trust.introduction import Introduce, introduce, make
from agent.trust.model import DeviceRecord, EventKind, TrustLevel
from agent.wire.messages import decode_message, encode_message
from tests.unit.test_handshake import make_identity

NOW = 1_800_000_000.0
INTRODUCER = make_identity("desktop")
OTHER = make_identity("mallory")
NEW_ID, NEW_FP = "N" * 32, "ab" * 32


def statement(fp: str = NEW_FP, signer: object = INTRODUCER) -> Introduce:
    return make(INTRODUCER if signer is INTRODUCER else OTHER, NEW_ID, "laptop", fp, int(NOW))


def record(level: TrustLevel, fp: str = NEW_FP, pending: str | None = None) -> DeviceRecord:
    return DeviceRecord(NEW_ID, "laptop", fp, level, NOW - 100, NOW - 100, pending_fingerprint=pending)


def test_a_statement_verifies_with_the_introducers_key_only() -> None:
    intro = statement()
    assert intro.verify(INTRODUCER.key.public_key())
    assert not intro.verify(OTHER.key.public_key())
    assert not replace(intro, name="laptop2").verify(INTRODUCER.key.public_key())
    assert not replace(intro, fingerprint="cd" * 32).verify(INTRODUCER.key.public_key())


def test_a_statement_round_trips_through_the_wire_codec() -> None:
    intro = statement()
    assert decode_message(encode_message(intro)) == intro


@given(
    st.dictionaries(
        st.sampled_from(["t", "introducer", "device_id", "name", "fingerprint", "time", "signature"]),
        st.one_of(
            st.text(max_size=70),
            st.binary(max_size=90),
            st.integers(min_value=-(2**63), max_value=2**64 - 1),
            st.none(),
        ),
    )
)
def test_garbage_is_parsed_or_a_protocol_error(fields: dict[str, object]) -> None:
    body = msgpack.packb({**fields, "t": "introduce"})
    try:
        decode_message(body)
    except RemoteProtocolError:
        pass


@pytest.mark.parametrize(
    "bad",
    [{"device_id": "x"}, {"fingerprint": "AB" * 32}, {"name": ""}, {"name": "a\nb"}, {"signature": b""},
     {"device_id": INTRODUCER.device_id}],
)  # fmt: skip
def test_bad_fields_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        replace(statement(), **bad)  # type: ignore[arg-type]


def test_an_unknown_device_is_pinned_on_the_introducers_word() -> None:
    done = introduce(None, statement(), "desktop", NOW)
    assert done is not None and done.event is EventKind.FIRST_USE
    assert done.record.trust is TrustLevel.TOFU and done.record.fingerprint == NEW_FP
    assert "introduced by desktop" in done.detail


def test_a_pending_device_with_that_key_is_admitted() -> None:
    done = introduce(record(TrustLevel.PENDING), statement(), "desktop", NOW)
    assert done is not None and done.event is EventKind.ACCEPTED and done.record.trust is TrustLevel.TOFU


def test_an_introduction_of_another_key_is_a_key_change_and_moves_no_pin() -> None:
    done = introduce(record(TrustLevel.VERIFIED, fp="cd" * 32), statement(), "desktop", NOW)
    assert done is not None and done.event is EventKind.KEY_CHANGED
    assert done.record.trust is TrustLevel.KEY_CHANGED
    assert done.record.fingerprint == "cd" * 32 and done.record.pending_fingerprint == NEW_FP
    again = introduce(done.record, statement(), "desktop", NOW)
    assert again is None


@pytest.mark.parametrize("level", [TrustLevel.TOFU, TrustLevel.VERIFIED, TrustLevel.REVOKED])
def test_nothing_changes_for_a_device_already_decided(level: TrustLevel) -> None:
    assert introduce(record(level), statement(), "desktop", NOW) is None


def test_a_revoked_device_stays_revoked_whatever_key_is_named() -> None:
    assert introduce(record(TrustLevel.REVOKED, fp="cd" * 32), statement(), "desktop", NOW) is None


def test_errors_are_protocol_errors() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
