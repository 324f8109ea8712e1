#!/usr/bin/env bash
# The one GPU check, for a lent CUDA machine: tests/gpu, the GPU path benchmark, then the
# full-path benchmark (PVA in, appliance with the GPU stand-in engine, PVA out).
# Everything it prints also lands in $OUT (default ./out/gpu-check): machine.txt,
# gpu-tests.txt + gpu-tests.xml, bench.txt + bench.json, fullpath.txt + fullpath.json.
# Without a usable CUDA device it says why, writes SKIPPED.txt and exits 0.
# The machine has no internet and no pvapy: wheels fetched beforehand with
# `bash scripts/gpu_wheels.sh` (into .whl/, carried with the run) are installed first, into
# $SITE (default /tmp/site); without pvapy the full-path step alone is skipped, saying why.
# Usage: OUT=/some/dir PYTHON=python3 scripts/gpu_check.sh   (about 3-5 minutes on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu-check}"
PYTHON="${PYTHON:-python3}"
SITE="${SITE:-/tmp/site}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Wheels from .whl/: each installed only where its module is missing (the machine's own
# numpy, cuda-bindings and, if present, PyYAML stay in charge).
install_wheels() {
  local wheel module wanted=()
  for wheel in .whl/*.whl; do
    [ -e "$wheel" ] || continue
    case "$(basename "$wheel" | tr '[:upper:]' '[:lower:]')" in
      pvapy-*) module=pvaccess ;;
      pyyaml-*) module=yaml ;;
      *) module="" ;;
    esac
    if [ -n "$module" ] && "$PYTHON" -c "import $module" 2>/dev/null; then
      echo "wheels: $module is importable already; $(basename "$wheel") not installed"
    else
      wanted+=("$wheel")
    fi
  done
  [ ${#wanted[@]} -gt 0 ] || return 0
  echo "wheels: installing ${wanted[*]} into $SITE"
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wanted[@]}" || echo "wheels: pip install failed (exit $?)"
    return 0
  fi
  # No pip for this Python (a bare distribution python3): these wheels hold only their packages and
  # .dist-info (no .data), so unpacking them is the install, less the console scripts: the one the
  # benchmark starts is written by hand.
  echo "wheels: no pip for $PYTHON; unpacking the wheels instead"
  "$PYTHON" - "$SITE" "${wanted[@]}" <<'PY' || echo "wheels: unpacking failed"
import sys
import zipfile

for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PY
  if [ -d "$SITE/pvapy" ]; then
    mkdir -p "$SITE/bin"
    printf '#!/bin/sh\nexec %s -m pvapy.cli.adSimServer "$@"\n' "$(command -v "$PYTHON")" > "$SITE/bin/pvapy-ad-sim-server"
    chmod +x "$SITE/bin/pvapy-ad-sim-server"
  fi
}
export PYTHONPATH="$PYTHONPATH:$SITE"
export PATH="$SITE/bin:$PATH"

{
  install_wheels
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader \
    2>/dev/null || echo "nvidia-smi: not available"
  "$PYTHON" - <<'PY'
import importlib
import platform

print("python", platform.python_version(), platform.machine())
for name in ("numpy", "yaml", "pytest", "cuda.bindings", "cuda.cudart", "pvapy", "pvaccess"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "present"))
    except Exception as exc:
        print(name, "missing ({})".format(type(exc).__name__))
from appliance import cuda

usable, why = cuda.available()
print("appliance.cuda.available:", usable, "-", why)
if usable:
    print("cuda-python layout:", cuda.runtime_layout())
PY
  echo "pvapy-ad-sim-server: $(command -v pvapy-ad-sim-server || echo 'not found')"
} 2>&1 | tee "$OUT/machine.txt"

if ! "$PYTHON" -c "from appliance import cuda; raise SystemExit(0 if cuda.available()[0] else 1)" 2>/dev/null; then
  echo "SKIPPED: no usable CUDA device here (machine.txt says why)" | tee "$OUT/SKIPPED.txt"
  exit 0
fi

status=0
PTYCHONN_REQUIRE_GPU=1 timeout 300 "$PYTHON" -m pytest tests/gpu -v -rA -p no:cacheprovider \
  --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.txt" || status=1
timeout 240 "$PYTHON" scripts/gpu_bench.py --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || status=1
# Full path: pinned vs naive over PVA, 2-20 kHz, 3 s a trial; it starts no trial that would end after
# --budget-s, and writes fullpath.json after every trial, so a timeout still leaves what was measured.
if "$PYTHON" -c "import pvaccess" 2>/dev/null && command -v pvapy-ad-sim-server >/dev/null; then
  timeout 250 "$PYTHON" scripts/gpu_fullpath_bench.py --budget-s 200 --json "$OUT/fullpath.json" 2>&1 \
    | tee "$OUT/fullpath.txt" || status=1
else
  echo "SKIPPED full-path benchmark: pvapy (or its pvapy-ad-sim-server) is not installed here; run" \
    "bash scripts/gpu_wheels.sh where PyPI is reachable and carry .whl/ with the run" | tee "$OUT/fullpath.txt"
fi
echo "gpu_check: exit status $status (0 = tests passed and the benchmarks ran)" | tee -a "$OUT/bench.txt"
exit $status
