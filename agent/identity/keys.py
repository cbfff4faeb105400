"""This device's identity on disk: the key file (0600 in a 0700 directory), the certificate,
the device id and the rotation statements; `load_or_create` is the edge the agent starts from.

The pure parts (fingerprints, signatures, certificate parsing, `Identity`) are in `crypto.py`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import IdentityError, InsecureKeyError
from agent.host.paths import Paths, write_private_file
from agent.identity import rotation
from agent.identity.crypto import (
    CERT_RENEW_BEFORE,
    CERT_VALIDITY,
    Identity,
    fingerprint_of_cert,
    fingerprint_of_public_key,
    load_certificate,
    make_certificate,
    needs_renewal,
    public_key_of_cert,
    sign,
    verify_signature,
)
from agent.identity.ids import (
    DEVICE_ID_BYTES,
    MAX_NAME_LEN,
    clean_name,
    format_fingerprint,
    is_device_id,
    is_fingerprint,
    new_device_id,
    parse_fingerprint,
)

log = logging.getLogger(__name__)

__all__ = [
    "CERT_RENEW_BEFORE",
    "CERT_VALIDITY",
    "DEVICE_ID_BYTES",
    "MAX_NAME_LEN",
    "Identity",
    "clean_name",
    "fingerprint_of_cert",
    "fingerprint_of_public_key",
    "format_fingerprint",
    "is_device_id",
    "is_fingerprint",
    "load_certificate",
    "make_certificate",
    "needs_renewal",
    "new_device_id",
    "parse_fingerprint",
    "public_key_of_cert",
    "sign",
    "verify_signature",
    "write_private_file",
]


def default_name() -> str:
    """The host name, which is what people call their machines."""
    return clean_name(socket.gethostname() or "unnamed")


def check_private(path: Path) -> None:
    """Refuse a secret file (or its directory) that other users can read or write."""
    for p in (path, path.parent):
        st = p.stat()
        if st.st_mode & 0o077:
            kind = "directory" if stat.S_ISDIR(st.st_mode) else "private key file"
            raise InsecureKeyError(
                f"{kind} {p} is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"refusing to use it. Fix with: chmod {'700' if kind == 'directory' else '600'} {p}"
            )
        if st.st_uid != os.getuid():
            raise InsecureKeyError(f"{p} is owned by another user (uid {st.st_uid}); refusing to use it")


def _load_device_id(paths: Paths) -> str | None:
    try:
        text = paths.device_id_file.read_text("ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read device id {paths.device_id_file}: {exc}") from exc
    if not is_device_id(text):
        raise IdentityError(f"{paths.device_id_file} does not hold a device id")
    return text


def _load_key(paths: Paths) -> ec.EllipticCurvePrivateKey:
    check_private(paths.key_file)
    try:
        key = serialization.load_pem_private_key(paths.key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IdentityError(f"cannot load private key {paths.key_file}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise IdentityError(f"{paths.key_file} is not an ECDSA P-256 key")
    return key


def _store_key(paths: Paths, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private_file(paths.key_file, pem, 0o600)


def _store_cert(paths: Paths, cert: x509.Certificate) -> None:
    write_private_file(paths.cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def load_or_create(paths: Paths, name: str | None, now: dt.datetime) -> Identity:
    """Load this device's identity, creating what is missing and renewing an expiring certificate.

    :raises InsecureKeyError: the key file or its directory is readable by others.
    :raises IdentityError: a file exists but cannot be used.
    """
    paths.ensure()
    device_id = _load_device_id(paths)
    existing_id = device_id is not None
    have_key = paths.key_file.exists()
    if device_id is None:
        if have_key:
            raise IdentityError(
                f"{paths.key_file} exists but {paths.device_id_file} is missing; "
                "restore the device id or remove the key to start as a new device"
            )
        device_id = new_device_id()
        write_private_file(paths.device_id_file, (device_id + "\n").encode("ascii"), 0o600)
        log.info("created device id %s", device_id)
    if have_key:
        key = _load_key(paths)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        _store_key(paths, key)
        if paths.cert_file.exists():
            paths.cert_file.unlink()
        if existing_id:
            # The id outlived its key (a reinstall, a restored backup, or a test playing an
            # impersonator): any peer that met this device has the old key pinned.
            log.warning(
                "generated a NEW key for existing device %s: peers that pinned the old key will "
                "see a key change and refuse this device until they run `tofu-agent trust retrust %s`",
                device_id,
                device_id,
            )
        else:
            log.info("generated a new ECDSA P-256 key for device %s", device_id)
    cert = _load_or_renew_cert(paths, key, device_id, now)
    return Identity(
        device_id=device_id,
        name=clean_name(name) if name else default_name(),
        key=key,
        cert_der=cert.public_bytes(serialization.Encoding.DER),
    )


def _load_or_renew_cert(
    paths: Paths, key: ec.EllipticCurvePrivateKey, device_id: str, now: dt.datetime
) -> x509.Certificate:
    cert: x509.Certificate | None = None
    if paths.cert_file.exists():
        try:
            cert = x509.load_pem_x509_certificate(paths.cert_file.read_bytes())
        except ValueError:
            log.warning("certificate %s is unreadable; making a new one for the same key", paths.cert_file)
            cert = None
    if cert is not None and fingerprint_of_public_key(cert.public_key()) != fingerprint_of_public_key(  # type: ignore[arg-type]
        key.public_key()
    ):
        log.warning("certificate %s does not match the private key; making a new one", paths.cert_file)
        cert = None
    if cert is None or needs_renewal(cert, now):
        if cert is not None:
            log.info("renewing certificate (same key, same fingerprint)")
        cert = make_certificate(key, device_id, now)
        _store_cert(paths, cert)
    return cert


def replace_key(paths: Paths, key: ec.EllipticCurvePrivateKey, device_id: str, now: dt.datetime) -> bytes:
    """Store `key` as this device's key with a fresh certificate; returns the certificate DER."""
    cert = make_certificate(key, device_id, now)
    # Certificate first: a crash between the two leaves a cert that does not match the key, which
    # load_or_create detects and repairs; the reverse order would too, but this keeps the key last.
    _store_cert(paths, cert)
    _store_key(paths, key)
    return cert.public_bytes(serialization.Encoding.DER)


