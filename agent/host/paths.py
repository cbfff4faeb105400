"""Where config, keys, databases and the control socket live (platformdirs, or all under `--home`)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from agent.errors import ConfigError

APP = "tofu-agent"
HOME_ENV = "TOFU_AGENT_HOME"
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True, slots=True)
class Paths:
    """The directories one agent uses; `home` is set when they all live under one directory."""

    config_dir: Path
    data_dir: Path
    runtime_dir: Path
    home: Path | None = None

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def identity_dir(self) -> Path:
        return self.data_dir / "identity"

    @property
    def key_file(self) -> Path:
        return self.identity_dir / "key.pem"

    @property
    def cert_file(self) -> Path:
        return self.identity_dir / "cert.pem"

    @property
    def device_id_file(self) -> Path:
        # Kept beside, not inside, the key files: deleting the key keeps the device id.
        return self.data_dir / "device_id"

    @property
    def rotations_file(self) -> Path:
        return self.identity_dir / "rotations.json"

    @property
    def trust_db(self) -> Path:
        return self.data_dir / "trust.db"

    @property
    def index_db(self) -> Path:
        return self.data_dir / "index.db"

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    @property
    def default_folder(self) -> Path:
        if self.home is not None:
            return self.home / "folder"
        return Path.home() / "TofuSync"

    def ensure(self) -> None:
        """Create the directories with mode 0700 and tighten any that are looser."""
        for d in (self.config_dir, self.data_dir, self.runtime_dir, self.identity_dir):
            ensure_private_dir(d)
        if len(os.fsencode(self.control_socket)) > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"control socket path is too long for a Unix socket ({self.control_socket}); use a shorter --home"
            )


def ensure_private_dir(d: Path) -> None:
    """Make `d` (and parents) exist, owned by us, with mode 0700.

    :raises ConfigError: the directory cannot be made (a file is in the way, no permission).
    """
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if d.stat().st_mode & 0o077:
            d.chmod(0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create directory {d}: {exc.strerror or exc}") from exc


def resolve_paths(home: str | os.PathLike[str] | None = None) -> Paths:
    """Paths for `--home` if given, else `$TOFU_AGENT_HOME`, else the XDG defaults.

    :raises ConfigError: `--home` is the empty string (which must not fall back to the real home).
    """
    if home is not None and not os.fspath(home):
        raise ConfigError("--home needs a directory")
    chosen = os.fspath(home) if home is not None else os.environ.get(HOME_ENV) or None
    if chosen:
        root = Path(chosen).expanduser().absolute()
        return Paths(config_dir=root / "config", data_dir=root / "data", runtime_dir=root / "run", home=root)
    runtime = platformdirs.user_runtime_dir(APP)
    return Paths(
        config_dir=Path(platformdirs.user_config_dir(APP)),
        data_dir=Path(platformdirs.user_data_dir(APP)),
        runtime_dir=Path(runtime),
    )


def write_private_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically write `data` to `path` with `mode`: temp file, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
