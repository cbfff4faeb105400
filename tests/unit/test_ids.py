"""Device id and fingerprint checks are full matches: a trailing newline (which `$` lets through) is refused."""

from __future__ import annotations

import pytest

from agent.cli.main import parse_export
from agent.errors import UserError
from agent.identity import ids
from agent.pairing.code import parse_code
from agent.pairing.safety import identity_uri, parse_identity_uri

DEV = "A" * 32
FP = "0123456789abcdef" * 4


def test_well_formed_values_pass() -> None:
    assert ids.is_device_id(DEV)
    assert ids.is_device_id(ids.new_device_id())
    assert ids.is_fingerprint(FP)


@pytest.mark.parametrize("tail", ["\n", "\r\n", "\r", " ", "\x00", "A"])
def test_device_id_with_anything_after_it_is_refused(tail: str) -> None:
    assert not ids.is_device_id(DEV + tail)


@pytest.mark.parametrize("tail", ["\n", "\r\n", "\r", " ", "\x00", "0"])
def test_fingerprint_with_anything_after_it_is_refused(tail: str) -> None:
    assert not ids.is_fingerprint(FP + tail)


@pytest.mark.parametrize("head", ["\n", " "])
def test_leading_junk_is_refused(head: str) -> None:
    assert not ids.is_device_id(head + DEV)
    assert not ids.is_fingerprint(head + FP)


def test_uri_with_an_encoded_newline_after_the_fingerprint_is_refused() -> None:
    # %0A decodes to "\n" inside the query; `^[0-9a-f]{64}$` matched it and pinned a 65-character key.
    uri = f"tofu-agent://device/{DEV}?fp={FP}%0A&name=x&v=1"
    with pytest.raises(UserError, match="fingerprint"):
        parse_identity_uri(uri)


def test_uri_without_the_newline_still_parses() -> None:
    assert parse_identity_uri(f"tofu-agent://device/{DEV}?fp={FP}&name=x&v=1").fingerprint == FP


def test_building_a_uri_refuses_a_fingerprint_with_a_newline() -> None:
    with pytest.raises(ValueError):
        identity_uri(DEV, "x", FP + "\n")
    with pytest.raises(ValueError):
        identity_uri(DEV + "\n", "x", FP)


def _export(device_id: str, fingerprint: str) -> dict[str, object]:
    when = "2025-06-01T12:00:00Z"
    return {"peers": {device_id: {"fingerprint": fingerprint, "first_seen": when, "last_seen": when}}}


def test_trust_import_refuses_ids_and_fingerprints_with_a_newline() -> None:
    assert [r.fingerprint for r in parse_export(_export(DEV, FP))] == [FP]
    with pytest.raises(UserError, match="not a device id"):
        parse_export(_export(DEV + "\n", FP))
    with pytest.raises(UserError, match="fingerprint"):
        parse_export(_export(DEV, FP + "\n"))


def test_pairing_code_parse_is_unchanged() -> None:
    # The code pattern is a full match too; surrounding whitespace was always stripped before it.
    assert parse_code(" 7-guitar-orbit\n").nameplate == 7
    with pytest.raises(UserError):
        parse_code("7-guitar-orbit-x")
