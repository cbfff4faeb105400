"""The `tofu-agent` command line, run as a subprocess against a private `--home`.

Every user mistake must end with exit code 1 and exactly one line on stderr that starts with
`tofu-agent:`; a traceback anywhere is a bug. The long table of bad input runs `agent.cli.main`
in-process (an exception escaping `main` is what a traceback would be) to keep the suite quick, and
a sample of it runs again as real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli.main import main
from agent.host.paths import resolve_paths
from agent.trust.model import DeviceRecord, TrustEvent, TrustPolicy
from agent.trust.store import TrustStore
from testkit.homes import new_home
from tests.conftest import Cli, CliResult

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
TOFU = "AAAA" + "Q" * 28
CHANGED = "BBBB" + "Q" * 28
PENDING = "CCCC" + "Q" * 28
SPARE = "DDDD" + "Q" * 28
TWIN1 = "EEEEA" + "Q" * 27
TWIN2 = "EEEEB" + "Q" * 27


def fp(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def assert_user_error(result: CliResult, *needles: str) -> str:
    """Exit 1, nothing on stdout, one `tofu-agent:` line on stderr, no traceback; returns the line."""
    code, out, err = result
    assert "Traceback" not in out + err, err
    assert code == 1, (code, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tofu-agent:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def ok_json(result: CliResult) -> Any:
    code, out, err = result
    assert code == 0, (code, out, err)
    assert "Traceback" not in err
    return json.loads(out)


def populate(home: Path) -> None:
    """Devices at every level, straight into the trust store the CLI reads."""
    paths = resolve_paths(home)
    paths.ensure()
    with TrustStore(paths.trust_db) as s:
        s.verify_device(TOFU, "alpha", fp("alpha"), T0, "10.0.0.1")
        s.verify_device(CHANGED, "beta", fp("beta"), T0 + 1)
        s.verify_device(CHANGED, "beta", fp("beta-new"), T0 + 2)
        s.verify_device(SPARE, "delta", fp("delta"), T0 + 3)
        s.verify_device(TWIN1, "twin one", fp("twin1"), T0 + 4)
        s.verify_device(TWIN2, "twin two", fp("twin2"), T0 + 5)
        s.policy = TrustPolicy.MANUAL
        s.verify_device(PENDING, "gamma", fp("gamma"), T0 + 6)


@pytest.fixture
def populated(home: Path) -> Path:
    populate(home)
    return home


def peers(cli: Cli) -> dict[str, dict[str, Any]]:
    return {p["device_id"]: p for p in ok_json(cli("peers", "--json"))}


def snapshot(home: Path) -> tuple[list[DeviceRecord], list[TrustEvent]]:
    """The whole trust store, read directly (much faster than another CLI run)."""
    with TrustStore(resolve_paths(home).trust_db) as s:
        return s.all(), s.events()


def stored(home: Path, device: str) -> DeviceRecord | None:
    with TrustStore(resolve_paths(home).trust_db) as s:
        return s.get(device)


# -- id -------------------------------------------------------------------------------------------


def test_id_json_is_stable_and_matches_the_human_form(cli: Cli, home: Path) -> None:
    first = ok_json(cli("id", "--json"))
    assert set(first) >= {"device_id", "name", "fingerprint"}
    assert re.fullmatch(r"[A-Z2-7]{26,}", first["device_id"])
    assert re.fullmatch(r"[0-9a-f]{64}", first["fingerprint"])
    assert ok_json(cli("id", "--json")) == first
    assert ok_json(cli("--json", "id")) == first
    code, out, err = cli("id")
    assert (code, err) == (0, "")
    assert first["device_id"] in out
    assert first["name"] in out
    colon = ":".join(first["fingerprint"][i : i + 4] for i in range(0, 64, 4))
    assert colon in out
    assert (resolve_paths(home).key_file.stat().st_mode & 0o777) == 0o600


def test_id_uses_the_configured_name(cli: Cli, home: Path) -> None:
    config_dir = home / "config"
    config_dir.mkdir(mode=0o700)
    (config_dir / "config.toml").write_text('name = "Kitchen PC"\n')
    assert ok_json(cli("id", "--json"))["name"] == "Kitchen PC"


def test_home_option_after_the_command(cli: Cli, home: Path) -> None:
    first = ok_json(cli("id", "--json"))
    assert ok_json(cli("id", "--json", "--home", str(home), home=None)) == first


def test_env_var_works_like_home(cli: Cli, home: Path) -> None:
    via_env = ok_json(cli("id", "--json", home=None, env={"TOFU_AGENT_HOME": str(home)}))
    assert (home / "data" / "device_id").read_text().strip() == via_env["device_id"]
    assert ok_json(cli("id", "--json")) == via_env


def test_different_homes_are_different_devices(cli: Cli, homes: list[Path]) -> None:
    ids = {ok_json(cli("id", "--json", home=h))["device_id"] for h in homes[:2]}
    assert len(ids) == 2


# -- peers ----------------------------------------------------------------------------------------


def test_peers_empty_then_listed(cli: Cli, home: Path) -> None:
    assert ok_json(cli("peers", "--json")) == []
    code, out, _ = cli("peers")
    assert code == 0
    assert out.strip() == "No known devices yet."
    populate(home)
    listed = peers(cli)
    assert set(listed) == {TOFU, CHANGED, PENDING, SPARE, TWIN1, TWIN2}
    alpha = listed[TOFU]
    assert {"device_id", "name", "trust", "fingerprint"} <= set(alpha)
    assert (alpha["name"], alpha["trust"], alpha["fingerprint"]) == ("alpha", "tofu", fp("alpha"))
    assert alpha["first_seen"] == "2023-11-14T22:13:20Z"
    assert alpha["addresses"] == ["10.0.0.1"]
    assert alpha["sync_count"] == 0
    beta = listed[CHANGED]
    assert (beta["trust"], beta["fingerprint"], beta["pending_fingerprint"]) == (
        "key_changed",
        fp("beta"),
        fp("beta-new"),
    )
    assert listed[PENDING]["trust"] == "pending"
    code, out, _ = cli("peers")
    assert code == 0
    for name in ("alpha", "beta", "gamma", "delta", "key_changed", "pending"):
        assert name in out


# -- trust actions --------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["full", "lower prefix"])
@pytest.mark.parametrize(
    ("action", "device", "after", "pin"),
    [
        ("verify", TOFU, "verified", fp("alpha")),
        ("verify", CHANGED, "verified", fp("beta")),
        ("revoke", TOFU, "revoked", fp("alpha")),
        ("revoke", PENDING, "revoked", fp("gamma")),
        ("retrust", CHANGED, "tofu", fp("beta-new")),
        ("accept", PENDING, "tofu", fp("gamma")),
        ("forget", SPARE, None, None),
    ],
)
@pytest.mark.slow
def test_trust_action(
    cli: Cli, populated: Path, spelling: str, action: str, device: str, after: str | None, pin: str | None
) -> None:
    arg = {"full": device, "lower prefix": device[:4].lower()}[spelling]
    result = ok_json(cli("trust", action, arg, "--json"))
    assert (result["device_id"], result["action"]) == (device, action)
    assert result["trust"] == (after or "unknown")
    record = stored(populated, device)
    if after is None:
        assert record is None
    else:
        assert record is not None
        assert (record.trust.value, record.fingerprint) == (after, pin)
    newest = snapshot(populated)[1][0]
    kind = {"verify": "verified", "revoke": "revoked", "retrust": "retrusted", "accept": "accepted"}
    assert (newest.device_id, newest.kind.value) == (device, kind.get(action, "forgotten"))


def test_trust_action_human_output(cli: Cli, populated: Path) -> None:
    code, out, err = cli("trust", "revoke", "aaaa")
    assert (code, err) == (0, "")
    assert out.strip() == f"revoked alpha ({TOFU}): trust is now revoked"
    code, out, err = cli("trust", "retrust", "aaaa")
    assert (code, err) == (0, "")
    assert out.strip() == f"retrusted alpha ({TOFU}): trust is now tofu"


def test_retrust_with_nothing_pending_is_a_user_error(cli: Cli, populated: Path) -> None:
    before = snapshot(populated)
    assert_user_error(cli("trust", "retrust", TOFU), TOFU, "no changed key", "tofu")
    assert_user_error(cli("trust", "retrust", TOFU, "--json"), "no changed key")
    assert snapshot(populated) == before


def test_accept_on_a_device_that_is_not_pending_is_a_user_error(cli: Cli, populated: Path) -> None:
    before = snapshot(populated)
    assert_user_error(cli("trust", "accept", "aaaa"), TOFU, "not waiting for approval")
    assert_user_error(cli("trust", "accept", CHANGED), "key_changed")
    assert snapshot(populated) == before


def test_forget_then_peers_no_longer_lists_it_and_the_log_keeps_it(cli: Cli, populated: Path) -> None:
    ok_json(cli("trust", "forget", "dddd", "--json"))
    assert SPARE not in peers(cli)
    assert_user_error(cli("trust", "forget", "dddd"), "no known device")
    history = [e for e in ok_json(cli("trust", "log", "--json")) if e["device_id"] == SPARE]
    assert [e["kind"] for e in history] == ["forgotten", "first_use"]
    assert history[0]["trust_after"] == "unknown"


def test_trust_log_of_a_forgotten_device(cli: Cli, populated: Path) -> None:
    ok_json(cli("trust", "forget", SPARE, "--json"))
    history = ok_json(cli("trust", "log", SPARE, "--json"))
    assert [e["kind"] for e in history] == ["forgotten", "first_use"]


# -- the log --------------------------------------------------------------------------------------


def test_trust_log_is_newest_first(cli: Cli, populated: Path) -> None:
    ok_json(cli("trust", "verify", "aaaa", "--json"))
    ok_json(cli("trust", "revoke", "dddd", "--json"))
    log = ok_json(cli("trust", "log", "--json"))
    assert len(log) == 9
    seqs = [e["seq"] for e in log]
    assert seqs == sorted(seqs, reverse=True)
    assert [(e["device_id"], e["kind"]) for e in log[:2]] == [(SPARE, "revoked"), (TOFU, "verified")]
    assert (log[-1]["device_id"], log[-1]["kind"], log[-1]["time"]) == (TOFU, "first_use", "2023-11-14T22:13:20Z")
    change = next(e for e in log if e["kind"] == "key_changed")
    assert (change["device_id"], change["old_fingerprint"], change["fingerprint"]) == (
        CHANGED,
        fp("beta"),
        fp("beta-new"),
    )
    assert {"seq", "time", "device_id", "kind", "fingerprint", "old_fingerprint", "trust_after"} <= set(log[0])


def test_trust_log_for_one_device_and_limited(cli: Cli, populated: Path) -> None:
    only = ok_json(cli("trust", "log", "bbbb", "--json"))
    assert [e["kind"] for e in only] == ["key_changed", "first_use"]
    assert len(ok_json(cli("trust", "log", "--limit", "3", "--json"))) == 3
    code, out, _ = cli("trust", "log")
    assert code == 0
    assert "key_changed" in out


def test_trust_log_empty(cli: Cli) -> None:
    assert ok_json(cli("trust", "log", "--json")) == []
    code, out, _ = cli("trust", "log")
    assert (code, out.strip()) == (0, "The trust log is empty.")


# -- export and import ----------------------------------------------------------------------------


@pytest.fixture
def other_home() -> Iterator[Path]:
    path = new_home()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _settle(home: Path) -> None:
    """A store with no key_changed device, so every record can travel."""
    paths = resolve_paths(home)
    with TrustStore(paths.trust_db) as s:
        s.verify(TOFU, T0 + 10)
        s.revoke(SPARE, T0 + 11)
        s.retrust(CHANGED, T0 + 12)
        s.count_sync(TOFU, T0 + 13)


def test_export_import_round_trip(cli: Cli, populated: Path, other_home: Path) -> None:
    _settle(populated)
    export_file = populated / "export.json"
    code, out, err = cli("trust", "export", str(export_file))
    assert (code, err) == (0, "")
    assert "exported 6 device(s)" in out
    assert stat.S_IMODE(export_file.stat().st_mode) == 0o600
    doc = json.loads(export_file.read_text())
    code, out, _ = cli("trust", "export")
    assert code == 0
    assert json.loads(out) == doc

    alpha = doc["peers"][TOFU]
    assert alpha["fingerprint"] == fp("alpha")
    assert alpha["trust"] == "verified"
    assert alpha["first_seen"] == "2023-11-14T22:13:20Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", alpha["last_seen"])
    assert set(doc["peers"]) == {TOFU, CHANGED, PENDING, SPARE, TWIN1, TWIN2}
    assert {p["trust"] for p in doc["peers"].values()} == {"verified", "tofu", "revoked", "pending"}

    outcome = ok_json(cli("trust", "import", str(export_file), "--json", home=other_home))
    assert sorted(outcome["added"]) == sorted(doc["peers"])
    assert outcome["updated"] == outcome["kept"] == outcome["conflict"] == []
    code, out, _ = cli("trust", "export", home=other_home)
    assert code == 0
    assert json.loads(out) == doc

    # Importing the same file again changes nothing.
    again = ok_json(cli("trust", "import", str(export_file), "--json", home=other_home))
    assert sorted(again["kept"]) == sorted(doc["peers"])


def test_import_from_stdin(cli: Cli, populated: Path, other_home: Path) -> None:
    _settle(populated)
    code, exported, _ = cli("trust", "export")
    assert code == 0
    outcome = ok_json(cli("trust", "import", "-", "--json", home=other_home, stdin=exported))
    assert len(outcome["added"]) == 6


def test_import_never_replaces_a_pin_and_never_lowers(cli: Cli, populated: Path, other_home: Path) -> None:
    doc = {
        "version": 1,
        "peers": {
            TOFU: {"fingerprint": fp("impostor"), "first_seen": "2024-01-01T00:00:00Z",
                   "last_seen": "2024-01-01T00:00:00Z", "trust": "verified"},
            SPARE: {"fingerprint": fp("delta"), "first_seen": "2024-01-01T00:00:00Z",
                    "last_seen": "2024-01-01T00:00:00Z", "trust": "revoked"},
            TWIN1: {"fingerprint": fp("twin1"), "first_seen": "2024-01-01T00:00:00Z",
                    "last_seen": "2024-01-01T00:00:00Z", "trust": "tofu"},
        },
    }  # fmt: skip
    path = other_home / "doc.json"
    path.write_text(json.dumps(doc))
    outcome = ok_json(cli("trust", "import", str(path), "--json"))
    assert outcome == {"added": [], "updated": [SPARE], "kept": [TWIN1], "conflict": [TOFU]}
    listed = peers(cli)
    assert (listed[TOFU]["fingerprint"], listed[TOFU]["trust"]) == (fp("alpha"), "tofu")
    assert listed[SPARE]["trust"] == "revoked"
    code, out, _ = cli("trust", "import", str(path))
    assert code == 0
    assert f"conflict: {TOFU} is pinned to another key here" in out


def test_export_with_a_key_change_can_be_imported(cli: Cli, populated: Path, other_home: Path) -> None:
    code, exported, _ = cli("trust", "export")
    assert code == 0
    outcome = ok_json(cli("trust", "import", "-", "--json", home=other_home, stdin=exported))
    assert CHANGED in outcome["added"]
    # Whatever level it travels as, the pin is the old key, never the disputed one.
    record = stored(other_home, CHANGED)
    assert record is not None
    assert record.fingerprint == fp("beta")


# -- status ---------------------------------------------------------------------------------------


def test_status_without_an_agent(cli: Cli) -> None:
    code, out, err = cli("status", "--json")
    assert code == 3
    assert json.loads(out)["running"] is False
    assert "Traceback" not in err
    code, out, _ = cli("status")
    assert code == 3
    assert "not running" in out


# -- bad input to every command -------------------------------------------------------------------

_DOC_OK = {"fingerprint": fp("x"), "first_seen": "2024-01-01T00:00:00Z", "last_seen": "2024-01-01T00:00:00Z"}
BAD_FILES: dict[str, str | bytes] = {
    "not-json.json": "{",
    "binary.json": b"\xff\xfe\x00garbage",
    "empty.json": "",
    "list.json": "[]",
    "string.json": '"peers"',
    "peers-list.json": '{"peers": []}',
    "no-peers.json": '{"devices": {}}',
    "version.json": json.dumps({"version": 2, "peers": {}}),
    "entry-not-object.json": json.dumps({"peers": {TOFU: 5}}),
    "bad-id.json": json.dumps({"peers": {"not-an-id": _DOC_OK}}),
    "bad-fp.json": json.dumps({"peers": {TOFU: {**_DOC_OK, "fingerprint": "abc"}}}),
    "upper-fp.json": json.dumps({"peers": {TOFU: {**_DOC_OK, "fingerprint": fp("x").upper()}}}),
    "no-fp.json": json.dumps({"peers": {TOFU: {"first_seen": "2024-01-01T00:00:00Z"}}}),
    "bad-time.json": json.dumps({"peers": {TOFU: {**_DOC_OK, "first_seen": "yesterday"}}}),
    "num-time.json": json.dumps({"peers": {TOFU: {**_DOC_OK, "last_seen": 1700000000}}}),
    "no-time.json": json.dumps({"peers": {TOFU: {"fingerprint": fp("x")}}}),
    "month-13.json": json.dumps({"peers": {TOFU: {**_DOC_OK, "first_seen": "2024-13-01T00:00:00Z"}}}),
    "bad-trust.json": json.dumps({"peers": {TOFU: {**_DOC_OK, "trust": "besties"}}}),
    "list-trust.json": json.dumps({"peers": {TOFU: {**_DOC_OK, "trust": ["tofu"]}}}),
    "unknown-trust.json": json.dumps({"peers": {TOFU: {**_DOC_OK, "trust": "unknown"}}}),
    "bad-addresses.json": json.dumps({"peers": {TOFU: {**_DOC_OK, "addresses": "10.0.0.1"}}}),
    "bad-count.json": json.dumps({"peers": {TOFU: {**_DOC_OK, "sync_count": -1}}}),
    "bool-count.json": json.dumps({"peers": {TOFU: {**_DOC_OK, "sync_count": True}}}),
}

BAD_COMMANDS: list[tuple[str, list[str], str]] = [
    ("no command", [], "COMMAND"),
    ("unknown command", ["frobnicate"], "invalid choice"),
    ("unknown global option", ["--frob", "id"], "unrecognized arguments"),
    ("unknown id option", ["id", "--frob"], "unrecognized arguments"),
    ("unknown peers option", ["peers", "--all"], "unrecognized arguments"),
    ("extra peers argument", ["peers", "extra"], "unrecognized arguments"),
    ("unknown status option", ["status", "--frob"], "unrecognized arguments"),
    ("unknown run option", ["run", "--frob"], "unrecognized arguments"),
    ("no trust action", ["trust"], "ACTION"),
    ("unknown trust action", ["trust", "frob"], "invalid choice"),
    ("unknown verify option", ["trust", "verify", "--frob", TOFU], "unrecognized arguments"),
    ("two devices", ["trust", "verify", TOFU, SPARE], "unrecognized arguments"),
    ("bad --port word", ["run", "--port", "abc"], "not a port number"),
    ("bad --port big", ["run", "--port", "70000"], "out of range"),
    ("bad --port negative", ["run", "--port", "-1"], "out of range"),
    ("bad --trust-policy", ["run", "--trust-policy", "bogus"], "invalid choice"),
    ("run folder is a file", ["run", "--folder", "{home}/a-file"], "is not a directory"),
    ("run folder holds the data", ["run", "--folder", "{home}"], "overlaps the agent's data directory"),
    ("bad --limit zero", ["trust", "log", "--limit", "0"], "at least 1"),
    ("bad --limit negative", ["trust", "log", "--limit", "-3"], "at least 1"),
    ("bad --limit word", ["trust", "log", "--limit", "x"], "not a number"),
    ("unknown log device", ["trust", "log", "QQQQ"], "no known device"),
    ("ambiguous log device", ["trust", "log", "EEEE"], "more than one"),
    ("import without file", ["trust", "import"], "FILE"),
    ("import missing file", ["trust", "import", "{home}/nope.json"], "cannot read"),
    ("import a directory", ["trust", "import", "{home}"], "cannot read"),
    ("add garbage", ["trust", "add", "garbage"], "tofu-agent://"),
    ("add without uri", ["trust", "add"], "URI"),
    ("service bad action", ["service", "frob"], "invalid choice"),
    ("service no action", ["service"], "action"),
    ("empty home", ["--home", "", "peers"], "--home"),
    ("home is a file", ["--home", "{home}/a-file", "peers"], "a-file"),
    ("home is a file (id)", ["--home", "{home}/a-file", "id"], "a-file"),
]
for _action in ("verify", "revoke", "retrust", "forget", "accept"):
    BAD_COMMANDS += [
        (f"{_action} without device", ["trust", _action], "DEVICE"),
        (f"{_action} unknown device", ["trust", _action, "QQQQ"], "no known device"),
        (f"{_action} ambiguous prefix", ["trust", _action, "eeee"], "more than one"),
        (f"{_action} wildcard", ["trust", _action, "%"], "no known device"),
        (f"{_action} empty", ["trust", _action, ""], "device id"),
    ]
for _name in BAD_FILES:
    BAD_COMMANDS.append((f"import {_name}", ["trust", "import", f"{{home}}/{_name}"], ""))


SUBPROCESS_SAMPLE = {
    "unknown command",
    "unknown id option",
    "no trust action",
    "verify without device",
    "revoke unknown device",
    "retrust ambiguous prefix",
    "bad --port big",
    "bad --limit zero",
    "import not-json.json",
    "import bad-fp.json",
    "import bad-time.json",
    "empty home",
}

InProcess = Callable[..., CliResult]


@pytest.fixture
def main_in_process(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcess]:
    """`agent.cli.main(argv)` with captured output; undoes the logging set-up main does."""
    logger = logging.getLogger("agent")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    monkeypatch.delenv("TOFU_AGENT_HOME", raising=False)

    def call(*argv: str) -> CliResult:
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    try:
        yield call
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def _bad_input_home(home: Path) -> None:
    populate(home)
    for name, content in BAD_FILES.items():
        if isinstance(content, bytes):
            (home / name).write_bytes(content)
        else:
            (home / name).write_text(content)
    (home / "a-file").write_text("not a directory")


@pytest.mark.parametrize(("args", "needle"), [pytest.param(a, n, id=i) for i, a, n in BAD_COMMANDS])
def test_bad_input_is_one_line_and_exit_1(main_in_process: InProcess, home: Path, args: list[str], needle: str) -> None:
    _bad_input_home(home)
    before = snapshot(home)
    argv = [a.replace("{home}", str(home)) for a in args]
    if not argv or argv[0] != "--home":
        argv = ["--home", str(home), *argv]
    assert_user_error(main_in_process(*argv), needle)
    if args and args[0] not in ("--home", "service", "run", "status") and "--home" not in argv[2:]:
        assert_user_error(main_in_process(*argv, "--json"), needle)
    assert snapshot(home) == before, "a refused command changes nothing"


@pytest.mark.parametrize(
    ("args", "needle"), [pytest.param(a, n, id=i) for i, a, n in BAD_COMMANDS if i in SUBPROCESS_SAMPLE]
)
@pytest.mark.slow
def test_bad_input_in_a_real_process(cli: Cli, home: Path, args: list[str], needle: str) -> None:
    _bad_input_home(home)
    argv = [a.replace("{home}", str(home)) for a in args]
    if argv and argv[0] == "--home":
        assert_user_error(cli(*argv, home=None), needle)
    else:
        assert_user_error(cli(*argv), needle)


def test_bad_input_sample_is_in_the_table() -> None:
    assert SUBPROCESS_SAMPLE <= {i for i, _, _ in BAD_COMMANDS}


@pytest.mark.parametrize(
    "args",
    [["id"], ["peers"], ["trust", "verify", TOFU], ["trust", "log"], ["trust", "export"], ["trust", "forget", "d"]],
)
@pytest.mark.slow
def test_invalid_config_is_one_line_and_exit_1(cli: Cli, populated: Path, args: list[str]) -> None:
    config_file = populated / "config" / "config.toml"
    config_file.parent.mkdir(mode=0o700, exist_ok=True)
    config_file.write_text("port = \n")
    before = snapshot(populated)
    assert_user_error(cli(*args), "not valid TOML")
    assert snapshot(populated) == before


@pytest.mark.parametrize(
    ("text", "needle"),
    [('trust_policy = "paranoid"\n', "trust_policy"), ("colour = 1\n", "unknown setting"), ("port = true", "port")],
)
@pytest.mark.slow
def test_invalid_config_settings_are_one_line(cli: Cli, home: Path, text: str, needle: str) -> None:
    config_file = home / "config" / "config.toml"
    config_file.parent.mkdir(mode=0o700)
    config_file.write_text(text)
    assert_user_error(cli("peers"), needle)


def test_insecure_key_is_one_line_and_exit_1(cli: Cli, home: Path) -> None:
    ok_json(cli("id", "--json"))
    key = resolve_paths(home).key_file
    key.chmod(0o644)
    line = assert_user_error(cli("id"), str(key), "chmod 600")
    assert "0644" in line
    assert_user_error(cli("id", "--json"), "chmod 600")
    assert stat.S_IMODE(key.stat().st_mode) == 0o644, "refused, not silently repaired"


def test_corrupt_identity_is_one_line_and_exit_1(cli: Cli, home: Path) -> None:
    ok_json(cli("id", "--json"))
    paths = resolve_paths(home)
    paths.key_file.write_text("garbage")
    assert_user_error(cli("id"), "private key")
    paths.key_file.unlink()
    paths.device_id_file.write_text("nonsense")
    assert_user_error(cli("id"), "device id")


def test_lost_key_warns_once_and_keeps_the_device_id(cli: Cli, home: Path) -> None:
    first = ok_json(cli("id", "--json"))
    paths = resolve_paths(home)
    paths.key_file.unlink()
    code, out, err = cli("id", "--json")
    assert code == 0
    second = json.loads(out)
    assert second["device_id"] == first["device_id"]
    assert second["fingerprint"] != first["fingerprint"]
    assert "key change" in err
    assert "Traceback" not in err


def test_export_to_a_missing_directory_is_one_line(cli: Cli, populated: Path) -> None:
    assert_user_error(cli("trust", "export", str(populated / "no" / "such" / "dir.json")))


def test_export_onto_a_directory_is_one_line(cli: Cli, populated: Path) -> None:
    (populated / "adir").mkdir()
    assert_user_error(cli("trust", "export", str(populated / "adir")))


def test_import_of_deeply_nested_json_is_one_line(cli: Cli, populated: Path) -> None:
    path = populated / "deep.json"
    path.write_text("[" * 100_000)
    assert_user_error(cli("trust", "import", str(path)))
