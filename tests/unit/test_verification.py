"""Safety numbers, their words, the word list, identity URIs and QR text."""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cli.pair import (
    accept_prompt_text,
    comparison_for,
    comparison_text,
    pairing_conflict,
    pin_paired,
    verify_compared,
)
from agent.errors import UserError
from agent.identity.keys import clean_name, new_device_id
from agent.pairing.safety import (
    SAFETY_DIGITS,
    ParsedIdentity,
    _half_hash,
    format_groups,
    format_words,
    identity_uri,
    parse_identity_uri,
    qr_text,
    safety_number,
    safety_words,
)
from agent.pairing.words import WORDLIST_SHA256, WORDS, int_to_words, word_index, wordlist_digest, words_to_int
from agent.trust.model import DeviceRecord, EventKind, TrustLevel

DEV_A = "A" * 32
DEV_B = "B" * 32
FP_A = "0" * 64
FP_B = "f" * 64
# Checked in so that any change to the derivation (label, scrypt cost, encoding) is deliberate.
VECTOR_DIGITS = "026984319301731157994972093636499159575583254662615630446687"
VECTOR_WORDS = (
    "business voice teach better apology assist casino cricket machine "
    "must busy visual retire kick cigar huge lemon high"
)


def _fp() -> str:
    return secrets.token_hex(32)


# -- safety numbers -------------------------------------------------------------------------------


def test_known_vector() -> None:
    assert safety_number(DEV_A, FP_A, DEV_B, FP_B) == VECTOR_DIGITS
    assert safety_words(DEV_A, FP_A, DEV_B, FP_B) == VECTOR_WORDS


def test_same_on_both_machines() -> None:
    a, b, fa, fb = new_device_id(), new_device_id(), _fp(), _fp()
    assert safety_number(a, fa, b, fb) == safety_number(b, fb, a, fa)
    assert safety_words(a, fa, b, fb) == safety_words(b, fb, a, fa)


def test_shape_is_sixty_ascii_digits() -> None:
    number = safety_number(new_device_id(), _fp(), new_device_id(), _fp())
    assert len(number) == SAFETY_DIGITS == 60
    assert number.isascii() and number.isdigit()


@pytest.mark.parametrize("which", ["fp_a", "fp_b", "dev_a", "dev_b"])
def test_changes_with_either_key_or_id(which: str) -> None:
    args = {"dev_a": new_device_id(), "fp_a": _fp(), "dev_b": new_device_id(), "fp_b": _fp()}
    before = safety_number(**args), safety_words(**args)
    args[which] = new_device_id() if which.startswith("dev") else _fp()
    after = safety_number(**args), safety_words(**args)
    assert before[0] != after[0]
    assert before[1] != after[1]


def test_a_changed_key_changes_only_its_own_half() -> None:
    # Like Signal's: each half depends on one device only, which is what the bit count in the docs assumes.
    a, b = "A" * 32, "Z" * 32  # a sorts first
    fa, fb = _fp(), _fp()
    before = safety_number(a, fa, b, fb)
    after = safety_number(a, fa, b, _fp())
    assert before[:30] == after[:30]
    assert before[30:] != after[30:]
    words_before = safety_words(a, fa, b, fb).split()
    words_after = safety_words(a, _fp(), b, fb).split()
    assert words_before[9:] == words_after[9:]
    assert words_before[:9] != words_after[:9]


def test_words_are_eighteen_list_words() -> None:
    words = safety_words(new_device_id(), _fp(), new_device_id(), _fp()).split()
    assert len(words) == 18
    assert all(word_index(w) is not None for w in words)


def test_takes_tens_of_milliseconds_not_seconds() -> None:
    _half_hash.cache_clear()
    t0 = time.perf_counter()
    safety_number(new_device_id(), _fp(), new_device_id(), _fp())
    elapsed = time.perf_counter() - t0
    assert 0.005 < elapsed < 2.0  # slow on purpose (scrypt), but fine for a person waiting


@pytest.mark.parametrize(
    ("dev", "fp"),
    [("a" * 32, FP_A), ("A" * 31, FP_A), (DEV_A, "F" * 64), (DEV_A, "0" * 63), (DEV_A, "g" * 64)],
)
def test_rejects_malformed_inputs(dev: str, fp: str) -> None:
    with pytest.raises(ValueError):
        safety_number(dev, fp, DEV_B, FP_B)
    with pytest.raises(ValueError):
        safety_words(DEV_B, FP_B, dev, fp)


def test_format_groups() -> None:
    shown = format_groups(VECTOR_DIGITS)
    lines = shown.split("\n")
    assert len(lines) == 3
    assert all(len(line.split(" ")) == 4 for line in lines)
    assert all(len(g) == 5 for line in lines for g in line.split(" "))
    assert shown.replace(" ", "").replace("\n", "") == VECTOR_DIGITS
    assert format_groups("1234567890", per_line=1) == "12345\n67890"


@pytest.mark.parametrize("bad", ["1234", "12345a7890", "\uff11\uff12\uff13\uff14\uff15", "12345 67890"])
def test_format_groups_rejects_non_digits(bad: str) -> None:
    with pytest.raises(ValueError):
        format_groups(bad)


