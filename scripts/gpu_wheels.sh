#!/usr/bin/env bash
# Wheels the lent GPU machine lacks for the full-path benchmark, fetched here into .whl/ (ignored by git).
# The GPU machine has no internet: its run (scripts/gpu_check.sh) installs what it finds in .whl/,
# so this runs first, on a machine with PyPI, and the run carries .whl along.
#
# That machine: Python 3.12.3, x86_64, numpy 2.x and cuda-bindings present, no pvapy. So:
#   pvapy   the version this project's environment has (its wheel bundles EPICS and boost; its only
#           requirement, numpy>=2.0 on 3.12, is there) - the simulator, the appliance's PVA, the subscriber;
#   PyYAML  appliance.config needs it; scripts/gpu_check.sh installs it only where `import yaml` fails.
# Versions: PVAPY_VERSION / PYYAML_VERSION, else what `$PYTHON -m pip` sees installed here, else the pins below.
# Usage: bash scripts/gpu_wheels.sh        (about 15 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x /tmp/venv/bin/python ] && [ "$PYTHON" = python3 ] && PYTHON=/tmp/venv/bin/python
DEST=.whl

installed() {  # the version of distribution $1 installed for $PYTHON, or nothing
  "$PYTHON" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except Exception: pass" "$1" 2>/dev/null || true
}
PVAPY_VERSION="${PVAPY_VERSION:-$(installed pvapy)}"
PVAPY_VERSION="${PVAPY_VERSION:-5.6.0}"
PYYAML_VERSION="${PYYAML_VERSION:-$(installed PyYAML)}"
PYYAML_VERSION="${PYYAML_VERSION:-6.0.2}"

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# pip matches manylinux_2_N exactly: every N a wheel might be tagged with is named (glibc of the
# GPU machine's Python 3.12.3 is at least 2.35).
platforms=()
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
           manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 "${platforms[@]}" -d "$DEST" "pvapy==$PVAPY_VERSION" "PyYAML==$PYYAML_VERSION"

# The wheel must carry what the benchmark starts: the simulator's console script and module.
"$PYTHON" - "$DEST" <<'PY'
import glob
import sys
import zipfile

wheel = glob.glob(sys.argv[1] + "/pvapy-*.whl")[0]
names = zipfile.ZipFile(wheel).namelist()
entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
text = zipfile.ZipFile(wheel).read(entry_points[0]).decode() if entry_points else ""
assert "pvapy-ad-sim-server = pvapy.cli.adSimServer:main" in text, "no pvapy-ad-sim-server entry point in " + wheel
assert "pvapy/cli/adSimServer.py" in names and "pvaccess/pvaccess.so" in names, wheel
print("ok: {} provides pvapy-ad-sim-server (pvapy.cli.adSimServer:main; also python -m pvapy.cli.adSimServer)"
      .format(wheel))
PY
ls -l "$DEST"
