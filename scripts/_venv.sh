# Sourced by scripts/run and scripts/test: make sure .venv exists and holds the project.
# $1: the pip extras to install ("" or "[test]").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tofu-agent needs Python 3.11 or newer")'
    "$PY" -m venv "$VENV"
fi
# Reinstall only when pyproject.toml changed since the last install, so repeated runs are quick.
# An install with extras also serves the plain install (it is a superset), so scripts/run after
# scripts/test installs nothing; the other way round, scripts/test still has to add its extras.
STAMP="$VENV/.tofu-installed$1"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT$1"
    touch "$STAMP" "$VENV/.tofu-installed"
fi
