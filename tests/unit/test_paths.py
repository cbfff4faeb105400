"""Where state lives: `--home`, `$TOFU_AGENT_HOME`, the XDG defaults, modes, and socket length."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.host import paths as paths_mod
from agent.host.paths import HOME_ENV, Paths, resolve_paths


@pytest.fixture(autouse=True)
def _no_env_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    # Never let a test here fall back to the real home directory.
    monkeypatch.delenv(HOME_ENV, raising=False)
    xdg = home / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(xdg / "data"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg / "run"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_layout(home: Path) -> None:
    p = resolve_paths(home)
    assert p == Paths(config_dir=home / "config", data_dir=home / "data", runtime_dir=home / "run", home=home)
    assert p.config_file == home / "config" / "config.toml"
    assert p.identity_dir == home / "data" / "identity"
    assert p.key_file == home / "data" / "identity" / "key.pem"
    assert p.cert_file == home / "data" / "identity" / "cert.pem"
    assert p.device_id_file == home / "data" / "device_id"
    assert p.device_id_file.parent != p.key_file.parent, "the device id outlives the key files"
    assert p.trust_db == home / "data" / "trust.db"
    assert p.index_db == home / "data" / "index.db"
    assert p.control_socket == home / "run" / "control.sock"
    assert p.default_folder == home / "folder"


def test_relative_and_tilde_homes_become_absolute(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(home)
    assert resolve_paths("rel").home == home / "rel"
    monkeypatch.setenv("HOME", str(home))
    assert resolve_paths("~/h").home == home / "h"


def test_env_var_works_like_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOME_ENV, str(home))
    assert resolve_paths() == resolve_paths(home)


def test_home_option_wins_over_env_var(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOME_ENV, str(home / "from-env"))
    assert resolve_paths(home / "from-option").home == home / "from-option"


def test_without_home_the_xdg_directories_are_used(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOME_ENV, "")  # empty means unset
    p = resolve_paths()
    xdg = home / "xdg"
    assert p.home is None
    assert p.config_dir == xdg / "config" / "tofu-agent"
    assert p.data_dir == xdg / "data" / "tofu-agent"
    assert p.runtime_dir == xdg / "run" / "tofu-agent"


def test_an_empty_home_option_is_an_error_not_the_real_home() -> None:
    with pytest.raises(ConfigError, match="--home"):
        resolve_paths("")


def test_ensure_makes_private_directories(home: Path) -> None:
    p = resolve_paths(home / "new")
    p.ensure()
    for d in (p.config_dir, p.data_dir, p.runtime_dir, p.identity_dir):
        assert d.is_dir()
        assert mode(d) == 0o700, d


def test_ensure_tightens_loose_directories(home: Path) -> None:
    p = resolve_paths(home)
    p.ensure()
    p.data_dir.chmod(0o755)
    p.runtime_dir.chmod(0o777)
    p.ensure()
    assert mode(p.data_dir) == 0o700
    assert mode(p.runtime_dir) == 0o700


def test_ensure_reports_a_file_in_the_way_as_a_config_error(home: Path) -> None:
    (home / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot create directory"):
        resolve_paths(home / "file").ensure()


def test_too_long_socket_path_is_a_clear_error(home: Path) -> None:
    deep = home / ("d" * 100)
    p = resolve_paths(deep)
    assert len(str(p.control_socket).encode()) > 107
    with pytest.raises(ConfigError, match=r"too long for a Unix socket.*shorter --home"):
        p.ensure()


def test_the_longest_socket_path_that_fits_is_accepted(home: Path) -> None:
    suffix_len = len("/run/control.sock")
    pad = 107 - len(str(home).encode()) - 1 - suffix_len
    p = resolve_paths(home / ("d" * pad))
    assert len(str(p.control_socket).encode()) == 107
    p.ensure()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(p.control_socket))  # the kernel agrees it fits
    over = resolve_paths(home / ("d" * (pad + 1)))
    with pytest.raises(ConfigError):
        over.ensure()
    over.runtime_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as sock, pytest.raises(OSError):
        sock.bind(str(over.control_socket))


def test_socket_limit_matches_sockaddr_un() -> None:
    assert paths_mod._MAX_SOCKET_PATH == 107