# -- key rotation ---------------------------------------------------------------------------------

# The newest statements we keep and offer in HELLO: 12 x ~440 bytes stays well inside the 8 KiB
# pre-authentication frame next to the certificate.
MAX_KEPT_ROTATIONS = 12


def load_rotations(paths: Paths) -> list[bytes]:
    """The rotation statements this device has made, oldest first (encoded, opaque)."""
    try:
        doc = json.loads(paths.rotations_file.read_text("utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning(
            "cannot read %s (%s); peers that missed a rotation will see a key change", paths.rotations_file, exc
        )
        return []
    items = doc.get("statements", []) if isinstance(doc, dict) else []
    out = []
    for item in items:
        try:
            out.append(bytes.fromhex(item))
        except (TypeError, ValueError):
            continue
    return out[-MAX_KEPT_ROTATIONS:]


def rotate(paths: Paths, current: Identity, now: dt.datetime) -> Identity:
    """Make a new key, sign a rotation statement for it with the current key, and switch to it.

    The statement is stored before the key is replaced: a crash in between leaves a statement
    naming a key nobody will ever prove, which peers ignore, and the old key still in place.
    """
    new_key = ec.generate_private_key(ec.SECP256R1())
    statement = rotation.make_statement(current.key, new_key.public_key(), current.device_id, int(now.timestamp()))
    kept = [*load_rotations(paths), rotation.encode(statement)][-MAX_KEPT_ROTATIONS:]
    doc = {"version": 1, "statements": [s.hex() for s in kept]}
    write_private_file(paths.rotations_file, (json.dumps(doc, indent=1) + "\n").encode("utf-8"), 0o600)
    cert_der = replace_key(paths, new_key, current.device_id, now)
    log.warning(
        "rotated this device's key: %s -> %s; peers that pinned the old key follow the signed statement",
        format_fingerprint(current.fingerprint),
        format_fingerprint(fingerprint_of_public_key(new_key.public_key())),
    )
    return Identity(device_id=current.device_id, name=current.name, key=new_key, cert_der=cert_der)
