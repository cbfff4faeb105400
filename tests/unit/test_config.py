"""config.toml: defaults, every setting, and readable errors for everything that is wrong."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agent import config
from agent.cli import main as cli
from agent.config import Config, FolderConfig
from agent.errors import ConfigError, UserError
from agent.trust.anomaly import AnomalyConfig
from agent.trust.model import TrustPolicy

DEFAULT_FOLDER = Path("/nonexistent/default-folder")


def load(home: Path, text: str) -> Config:
    path = home / "config.toml"
    path.write_text(textwrap.dedent(text), "utf-8")
    return config.load(path, DEFAULT_FOLDER)


def test_missing_file_means_defaults(home: Path) -> None:
    cfg = config.load(home / "config.toml", DEFAULT_FOLDER)
    assert cfg == Config(folders=(FolderConfig("default", DEFAULT_FOLDER),))
    assert cfg.name is None
    assert cfg.port == config.DEFAULT_PORT == 39001
    assert cfg.bind == "0.0.0.0"
    assert cfg.peers == ()
    assert cfg.mdns is True
    assert cfg.trust_policy is TrustPolicy.WINDOW  # consent before data: the pairing window
    assert cfg.anomaly == AnomalyConfig()
    assert (cfg.keepalive_idle, cfg.keepalive_timeout) == (15.0, 10.0)


def test_empty_file_means_defaults(home: Path) -> None:
    assert load(home, "") == config.load(home / "missing.toml", DEFAULT_FOLDER)


def test_every_setting(home: Path) -> None:
    cfg = load(
        home,
        """
        name = "Kitchen PC"
        port = 40000
        bind = "192.168.1.10"
        peers = ["10.0.0.2:39001", "[fe80::1]:4000", "host.local:1"]
        mdns = false
        trust_policy = "manual"
        keepalive_idle = 30
        keepalive_timeout = 2.5

        [anomaly]
        repeated_key_change_threshold = 5
        window_hours = 1.5
        block_on = ["cloned_key"]

        [[folder]]
        id = "photos"
        path = "/srv/photos"

        [[folder]]
        id = "docs"
        path = "relative/docs"
        """,
    )
    assert cfg == Config(
        name="Kitchen PC",
        port=40000,
        bind="192.168.1.10",
        peers=(("10.0.0.2", 39001), ("fe80::1", 4000), ("host.local", 1)),
        mdns=False,
        trust_policy=TrustPolicy.MANUAL,
        folders=(FolderConfig("photos", Path("/srv/photos")), FolderConfig("docs", home / "relative/docs")),
        anomaly=AnomalyConfig(
            repeated_key_change_threshold=5, window_seconds=5400.0, block_on=frozenset({"cloned_key"})
        ),
        keepalive_idle=30.0,
        keepalive_timeout=2.5,
    )


@pytest.mark.parametrize("pol", list(TrustPolicy))
def test_every_policy(home: Path, pol: TrustPolicy) -> None:
    assert load(home, f'trust_policy = "{pol.value}"').trust_policy is pol


def test_port_zero_means_any_port(home: Path) -> None:
    assert load(home, "port = 0").port == 0


def test_folder_path_tilde_is_expanded(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(home))
    cfg = load(home, '[[folder]]\nid = "a"\npath = "~/sync"\n')
    assert cfg.folders == (FolderConfig("a", home / "sync"),)


def test_with_overrides_ignores_unset_options() -> None:
    cfg = Config(port=1)
    assert cfg.with_overrides(port=None, name="x") == Config(port=1, name="x")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # unknown keys
        ("colour = 'blue'", r"unknown setting\(s\): colour"),
        ("zeta = 1\nalpha = 2", r"unknown setting\(s\): alpha, zeta"),
        ("[anomaly]\nbogus = 1", r"\[anomaly\]: unknown setting\(s\): bogus"),
        # bad types
        ("name = 5", r"`name` must be str, got 5"),
        ("port = '39001'", r"`port` must be int, got '39001'"),
        ("port = true", r"`port` must be int, got True"),
        ("port = 39001.0", r"`port` must be int"),
        ("bind = 0", r"`bind` must be str"),
        ("mdns = 'no'", r"`mdns` must be bool"),
        ("mdns = 1", r"`mdns` must be bool"),
        ("peers = '10.0.0.1:1'", r"`peers` must be list"),
        ("trust_policy = 1", r"`trust_policy` must be str"),
        ("keepalive_idle = 'soon'", r"`keepalive_idle` must be int or float"),
        ("keepalive_idle = true", r"`keepalive_idle` must be int or float, got True"),
        ("keepalive_timeout = false", r"`keepalive_timeout` must be int or float, got False"),
        ("anomaly = 3", r"`anomaly` must be dict"),
        ("folder = 'x'", r"`folder` must be list"),
        ("[anomaly]\nrepeated_key_change_threshold = 2.5", r"repeated_key_change_threshold` must be int"),
        ("[anomaly]\nrepeated_key_change_threshold = true", r"repeated_key_change_threshold` must be int"),
        ("[anomaly]\nwindow_hours = 'a day'", r"`window_hours` must be int or float"),
        ("[anomaly]\nwindow_hours = true", r"`window_hours` must be int or float, got True"),
        ("[anomaly]\nblock_on = 'cloned_key'", r"`block_on` must be list"),
        ("[anomaly]\nblock_on = [1]", r"block_on must be a list of anomaly codes"),
        # bad values
        ("port = 65536", r"port 65536 is out of range"),
        ("port = -1", r"port -1 is out of range"),
        ("peers = ['nocolon']", r"peer 'nocolon' is not HOST:PORT"),
        ("peers = [':39001']", r"peer ':39001' is not HOST:PORT"),
        ("peers = ['host:port']", r"port must be a number, got 'port'"),
        ("peers = ['host:0']", r"port 0 is out of range"),
        ("peers = ['host:70000']", r"port 70000 is out of range"),
        ("trust_policy = 'paranoid'", r"trust_policy must be one of window, auto, manual, code; got 'paranoid'"),
        ("keepalive_idle = 0.1", r"`keepalive_idle` must be between 0.5 and 3600"),
        ("keepalive_timeout = 7200", r"`keepalive_timeout` must be between 0.5 and 3600"),
        ("keepalive_idle = nan", r"`keepalive_idle` must be between"),
        ("[anomaly]\nrepeated_key_change_threshold = 1", r"at least 2"),
        ("[anomaly]\nwindow_hours = 0", r"window_hours must be a positive number"),
        ("[anomaly]\nwindow_hours = -3", r"window_hours must be a positive number"),
        ("[anomaly]\nwindow_hours = nan", r"window_hours must be a positive number"),
        ("[anomaly]\nwindow_hours = inf", r"window_hours must be a positive number"),
        # folders
        ("[[folder]]\nid = 'a'", r"\[\[folder\]\] #1: needs `id` and `path`"),
        ("[[folder]]\npath = '/x'", r"#1: needs `id` and `path`"),
        ("folder = [1]", r"#1: needs `id` and `path`"),
        ("[[folder]]\nid = 3\npath = '/x'", r"#1: `id` must be str"),
        ("[[folder]]\nid = ''\npath = '/x'", r"#1: `id` must be 1-64 printable characters"),
        ('[[folder]]\nid = "a\\tb"\npath = "/x"', r"`id` must be 1-64 printable characters"),
        (f"[[folder]]\nid = '{'x' * 65}'\npath = '/x'", r"`id` must be 1-64"),
        ("[[folder]]\nid = 'a'\npath = 5", r"#1: `path` must be str"),
        ("[[folder]]\nid = 'a'\npath = ''", r"#1: `path` is empty"),
        ("[[folder]]\nid = 'a'\npath = '/x'\nignore = '*.log'", r"#1: unknown setting\(s\): ignore"),
        (
            "[[folder]]\nid = 'a'\npath = '/x'\n[[folder]]\nid = 'b'\npath = '/y'\n[[folder]]\nid = 'a'\npath = '/z'",
            r"#3: folder id 'a' is used twice",
        ),
    ],
)
def test_bad_config_is_a_readable_config_error(home: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load(home, text)
    text_of_error = str(info.value)
    assert "\n" not in text_of_error, "the CLI prints errors on one line"
    assert text_of_error.startswith(("config.toml", "trust_policy", "peer")), text_of_error
    assert isinstance(info.value, UserError)


@pytest.mark.parametrize(
    "text",
    ["port = ", "name = 'unterminated", "[anomaly", "port = 1\nport = 2", "= 3", "peers = [1,"],
)
def test_invalid_toml_names_the_file(home: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"config\.toml is not valid TOML"):
        load(home, text)


def test_a_file_that_is_not_utf8_is_a_config_error(home: Path) -> None:
    path = home / "config.toml"
    path.write_bytes(b"name = '\xff\xfe'\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(path, DEFAULT_FOLDER)


def test_an_unreadable_config_path_is_a_config_error(home: Path) -> None:
    (home / "config.toml").mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(home / "config.toml", DEFAULT_FOLDER)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.0.0.1:80", ("10.0.0.1", 80)), ("[::1]:65535", ("::1", 65535)), (" h:1 ", ("h", 1))],
)
def test_parse_peer(text: str, expected: tuple[str, int]) -> None:
    assert config.parse_peer(text) == expected


def test_parse_policy_lists_the_valid_ones() -> None:
    assert config.parse_policy("code") is TrustPolicy.CODE
    with pytest.raises(ConfigError, match="auto, manual, code"):
        config.parse_policy("AUTO ")


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["f", "f"], "overlap"),
        (["f", "f/inner"], "a folder cannot be synced inside another"),
        (["f/inner", "f"], "overlap"),
        (["link-to-f", "f"], "overlap"),  # the same directory through a symlink
        (["data/sync"], "overlaps the agent's data directory"),
        (["."], "overlaps the agent's data directory"),
        (["file"], "is not a directory"),
    ],
)
def test_run_refuses_folders_that_cannot_be_synced_safely(tmp_path: Path, paths: list[str], message: str) -> None:
    (tmp_path / "f").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "link-to-f").symlink_to(tmp_path / "f")
    folders = tuple(FolderConfig(f"id{i}", tmp_path / p) for i, p in enumerate(paths))
    with pytest.raises(ConfigError, match=message):
        cli._check_folders(folders, tmp_path / "data")


def test_run_accepts_separate_folders_and_a_symlinked_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    folders = (
        FolderConfig("a", tmp_path / "link"),
        FolderConfig("b", tmp_path / "b"),
        FolderConfig("c", tmp_path / "bc"),
    )
    cli._check_folders(folders, tmp_path / "data")