def test_format_words() -> None:
    lines = format_words(VECTOR_WORDS).split("\n")
    assert [len(line.split()) for line in lines] == [6, 6, 6]


# -- the word list --------------------------------------------------------------------------------


def test_wordlist_is_the_pinned_list() -> None:
    assert len(WORDS) == 2048
    assert wordlist_digest() == WORDLIST_SHA256


def test_wordlist_is_unambiguous_ascii() -> None:
    assert len(set(WORDS)) == len(WORDS)
    assert all(w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 8 for w in WORDS)
    # No two words share their first four letters, so a misheard ending cannot make another word.
    assert len({w[:4] for w in WORDS}) == len(WORDS)


@given(st.integers(min_value=0, max_value=2**99 - 1))
def test_words_round_trip(value: int) -> None:
    words = int_to_words(value, 9)
    assert len(words) == 9
    assert words_to_int(words) == value


def test_words_reject_out_of_range_and_unknown() -> None:
    with pytest.raises(ValueError):
        int_to_words(2048, 1)
    with pytest.raises(ValueError):
        int_to_words(-1, 1)
    with pytest.raises(ValueError, match="zzzz"):
        words_to_int(["abandon", "zzzz"])
    assert word_index("Abandon") is None


# -- identity URIs --------------------------------------------------------------------------------

device_ids = st.binary(min_size=20, max_size=20).map(lambda b: base64.b32encode(b).decode("ascii"))
fingerprints = st.binary(min_size=32, max_size=32).map(bytes.hex)


@given(device_ids, st.text(max_size=100), fingerprints)
def test_uri_round_trip(device_id: str, name: str, fingerprint: str) -> None:
    uri = identity_uri(device_id, name, fingerprint)
    assert uri.isascii() and uri.isprintable()
    parsed = parse_identity_uri(uri)
    assert parsed == ParsedIdentity(device_id, clean_name(clean_name(name)), fingerprint)
    # A clean name comes back exactly.
    assert parse_identity_uri(identity_uri(device_id, parsed.name, fingerprint)).name == parsed.name


def test_uri_shape() -> None:
    uri = identity_uri(DEV_A, "Büro PC & co", FP_A)
    assert uri == f"tofu-agent://device/{DEV_A}?fp={FP_A}&name=B%C3%BCro%20PC%20%26%20co&v=1"


def test_uri_tolerates_case_whitespace_and_extra_fields() -> None:
    uri = f"  TOFU-AGENT://Device/{DEV_A.lower()}?v=1&fp={FP_B.upper()}&future=x&name=laptop \n"
    assert parse_identity_uri(uri) == ParsedIdentity(DEV_A, "laptop", FP_B)


def test_uri_without_name_is_unnamed() -> None:
    assert parse_identity_uri(f"tofu-agent://device/{DEV_A}?fp={FP_A}&v=1").name == "unnamed"


def test_uri_rejects_malformed_ids_when_building() -> None:
    with pytest.raises(ValueError):
        identity_uri("nope", "x", FP_A)
    with pytest.raises(ValueError):
        identity_uri(DEV_A, "x", "nope")


GOOD_QUERY = f"fp={FP_A}&name=x&v=1"
BAD_URIS = [
    "",
    "hello",
    f"https://device/{DEV_A}?{GOOD_QUERY}",
    f"tofu-agent://host/{DEV_A}?{GOOD_QUERY}",
    f"tofu-agent://device/?{GOOD_QUERY}",
    f"tofu-agent://device/{DEV_A[:-1]}?{GOOD_QUERY}",
    f"tofu-agent://device/{DEV_A}1?{GOOD_QUERY}",
    f"tofu-agent://device/{DEV_A}/extra?{GOOD_QUERY}",
    f"tofu-agent://device/{DEV_A}?name=x&v=1",
    f"tofu-agent://device/{DEV_A}?fp={FP_A[:-1]}&name=x&v=1",
    f"tofu-agent://device/{DEV_A}?fp={'z' * 64}&name=x&v=1",
    f"tofu-agent://device/{DEV_A}?fp={FP_A}&name=x",
    f"tofu-agent://device/{DEV_A}?fp={FP_A}&name=x&v=2",
    f"tofu-agent://device/{DEV_A}?fp={FP_A}&fp={FP_B}&name=x&v=1",
    f"tofu-agent://device/{DEV_A}?{GOOD_QUERY}#frag",
    f"tofu-agent://device/{DEV_A}?fp={FP_A}&name=%FF&v=1",
    f"tofu-agent://device/{DEV_A}?fp={FP_A}&name=x&v=1&junk",
    f"tofu-agent://device/{DEV_A}?fp={FP_A}&name=a\x00b&v=1",
    f"tofu-agent://device/{DEV_A}?fp={FP_A}&v=1&name={'x' * 1100}",
    "tofu-agent://[device/x",
]


@pytest.mark.parametrize("text", BAD_URIS)
def test_bad_uris_are_one_line_user_errors(text: str) -> None:
    with pytest.raises(UserError) as info:
        parse_identity_uri(text)
    message = str(info.value)
    assert message.startswith("not a usable tofu-agent identity link: ")
    assert "\n" not in message


