#!/usr/bin/env bash
# Set up a virtualenv with the appliance (ONNX Runtime on the CPU) and run the demo:
# a simulated scan of unseen test shapes streams through the appliance at 100 Hz over PVA on
# loopback; it prints rates, latency, lost frames and the mosaic's accuracy, and writes
# demo-output/demo.png. Extra arguments go to `ptychonn-edge demo` (e.g. --points 300).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PTYCHONN_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[cpu,demo]"
exec "$venv/bin/ptychonn-edge" demo "$@"
