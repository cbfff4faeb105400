"""`config.toml`: schema, defaults and validation with messages a user can act on (pure)."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.identity.ids import is_device_id
from agent.trust.anomaly import AnomalyCode, AnomalyConfig
from agent.trust.model import DeviceRecord, TrustPolicy

DEFAULT_PORT = 39001
DEFAULT_UI_PORT = 39080
HOUSEHOLD = "household"  # `devices = "household"`: every `tofu`/`verified` device
MIN_PREFIX = 8  # a device id prefix in a folder's `devices` names one device only from 8 characters
FOLDER_TYPES = ("sendreceive", "sendonly", "receiveonly")
VERSIONING = ("trash", "simple", "staggered", "off")  # agent.sync.versioning.Kind's values


@dataclass(frozen=True, slots=True)
class FolderConfig:
    """One shared folder: devices sync a folder when both have one with the same id and share it
    with each other. `devices` lists who it is shared with (device ids, unique id prefixes of at
    least 8 characters, or names); None is `"household"`: every `tofu`/`verified` device."""

    id: str
    path: Path
    devices: tuple[str, ...] | None = None
    type: str = "sendreceive"  # sendonly: remote changes not applied; receiveonly: local ones not sent
    versioning: str = "trash"  # what a peer's change deletes or replaces is kept (agent.sync.versioning)
    keep_days: float = 30.0  # trash: days a version is kept
    keep: int = 5  # simple: versions kept of each file
    paused: bool = False  # no data moves; connections and trust stay


def resolve_devices(entries: Iterable[str], records: Iterable[DeviceRecord]) -> frozenset[str]:
    """The device ids a folder's `devices` entries name, against the trust store's records now.

    An entry is a device id (taken as it is), a prefix of at least 8 characters that matches
    exactly one `tofu`/`verified` device, or the name of exactly one such device. An entry that
    matches several devices names none of them: sharing fails closed.
    """
    trusted = [r for r in records if r.trust.may_sync]
    found: set[str] = set()
    for entry in entries:
        if any(r.device_id == entry for r in trusted) or is_device_id(entry):
            found.add(entry)
            continue
        by_prefix = [r.device_id for r in trusted if len(entry) >= MIN_PREFIX and r.device_id.startswith(entry)]
        by_name = [r.device_id for r in trusted if r.name == entry]
        matches = set(by_prefix) if by_prefix else set(by_name)
        if len(matches) == 1:
            found |= matches
    return frozenset(found)


@dataclass(frozen=True, slots=True)
class Config:
    """Everything `tofu-agent run` can be told, from config.toml and then the command line."""

    name: str | None = None
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"  # noqa: S104 - a LAN agent listens on the LAN by design
    peers: tuple[tuple[str, int], ...] = ()
    mdns: bool = True
    trust_policy: TrustPolicy = TrustPolicy.WINDOW
    folders: tuple[FolderConfig, ...] = ()
    paused_devices: frozenset[str] = frozenset()  # device ids no folder data moves with (trust stays)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    keepalive_idle: float = 15.0
    keepalive_timeout: float = 10.0
    ui_enabled: bool = True  # [ui] enabled: the Trusted Devices page on loopback
    ui_port: int = DEFAULT_UI_PORT  # [ui] port (0 = any free port)
    notify_enabled: bool = True  # [notify] enabled: desktop notifications over the session D-Bus

    def with_overrides(self, **changes: Any) -> Config:
        """A copy with the options the command line set (None means not set)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def parse_peer(text: str) -> tuple[str, int]:
    """Parse `HOST:PORT` (or `[V6]:PORT`); ConfigError if it is not one."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ConfigError(f"peer {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, _port(port_text, f"peer {text!r}")


def _port(value: object, what: str, *, allow_zero: bool = False) -> int:
    try:
        port: int = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: port must be a number, got {value!r}") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ConfigError(f"{what}: port {port} is out of range")
    return port


def _expect(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a port (or a timeout) of `true` is a mistake worth naming.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}: `{key}` must be {names}, got {value!r}")
    return value


def _only(data: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s): {', '.join(unknown)}")


def from_mapping(data: Mapping[str, Any], base_dir: Path, default_folder: Path) -> Config:
    """Validate a parsed config.toml; relative folder paths are taken from `base_dir`."""
    where = "config.toml"
    known = {
        "name",
        "port",
        "bind",
        "peers",
        "mdns",
        "trust_policy",
        "folder",
        "paused_devices",
        "anomaly",
        "keepalive_idle",
        "keepalive_timeout",
        "ui",
        "notify",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s): {', '.join(unknown)}")
    cfg = Config()
    changes: dict[str, Any] = {}
    if "name" in data:
        changes["name"] = _expect(data, "name", str, where)
    if "port" in data:
        changes["port"] = _port(_expect(data, "port", int, where), where, allow_zero=True)
    if "bind" in data:
        changes["bind"] = _expect(data, "bind", str, where)
    if "peers" in data:
        peers = _expect(data, "peers", list, where)
        changes["peers"] = tuple(parse_peer(str(p)) for p in peers)
    if "mdns" in data:
        changes["mdns"] = _expect(data, "mdns", bool, where)
    if "trust_policy" in data:
        changes["trust_policy"] = parse_policy(_expect(data, "trust_policy", str, where))
    for key in ("keepalive_idle", "keepalive_timeout"):
        if key in data:
            value = float(_expect(data, key, (int, float), where))
            if not 0.5 <= value <= 3600:
                raise ConfigError(f"{where}: `{key}` must be between 0.5 and 3600 seconds")
            changes[key] = value
    if "anomaly" in data:
        changes["anomaly"] = _anomaly(_expect(data, "anomaly", dict, where))
    if "ui" in data:
        ui = _expect(data, "ui", dict, where)
        _only(ui, {"enabled", "port"}, "config.toml [ui]")
        if "enabled" in ui:
            changes["ui_enabled"] = _expect(ui, "enabled", bool, "config.toml [ui]")
        if "port" in ui:
            changes["ui_port"] = _port(
                _expect(ui, "port", int, "config.toml [ui]"), "config.toml [ui]", allow_zero=True
            )
    if "notify" in data:
        notify = _expect(data, "notify", dict, where)
        _only(notify, {"enabled"}, "config.toml [notify]")
        if "enabled" in notify:
            changes["notify_enabled"] = _expect(notify, "enabled", bool, "config.toml [notify]")
    if "paused_devices" in data:
        ids = _expect(data, "paused_devices", list, where)
        if not all(isinstance(d, str) and is_device_id(d) for d in ids):
            raise ConfigError(f"{where}: `paused_devices` must be a list of device ids")
        changes["paused_devices"] = frozenset(ids)
    if "folder" in data:
        changes["folders"] = _folders(_expect(data, "folder", list, where), base_dir)
    else:
        changes["folders"] = (FolderConfig("default", default_folder),)
    return replace(cfg, **changes)


def parse_policy(text: str) -> TrustPolicy:
    """Parse a trust policy name; ConfigError lists the valid ones."""
    try:
        return TrustPolicy(text)
    except ValueError:
        valid = ", ".join(p.value for p in TrustPolicy)
        raise ConfigError(f"trust_policy must be one of {valid}; got {text!r}") from None


def _anomaly(data: Mapping[str, Any]) -> AnomalyConfig:
    where = "config.toml [anomaly]"
    known = {"repeated_key_change_threshold", "window_hours", "block_on"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s): {', '.join(unknown)}")
    cfg = AnomalyConfig()
    if "repeated_key_change_threshold" in data:
        n = _expect(data, "repeated_key_change_threshold", int, where)
        if n < 2:
            raise ConfigError(f"{where}: repeated_key_change_threshold must be at least 2")
        cfg = replace(cfg, repeated_key_change_threshold=n)
    if "window_hours" in data:
        hours = float(_expect(data, "window_hours", (int, float), where))
        if not 0 < hours < float("inf"):  # also refuses nan
            raise ConfigError(f"{where}: window_hours must be a positive number")
        cfg = replace(cfg, window_seconds=hours * 3600.0)
    if "block_on" in data:
        codes = _expect(data, "block_on", list, where)
        valid = {c.value for c in AnomalyCode}
        if not all(isinstance(c, str) for c in codes):
            raise ConfigError(f"{where}: block_on must be a list of anomaly codes")
        unknown = sorted(set(codes) - valid)
        if unknown:
            raise ConfigError(f"{where}: unknown anomaly code(s) in block_on: {', '.join(unknown)}")
        cfg = replace(cfg, block_on=frozenset(codes))
    return cfg


def _folders(items: list[Any], base_dir: Path) -> tuple[FolderConfig, ...]:
    folders: list[FolderConfig] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"config.toml [[folder]] #{i + 1}"
        if not isinstance(item, dict) or "id" not in item or "path" not in item:
            raise ConfigError(f"{where}: needs `id` and `path`")
        folder_id = _expect(item, "id", str, where)
        if not folder_id or len(folder_id) > 64 or not folder_id.isprintable():
            raise ConfigError(f"{where}: `id` must be 1-64 printable characters")
        if folder_id in seen:
            raise ConfigError(f"{where}: folder id {folder_id!r} is used twice")
        seen.add(folder_id)
        unknown = sorted(set(item) - {"id", "path", "devices", "type", "versioning", "keep_days", "keep", "paused"})
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s): {', '.join(unknown)}")
        text = _expect(item, "path", str, where)
        if not text.strip():
            raise ConfigError(f"{where}: `path` is empty")
        path = Path(text).expanduser()
        devices = _devices(item["devices"], where) if "devices" in item else None
        folder = FolderConfig(folder_id, path if path.is_absolute() else base_dir / path, devices)
        folders.append(_folder_options(folder, item, where))
    return tuple(folders)


def _folder_options(folder: FolderConfig, item: Mapping[str, Any], where: str) -> FolderConfig:
    """`folder` with its type, versioning and pause settings from `item`, checked."""
    changes: dict[str, Any] = {}
    for key, allowed in (("type", FOLDER_TYPES), ("versioning", VERSIONING)):
        if key in item:
            value = _expect(item, key, str, where)
            if value not in allowed:
                raise ConfigError(f"{where}: `{key}` must be one of {', '.join(allowed)}, got {value!r}")
            changes[key] = value
    if "keep_days" in item:
        days = _expect(item, "keep_days", (int, float), where)
        if not 0 < days <= 36500:
            raise ConfigError(f"{where}: `keep_days` must be a positive number of days, at most 36500")
        changes["keep_days"] = float(days)
    if "keep" in item:
        keep = _expect(item, "keep", int, where)
        if not 1 <= keep <= 1000:
            raise ConfigError(f"{where}: `keep` must be a number of versions from 1 to 1000")
        changes["keep"] = keep
    if "paused" in item:
        changes["paused"] = _expect(item, "paused", bool, where)
    return replace(folder, **changes)


def _devices(value: object, where: str) -> tuple[str, ...] | None:
    if value == HOUSEHOLD:
        return None
    if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
        raise ConfigError(f'{where}: `devices` must be a list of device ids or names, or "{HOUSEHOLD}"')
    entries: list[str] = []
    for d in value:
        d = d.strip()
        if not d or len(d) > 64 or not d.isprintable():
            raise ConfigError(f"{where}: device {d!r} in `devices` must be 1-64 printable characters")
        if d not in entries:
            entries.append(d)
    return tuple(entries)


def load(path: Path, default_folder: Path) -> Config:
    """Read config.toml at `path`; a missing file means all defaults."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return from_mapping({}, path.parent, default_folder)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return from_mapping(data, path.parent, default_folder)
