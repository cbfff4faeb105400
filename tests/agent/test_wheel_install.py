"""A normal (non-editable) install works: the wheel builds without warnings, `service install` runs from it.

An editable install finds files in the source tree that a wheel never ships (the systemd unit
template was one), so this builds a wheel from a copy of the project, installs it with `--no-deps`
into a new virtual environment that borrows this environment's dependencies through a `.pth`
line, and runs the installed `tofu-agent service install` with every XDG directory in a temp
directory and no systemd user manager to reach. The written unit is then checked with
`systemd-analyze --user verify` where that is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# What a wheel is built from: the package and the files pyproject.toml names. Copied, so the build
# leaves no build/ or egg-info behind in the shared working tree.
SOURCES = ("pyproject.toml", "README.md", "agent")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a command outside the source tree (`python -c` puts the working directory on sys.path)."""
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env, cwd="/", check=False
    )


@dataclass(frozen=True)
class Built:
    wheel: Path
    output: str  # what the build printed with --quiet: only warnings and errors


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The wheel, built once for the tests here (as pip builds it: in an isolated build environment)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    for extra in ROOT.glob("LICEN[CS]E*"):
        shutil.copy2(extra, src / extra.name)
    out = tmp / "wheels"
    result = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", out, src)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("tofu_agent-*.whl")
    return Built(wheel, result.stdout + result.stderr)


def test_the_build_prints_no_warning(built: Built) -> None:
    # setuptools warned on every install about `license = { text = ... }` (PEP 639 wants an SPDX string).
    assert "Warning" not in built.output, built.output


def make_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    # The dependencies come from this environment; its own .pth files (the editable install of
    # this project among them) are not processed for a directory added this way.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "tofu_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    installed = run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", wheel)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    where = run(python, "-c", "import agent; print(agent.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), f"agent imported from {where.stdout.strip()}, not the wheel"
    return venv


def isolated_env(tmp: Path) -> dict[str, str]:
    """HOME and XDG dirs in `tmp`; an empty runtime dir, so `systemctl --user` finds no manager."""
    runtime = tmp / "runtime"
    runtime.mkdir(mode=0o700)
    drop = {"DBUS_SESSION_BUS_ADDRESS", "TOFU_AGENT_HOME", "NOTIFY_SOCKET", "PYTHONPATH", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        HOME=str(tmp / "home"),
        XDG_CONFIG_HOME=str(tmp / "config"),
        XDG_DATA_HOME=str(tmp / "data"),
        XDG_STATE_HOME=str(tmp / "state"),
        XDG_RUNTIME_DIR=str(runtime),
    )
    return env


def test_service_install_from_a_wheel_writes_a_valid_unit(built: Built, tmp_path: Path) -> None:
    venv = make_venv(tmp_path, built.wheel)
    env = isolated_env(tmp_path)

    result = run(venv / "bin" / "tofu-agent", "service", "install", env=env, timeout=60)

    unit = tmp_path / "config" / "systemd" / "user" / "tofu-agent.service"
    assert "Traceback" not in result.stderr, result.stderr
    # Without a user manager the unit is written and the command says, on one line, that enabling
    # failed (exit 1: the service does not run yet). With one it would be enabled and started (exit 0).
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"wrote {unit}" in result.stderr, result.stderr
    assert "could not enable" in result.stderr, result.stderr
    assert unit.is_file()

    text = unit.read_text("utf-8")
    assert "@EXEC@" not in text
    (exec_line,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    program, *rest = exec_line.removeprefix("ExecStart=").split()
    assert Path(program).parent == venv / "bin", exec_line
    assert os.access(program, os.X_OK), exec_line
    assert rest == ["-m", "agent", "run"], exec_line

    if SYSTEMD_ANALYZE is None:
        print("systemd-analyze is not installed: the unit's syntax was not verified")
        return
    verified = run(SYSTEMD_ANALYZE, "--user", "--no-pager", "verify", unit, env=env, timeout=60)
    # Any output on stderr is a finding (unknown keys, bad values, a missing executable).
    assert verified.stderr == "", verified.stderr
