"""Keys, certificates, fingerprints and signatures as pure functions: bytes in, values out, no disk.

The fingerprint is SHA-256 over the DER SubjectPublicKeyInfo, so renewing the certificate with the
same key keeps it. `Identity` holds this device's key in memory; `keys.py` loads and stores it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import IdentityError

CERT_VALIDITY = dt.timedelta(days=365)
# Renew this long before expiry, so a machine that sleeps for weeks still wakes with a valid cert.
CERT_RENEW_BEFORE = dt.timedelta(days=30)


def fingerprint_of_public_key(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, as 64 lower-case hex characters."""
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def load_certificate(cert_der: bytes) -> x509.Certificate:
    """Parse a DER certificate whose key is ECDSA P-256; IdentityError otherwise."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        key = cert.public_key()
    except Exception as exc:
        # cryptography raises ValueError, UnsupportedAlgorithm, InvalidVersion ... for bad DER;
        # this is peer input, so any failure to parse is "not a usable certificate".
        raise IdentityError(f"not a usable certificate: {type(exc).__name__}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise IdentityError("certificate key is not ECDSA P-256")
    return cert


def public_key_of_cert(cert_der: bytes) -> ec.EllipticCurvePublicKey:
    """The P-256 public key in a DER certificate; IdentityError if there is none."""
    key = load_certificate(cert_der).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # checked in load_certificate
    return key


def fingerprint_of_cert(cert_der: bytes) -> str:
    """Fingerprint of the key inside a DER certificate; IdentityError if it cannot be parsed."""
    return fingerprint_of_public_key(public_key_of_cert(cert_der))


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-SHA256 signature (DER) of `data`."""
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify_signature(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    """True if `signature` is a valid ECDSA-SHA256 signature of `data` by `key`."""
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def make_certificate(key: ec.EllipticCurvePrivateKey, device_id: str, now: dt.datetime) -> x509.Certificate:
    """A self-signed certificate for `key`, valid from an hour before `now` for CERT_VALIDITY."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tofu-agent {device_id}")])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # An hour of slack for peers whose clocks run a little behind ours.
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def needs_renewal(cert: x509.Certificate, now: dt.datetime) -> bool:
    """True if `cert` expires within CERT_RENEW_BEFORE of `now` (or is not yet valid)."""
    return cert.not_valid_after_utc - now < CERT_RENEW_BEFORE or cert.not_valid_before_utc > now


@dataclass(frozen=True, slots=True)
class Identity:
    """This device's key, certificate and ids. The private key never leaves this object."""

    device_id: str
    name: str
    key: ec.EllipticCurvePrivateKey
    cert_der: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint_of_public_key(self.key.public_key())

    @property
    def cert_pem(self) -> bytes:
        return x509.load_der_x509_certificate(self.cert_der).public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (for the TLS context only)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        """Sign `data` with this device's key."""
        return sign(self.key, data)

    def __repr__(self) -> str:  # never show the key, even in a traceback
        return f"Identity(device_id={self.device_id!r}, name={self.name!r}, fp={self.fingerprint[:16]}...)"


def length_prefixed(*fields: bytes) -> bytes:
    """`fields` joined, each after its 2-byte big-endian length: what we sign, so that no two
    different statements share bytes."""
    return b"".join(len(f).to_bytes(2, "big") + f for f in fields)
