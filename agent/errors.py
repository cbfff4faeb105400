"""The error tree: one root, user errors, local state errors, and protocol errors with wire codes.

Theory: every layer raises from this tree and translates foreign exceptions at its boundary
(`raise ConnectionLost(...) from exc`). Protocol errors carry an `ErrorCode` that is sent to the
peer in an ERROR message before the connection closes; `RemoteProtocolError` means the peer broke
the protocol, `LocalProtocolError` means we were asked to do something the protocol forbids.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Reason codes sent on the wire in ERROR messages and shown to users."""

    PROTOCOL_ERROR = "protocol_error"
    MALFORMED = "malformed"
    FRAME_TOO_LARGE = "frame_too_large"
    UNEXPECTED_MESSAGE = "unexpected_message"
    VERSION_MISMATCH = "version_mismatch"
    AUTH_FAILED = "auth_failed"
    CERT_MISMATCH = "cert_mismatch"
    SELF_CONNECTION = "self_connection"
    DUPLICATE_CONNECTION = "duplicate_connection"
    KEY_CHANGED = "key_changed"
    REVOKED = "revoked"
    PENDING = "pending"
    NOT_TRUSTED = "not_trusted"
    TIMEOUT = "timeout"
    SHUTTING_DOWN = "shutting_down"
    REKEY = "rekey"  # we rotated our key; reconnect to see the new one
    BAD_PATH = "bad_path"
    BAD_BLOCK = "bad_block"
    LIMIT_EXCEEDED = "limit_exceeded"
    INTERNAL_ERROR = "internal_error"


class TofuError(Exception):
    """Root of every error this project raises on purpose."""


class UserError(TofuError):
    """A mistake a user can fix: the CLI prints the message on one line and exits 1."""


class ConfigError(UserError):
    """`config.toml` or a command-line option is invalid."""


class UnknownDeviceError(UserError):
    """No known device matches the id or prefix given."""


class AmbiguousDeviceError(UserError):
    """More than one known device matches the prefix given."""


class IdentityError(TofuError):
    """This device's own key, certificate or device id cannot be used."""


class InsecureKeyError(IdentityError, UserError):
    """The private key file or its directory can be read by other users."""


class TrustStoreError(TofuError):
    """The trust store could not be read or written."""


class ConnectionLost(TofuError):
    """The transport under a connection closed or failed."""


class ProtocolError(TofuError):
    """A protocol rule was broken; `code` is the wire reason."""

    code: ErrorCode = ErrorCode.PROTOCOL_ERROR

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug or a misuse of the API)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; close its connection with `code`."""
