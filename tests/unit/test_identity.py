"""This device's identity on disk: creation, modes, fingerprints, renewal, key loss, refusals."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import re
import socket
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import IdentityError, InsecureKeyError, UserError
from agent.host.paths import Paths, resolve_paths
from agent.identity import keys as identity

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def paths(home: Path) -> Paths:
    return resolve_paths(home)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def spki_sha256(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


# -- first use ------------------------------------------------------------------------------------


def test_first_use_creates_private_files_and_dirs(paths: Paths) -> None:
    ident = identity.load_or_create(paths, None, NOW)
    assert mode(paths.key_file) == 0o600
    assert mode(paths.device_id_file) == 0o600
    for d in (paths.identity_dir, paths.data_dir, paths.config_dir, paths.runtime_dir):
        assert mode(d) == 0o700, d
    assert paths.cert_file.exists()
    assert paths.device_id_file.read_text("ascii").strip() == ident.device_id


def test_device_id_is_base32_and_at_least_128_bits(paths: Paths) -> None:
    device_id = identity.load_or_create(paths, None, NOW).device_id
    assert re.fullmatch(r"[A-Z2-7]+", device_id)
    raw = base64.b32decode(device_id + "=" * (-len(device_id) % 8))
    assert len(raw) * 8 >= 128
    assert identity.is_device_id(device_id)
    assert identity.new_device_id() != identity.new_device_id()


def test_default_name_is_the_host_name_and_a_given_name_is_cleaned(paths: Paths) -> None:
    assert identity.load_or_create(paths, None, NOW).name == identity.clean_name(socket.gethostname())
    assert identity.load_or_create(paths, "  Kitchen\x1b[31m PC \n", NOW).name == "Kitchen[31m PC"
    assert identity.load_or_create(paths, "x" * 100, NOW).name == "x" * identity.MAX_NAME_LEN


def test_second_load_is_the_same_identity_and_leaves_files_alone(paths: Paths) -> None:
    first = identity.load_or_create(paths, None, NOW)
    files = {p: p.read_bytes() for p in (paths.key_file, paths.cert_file, paths.device_id_file)}
    second = identity.load_or_create(paths, None, NOW + dt.timedelta(days=1))
    assert (second.device_id, second.fingerprint, second.cert_der) == (
        first.device_id,
        first.fingerprint,
        first.cert_der,
    )
    assert {p: p.read_bytes() for p in files} == files


# -- fingerprints ---------------------------------------------------------------------------------


def test_fingerprint_is_sha256_of_the_der_spki_of_the_key_on_disk(paths: Paths) -> None:
    ident = identity.load_or_create(paths, None, NOW)
    key = serialization.load_pem_private_key(paths.key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    cert = x509.load_pem_x509_certificate(paths.cert_file.read_bytes())
    cert_key = cert.public_key()
    assert isinstance(cert_key, ec.EllipticCurvePublicKey)
    expected = spki_sha256(key.public_key())
    assert ident.fingerprint == expected == spki_sha256(cert_key)
    assert identity.fingerprint_of_cert(ident.cert_der) == expected
    assert re.fullmatch(r"[0-9a-f]{64}", ident.fingerprint)


def test_colon_format_and_parse_fingerprint() -> None:
    fp = hashlib.sha256(b"x").hexdigest()
    people = identity.format_fingerprint(fp)
    groups = people.split(":")
    assert len(groups) == 16
    assert all(re.fullmatch(r"[0-9a-f]{4}", g) for g in groups)
    assert "".join(groups) == fp
    assert identity.parse_fingerprint(people) == fp
    assert identity.parse_fingerprint(people.upper()) == fp
    assert identity.parse_fingerprint(" ".join(groups)) == fp
    assert identity.parse_fingerprint("-".join(groups)) == fp
    assert identity.parse_fingerprint(fp) == fp


@pytest.mark.parametrize("text", ["", "abc", "g" * 64, "a" * 63, "a" * 65, "a" * 62 + "::", "0x" + "a" * 64])
def test_parse_fingerprint_rejects_what_is_not_one(text: str) -> None:
    with pytest.raises(IdentityError, match="not a SHA-256 fingerprint"):
        identity.parse_fingerprint(text)


def test_certificate_is_self_signed_for_the_key_with_finite_validity(paths: Paths) -> None:
    ident = identity.load_or_create(paths, None, NOW)
    cert = x509.load_der_x509_certificate(ident.cert_der)
    assert cert.issuer == cert.subject
    assert ident.device_id in cert.subject.rfc4514_string()
    cert.verify_directly_issued_by(cert)
    assert cert.not_valid_before_utc <= NOW < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - NOW == identity.CERT_VALIDITY


# -- renewal --------------------------------------------------------------------------------------


def test_certificate_renewal_near_expiry_keeps_the_fingerprint(paths: Paths) -> None:
    first = identity.load_or_create(paths, None, NOW)
    old_cert = x509.load_der_x509_certificate(first.cert_der)
    near_expiry = old_cert.not_valid_after_utc - dt.timedelta(days=2)
    renewed = identity.load_or_create(paths, None, near_expiry)
    new_cert = x509.load_der_x509_certificate(renewed.cert_der)
    assert renewed.fingerprint == first.fingerprint
    assert renewed.device_id == first.device_id
    assert new_cert.serial_number != old_cert.serial_number
    assert new_cert.not_valid_after_utc == near_expiry + identity.CERT_VALIDITY
    assert new_cert.not_valid_before_utc <= near_expiry
    # Written to disk, so the next load does not renew again.
    assert x509.load_pem_x509_certificate(paths.cert_file.read_bytes()) == new_cert
    assert identity.load_or_create(paths, None, near_expiry).cert_der == renewed.cert_der


def test_an_expired_certificate_is_renewed_with_the_same_key(paths: Paths) -> None:
    first = identity.load_or_create(paths, None, NOW)
    later = NOW + identity.CERT_VALIDITY * 3
    renewed = identity.load_or_create(paths, None, later)
    assert renewed.fingerprint == first.fingerprint
    assert x509.load_der_x509_certificate(renewed.cert_der).not_valid_after_utc > later


def test_no_renewal_well_before_expiry(paths: Paths) -> None:
    first = identity.load_or_create(paths, None, NOW)
    cert = x509.load_der_x509_certificate(first.cert_der)
    early = cert.not_valid_after_utc - identity.CERT_RENEW_BEFORE - dt.timedelta(days=1)
    assert identity.load_or_create(paths, None, early).cert_der == first.cert_der


@pytest.mark.parametrize("damage", ["garbage", "other key"])
def test_a_broken_certificate_is_remade_for_the_same_key(paths: Paths, damage: str) -> None:
    first = identity.load_or_create(paths, None, NOW)
    if damage == "garbage":
        paths.cert_file.write_bytes(b"not a certificate")
    else:
        other = identity.make_certificate(ec.generate_private_key(ec.SECP256R1()), first.device_id, NOW)
        paths.cert_file.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    again = identity.load_or_create(paths, None, NOW)
    assert again.fingerprint == first.fingerprint
    assert identity.fingerprint_of_cert(again.cert_der) == first.fingerprint


# -- losing the key -------------------------------------------------------------------------------


def test_deleted_key_keeps_the_device_id_with_a_new_fingerprint_and_a_warning(
    paths: Paths, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI's log setup may have stopped `agent` logs from reaching caplog's root handler.
    monkeypatch.setattr(logging.getLogger("agent"), "propagate", True)
    first = identity.load_or_create(paths, None, NOW)
    paths.key_file.unlink()
    paths.cert_file.unlink()
    with caplog.at_level(logging.WARNING, logger="agent.identity.keys"):
        second = identity.load_or_create(paths, None, NOW)
    assert second.device_id == first.device_id
    assert second.fingerprint != first.fingerprint
    assert identity.fingerprint_of_cert(second.cert_der) == second.fingerprint
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "agent.identity.keys"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "key change" in message
    assert first.device_id in message
    assert mode(paths.key_file) == 0o600


def test_first_use_does_not_warn(
    paths: Paths, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("agent"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="agent.identity.keys"):
        identity.load_or_create(paths, None, NOW)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_key_present_but_device_id_missing_is_an_identity_error(paths: Paths) -> None:
    identity.load_or_create(paths, None, NOW)
    paths.device_id_file.unlink()
    with pytest.raises(IdentityError, match="device_id"):
        identity.load_or_create(paths, None, NOW)


@pytest.mark.parametrize("content", [b"", b"not-an-id\n", b"abcdefghijklmnopqrstuvwxyzabcdef", b"\xff\xfe"])
def test_a_damaged_device_id_is_an_identity_error(paths: Paths, content: bytes) -> None:
    identity.load_or_create(paths, None, NOW)
    paths.device_id_file.write_bytes(content)
    with pytest.raises(IdentityError, match="device"):
        identity.load_or_create(paths, None, NOW)


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_a_key_others_can_read_or_write_is_refused(paths: Paths, loose: int) -> None:
    identity.load_or_create(paths, None, NOW)
    paths.key_file.chmod(loose)
    with pytest.raises(InsecureKeyError) as info:
        identity.load_or_create(paths, None, NOW)
    message = str(info.value)
    assert str(paths.key_file) in message
    assert f"{loose:04o}" in message
    assert f"chmod 600 {paths.key_file}" in message
    assert isinstance(info.value, UserError), "the CLI shows it as a one-line user error"
    # Refused, not repaired behind the user's back.
    assert mode(paths.key_file) == loose


def test_check_private_refuses_a_directory_others_can_enter(paths: Paths) -> None:
    identity.load_or_create(paths, None, NOW)
    paths.identity_dir.chmod(0o755)
    with pytest.raises(InsecureKeyError, match=rf"directory .*0755.*chmod 700 {re.escape(str(paths.identity_dir))}"):
        identity.check_private(paths.key_file)


def test_load_tightens_a_loose_key_directory_before_checking(paths: Paths) -> None:
    # `Paths.ensure` repairs directory modes (documented); the key file itself is only refused.
    first = identity.load_or_create(paths, None, NOW)
    paths.identity_dir.chmod(0o755)
    assert identity.load_or_create(paths, None, NOW).fingerprint == first.fingerprint
    assert mode(paths.identity_dir) == 0o700


def test_a_corrupt_key_file_is_an_identity_error(paths: Paths) -> None:
    identity.load_or_create(paths, None, NOW)
    paths.key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    with pytest.raises(IdentityError, match="cannot load private key"):
        identity.load_or_create(paths, None, NOW)


def test_a_key_on_another_curve_is_an_identity_error(paths: Paths) -> None:
    identity.load_or_create(paths, None, NOW)
    other = ec.generate_private_key(ec.SECP384R1())
    pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    paths.key_file.write_bytes(pem)
    with pytest.raises(IdentityError, match="P-256"):
        identity.load_or_create(paths, None, NOW)


def test_load_certificate_refuses_junk_and_other_curves() -> None:
    with pytest.raises(IdentityError):
        identity.load_certificate(b"junk")
    key = ec.generate_private_key(ec.SECP384R1())
    cert = identity.make_certificate(key, "X" * 32, NOW)
    with pytest.raises(IdentityError, match="P-256"):
        identity.load_certificate(cert.public_bytes(serialization.Encoding.DER))


def test_identity_repr_never_shows_the_key(paths: Paths) -> None:
    ident = identity.load_or_create(paths, None, NOW)
    text = repr(ident)
    assert ident.device_id in text
    assert "PRIVATE" not in text
    assert ident.key_pem().decode() not in text


def test_signatures_verify_only_with_the_right_key_and_data(paths: Paths) -> None:
    ident = identity.load_or_create(paths, None, NOW)
    sig = ident.sign(b"tofu-agent/v1/test")
    public = identity.public_key_of_cert(ident.cert_der)
    assert identity.verify_signature(public, sig, b"tofu-agent/v1/test")
    assert not identity.verify_signature(public, sig, b"tofu-agent/v1/other")
    assert not identity.verify_signature(public, b"junk", b"tofu-agent/v1/test")
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert not identity.verify_signature(stranger, sig, b"tofu-agent/v1/test")
