#!/usr/bin/env bash
# The one GPU check, for a lent CUDA machine: tests/gpu, then the GPU benchmark.
# Everything it prints also lands in $OUT (default ./out/gpu-check): machine.txt,
# gpu-tests.txt + gpu-tests.xml, bench.txt + bench.json. Without a usable CUDA
# device it says why, writes SKIPPED.txt and exits 0.
# Usage: OUT=/some/dir PYTHON=python3 scripts/gpu_check.sh   (about 1-2 minutes on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu-check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader \
    2>/dev/null || echo "nvidia-smi: not available"
  "$PYTHON" - <<'PY'
import importlib
import platform

print("python", platform.python_version(), platform.machine())
for name in ("numpy", "yaml", "pytest", "cuda.bindings", "cuda.cudart"):
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
} 2>&1 | tee "$OUT/machine.txt"

if ! "$PYTHON" -c "from appliance import cuda; raise SystemExit(0 if cuda.available()[0] else 1)" 2>/dev/null; then
  echo "SKIPPED: no usable CUDA device here (machine.txt says why)" | tee "$OUT/SKIPPED.txt"
  exit 0
fi

status=0
PTYCHONN_REQUIRE_GPU=1 timeout 300 "$PYTHON" -m pytest tests/gpu -v -rA -p no:cacheprovider \
  --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.txt" || status=1
timeout 240 "$PYTHON" scripts/gpu_bench.py --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || status=1
echo "gpu_check: exit status $status (0 = tests passed and the benchmark ran)" | tee -a "$OUT/bench.txt"
exit $status
