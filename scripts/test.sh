#!/usr/bin/env bash
# Set up a virtualenv with the appliance and its test dependencies, then run the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k stream -x).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PTYCHONN_VENV:-.venv}"
python="${PTYCHONN_PYTHON:-python3}"   # e.g. python3.8, the Jetson's (JetPack 5)
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
extras="cpu,bslz4,dev"
# systemd-python builds from source: only where its build needs are present (CI installs them).
if pkg-config --exists libsystemd 2>/dev/null; then extras="$extras,systemd"; fi
"$venv/bin/python" -m pip install -q -e ".[$extras]"
echo "== Python 3.8 compatibility of appliance/ (vermin)"
"$venv/bin/vermin" -q --no-tips -t=3.8- --violations appliance
echo "== lint (ruff: pyflakes checks and import order, settings in pyproject.toml)"
"$venv/bin/ruff" check -q appliance scripts tests
echo "== tests"
exec "$venv/bin/python" -m pytest "$@"