@given(st.text(max_size=300))
def test_parsing_any_text_gives_an_identity_or_a_user_error(text: str) -> None:
    try:
        parsed = parse_identity_uri(text)
    except UserError:
        return
    assert parsed.device_id and parsed.fingerprint


@given(st.sampled_from([f"tofu-agent://device/{DEV_A}?{GOOD_QUERY}"]), st.data())
def test_mangled_uris_parse_or_raise_user_error(uri: str, data: st.DataObject) -> None:
    pos = data.draw(st.integers(min_value=0, max_value=len(uri)))
    insert = data.draw(st.text(max_size=5))
    try:
        parse_identity_uri(uri[:pos] + insert + uri[pos:])
    except UserError:
        pass


# -- QR -------------------------------------------------------------------------------------------


def test_qr_text_is_a_terminal_drawing() -> None:
    uri = identity_uri(DEV_A, "laptop", FP_A)
    drawing = qr_text(uri)
    lines = drawing.rstrip("\n").split("\n")
    assert len(lines) > 10
    assert len({len(line) for line in lines}) == 1  # a rectangle
    assert set(drawing) <= set("█▀▄ \n")
    assert qr_text(uri) == drawing


# -- what `verify`, `pair` and `trust accept` decide (agent.cli_pairing, pure parts) --------------


@dataclass(frozen=True)
class _Own:
    device_id: str = DEV_A
    name: str = "alpha"
    fingerprint: str = FP_A


def _record(trust: TrustLevel, fp: str = FP_B, pending: str | None = None) -> DeviceRecord:
    return DeviceRecord(DEV_B, "beta", fp, trust, 1.0, 2.0, addresses=("10.0.0.2",), pending_fingerprint=pending)


def test_comparison_uses_the_pinned_key_normally() -> None:
    c = comparison_for(_record(TrustLevel.TOFU), _Own())
    assert c.key == "pinned" and c.fingerprint == FP_B
    assert c.number == safety_number(DEV_A, FP_A, DEV_B, FP_B)
    assert "NEW key" not in comparison_text(c, _Own())


def test_comparison_of_a_changed_key_uses_the_new_key_and_says_so() -> None:
    new = _fp()
    c = comparison_for(_record(TrustLevel.KEY_CHANGED, pending=new), _Own())
    assert c.key == "pending" and c.number == safety_number(DEV_A, FP_A, DEV_B, new)
    assert "NEW key" in comparison_text(c, _Own())
    record, kind = verify_compared(c.record, c)
    assert (record.trust, record.fingerprint, record.pending_fingerprint) == (TrustLevel.VERIFIED, new, None)
    assert kind is EventKind.VERIFIED


@pytest.mark.parametrize("trust", [TrustLevel.TOFU, TrustLevel.PENDING, TrustLevel.VERIFIED])
def test_verify_compared_pins_the_shown_key(trust: TrustLevel) -> None:
    c = comparison_for(_record(trust), _Own())
    record, kind = verify_compared(c.record, c)
    assert record.trust is TrustLevel.VERIFIED and record.fingerprint == FP_B and kind is EventKind.VERIFIED


def test_verify_compared_refuses_a_record_that_changed_meanwhile_or_is_revoked() -> None:
    c = comparison_for(_record(TrustLevel.TOFU), _Own())
    with pytest.raises(UserError, match="changed while you compared"):
        verify_compared(_record(TrustLevel.KEY_CHANGED, pending=_fp()), c)
    revoked = comparison_for(_record(TrustLevel.REVOKED), _Own())
    with pytest.raises(UserError, match="revoked"):
        verify_compared(revoked.record, revoked)


def test_pairing_conflicts() -> None:
    assert pairing_conflict(None, FP_B) is None
    assert pairing_conflict(_record(TrustLevel.TOFU), FP_B) is None
    assert pairing_conflict(_record(TrustLevel.PENDING), FP_B) is None
    other = pairing_conflict(_record(TrustLevel.TOFU), _fp())
    assert other is not None and "trust forget" in other
    new = _fp()
    offered = pairing_conflict(_record(TrustLevel.KEY_CHANGED, pending=new), new)
    assert offered is not None and "new key it offered" in offered
    assert "revoked" in (pairing_conflict(_record(TrustLevel.REVOKED), FP_B) or "")
    record, kind = pin_paired(_record(TrustLevel.PENDING), FP_B)
    assert record.trust is TrustLevel.VERIFIED and kind is EventKind.VERIFIED
    with pytest.raises(UserError):
        pin_paired(_record(TrustLevel.TOFU), _fp())


def test_accept_prompt_shows_who_and_the_number() -> None:
    text = accept_prompt_text(_record(TrustLevel.PENDING), _Own())
    number = safety_number(DEV_A, FP_A, DEV_B, FP_B)
    assert "beta" in text and DEV_B in text and "10.0.0.2" in text
    assert format_groups(number).splitlines()[0] in text
    assert f"tofu-agent verify {DEV_A}" in text
