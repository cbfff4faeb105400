"""Changing which folders this machine syncs, and with whom, in `config.toml`.

`tofu-agent folder accept|share|unshare` and the web page's Accept button edit the `[[folder]]`
tables with tomlkit, so a person's comments and layout stay as they were; the new text is
validated as a whole (`agent.config.from_mapping`) before it replaces the file atomically. The
running agent is then told (`folders_changed`) and applies it at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.items
from tomlkit.toml_document import TOMLDocument

from agent import config
from agent.errors import ConfigError, UserError
from agent.host.paths import Paths, write_private_file
from agent.trust.model import DeviceRecord


def default_path(paths: Paths, folder_id: str) -> Path:
    """Where an accepted folder goes without a PATH: ~/TofuSync-ID, or HOME/ID under --home."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", folder_id).lstrip(".") or "folder"
    return paths.home / safe if paths.home is not None else Path.home() / f"TofuSync-{safe}"


def _read(paths: Paths) -> TOMLDocument:
    try:
        text = paths.config_file.read_text("utf-8")
    except FileNotFoundError:
        return tomlkit.document()
    except OSError as exc:
        raise ConfigError(f"cannot read {paths.config_file}: {exc.strerror}") from exc
    try:
        return tomlkit.parse(text)
    except Exception as exc:  # tomlkit's parse errors have no common public base
        raise ConfigError(f"{paths.config_file} is not valid TOML: {exc}") from exc


def _write(paths: Paths, doc: TOMLDocument) -> config.Config:
    """Validate `doc` as a whole, then replace config.toml with it atomically (its mode kept)."""
    cfg = config.from_mapping(doc.unwrap(), paths.config_file.parent, paths.default_folder)
    _check_overlaps(cfg.folders, paths.data_dir)
    paths.config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        mode = paths.config_file.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    write_private_file(paths.config_file, tomlkit.dumps(doc).encode("utf-8"), mode)
    return cfg


def _check_overlaps(folders: Sequence[config.FolderConfig], data_dir: Path) -> None:
    data = data_dir.resolve()
    roots: list[tuple[str, Path]] = []
    for f in folders:
        real = f.path.resolve()
        if f.path.exists() and not f.path.is_dir():
            raise ConfigError(f"folder {f.id!r}: {f.path} is not a directory")
        if real == data or real in data.parents or data in real.parents:
            raise ConfigError(f"folder {f.id!r}: {f.path} overlaps the agent's data directory {data_dir}")
        for other_id, other in roots:
            if real == other or real in other.parents or other in real.parents:
                raise ConfigError(f"folders {other_id!r} and {f.id!r} overlap ({other} and {real})")
        roots.append((f.id, real))


def _tables(paths: Paths, doc: TOMLDocument) -> list[Any]:
    """The `[[folder]]` tables of `doc`. A config without any gets the implicit default folder
    written out first: adding a table must not make it disappear."""
    if "folder" not in doc:
        default = tomlkit.table()
        default["id"] = "default"
        default["path"] = str(paths.default_folder) if paths.home is not None else "~/TofuSync"
        aot = tomlkit.aot()
        aot.append(default)
        doc.append("folder", aot)
    tables = doc["folder"]
    if not isinstance(tables, list):
        raise ConfigError(f"{paths.config_file}: `folder` must be [[folder]] tables")
    return tables


def _find(tables: list[Any], folder_id: str) -> Any | None:
    return next((t for t in tables if isinstance(t, dict) and t.get("id") == folder_id), None)


def _array(items: Sequence[str]) -> tomlkit.items.Array:
    arr = tomlkit.array()
    arr.extend(items)
    return arr


def accept(paths: Paths, folder_id: str, devices: Sequence[str], path: Path | None) -> config.FolderConfig:
    """Add folder `folder_id` at `path` (default: `default_path`), shared with `devices` (ids).

    :raises UserError: the folder is configured already, or the result is not a valid config.
    """
    doc = _read(paths)
    tables = _tables(paths, doc)
    if _find(tables, folder_id) is not None:
        raise UserError(f"folder {folder_id!r} is configured already: share it with `tofu-agent folder share`")
    target = (path or default_path(paths, folder_id)).expanduser().absolute()
    table = tomlkit.table()
    table["id"] = folder_id
    table["path"] = str(target)
    table["devices"] = _array(list(dict.fromkeys(devices)))
    if isinstance(tables, tomlkit.items.AoT):
        tables.append(table)
    else:  # `folder = [{...}]`: an array of inline tables
        inline = tomlkit.inline_table()
        inline.update(table.unwrap())
        tables.append(inline)
    cfg = _write(paths, doc)
    return next(f for f in cfg.folders if f.id == folder_id)


def change_devices(
    paths: Paths, folder_id: str, change: Callable[[tuple[str, ...] | None], tuple[str, ...]]
) -> config.FolderConfig:
    """Replace folder `folder_id`'s device list with `change(old)` (old None: household)."""
    doc = _read(paths)
    table = _find(_tables(paths, doc), folder_id)
    if table is None:
        raise UserError(f"no folder {folder_id!r} in {paths.config_file} (see `tofu-agent folders`)")
    old = config.from_mapping(doc.unwrap(), paths.config_file.parent, paths.default_folder)
    current = next(f for f in old.folders if f.id == folder_id)
    table["devices"] = _array(change(current.devices))
    cfg = _write(paths, doc)
    return next(f for f in cfg.folders if f.id == folder_id)


def share(paths: Paths, folder_id: str, device_id: str) -> config.FolderConfig:
    """Share `folder_id` with `device_id` too (a household folder is shared with it already)."""
    doc_cfg = config.load(paths.config_file, paths.default_folder)
    current = next((f for f in doc_cfg.folders if f.id == folder_id), None)
    if current is not None and current.devices is None:
        return current
    return change_devices(paths, folder_id, lambda old: (*(old or ()), device_id))


def unshare(paths: Paths, folder_id: str, device: DeviceRecord, records: Sequence[DeviceRecord]) -> config.FolderConfig:
    """Stop sharing `folder_id` with `device`. A household folder becomes an explicit list of
    every other `tofu`/`verified` device."""

    def without(old: tuple[str, ...] | None) -> tuple[str, ...]:
        if old is None:
            return tuple(r.device_id for r in records if r.trust.may_sync and r.device_id != device.device_id)
        return tuple(
            e
            for e in old
            if e != device.device_id and e != device.name and not (len(e) >= 8 and device.device_id.startswith(e))
        )

    return change_devices(paths, folder_id, without)


def set_paused(paths: Paths, folder_id: str, paused: bool) -> config.FolderConfig:
    """Pause (no data moves) or resume folder `folder_id` (`paused = true` in its table)."""
    doc = _read(paths)
    table = _find(_tables(paths, doc), folder_id)
    if table is None:
        raise UserError(f"no folder {folder_id!r} in {paths.config_file} (see `tofu-agent folders`)")
    if paused:
        table["paused"] = True
    elif "paused" in table:
        del table["paused"]
    cfg = _write(paths, doc)
    return next(f for f in cfg.folders if f.id == folder_id)


def set_device_paused(paths: Paths, device_id: str, paused: bool) -> config.Config:
    """Pause (no folder data moves; the connection and trust stay) or resume a device."""
    doc = _read(paths)
    current = doc.get("paused_devices")
    ids = [str(d) for d in current] if isinstance(current, list) else []
    ids = [d for d in ids if d != device_id] + ([device_id] if paused else [])
    if ids:
        doc["paused_devices"] = _array(ids)
    elif "paused_devices" in doc:
        del doc["paused_devices"]
    return _write(paths, doc)


def devices_text(devices: tuple[str, ...] | list[str] | str | None, records: Sequence[DeviceRecord]) -> str:
    """A folder's device list for people: names beside ids."""
    if devices is None or devices == config.HOUSEHOLD:
        return "household (every tofu/verified device)"
    if not devices:
        return "nobody"
    names = {r.device_id: r.name for r in records}
    return ", ".join(f"{names[d]} ({d[:8]})" if d in names else d for d in devices)
