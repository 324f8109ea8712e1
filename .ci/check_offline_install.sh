#!/usr/bin/env bash
# The offline install path (docs/deploy.md, "Offline"): wheelhouses resolve for both JetPacks and
# this machine at the versions constraints/*.txt pin (wheelhouse.sh fails on a pin that does not
# resolve and on a wheel left unpinned), and this machine's installs into a fresh venv with no
# index at all, as scripts/install.sh --wheels does it. Online, install.sh pins the same versions:
# they resolve for this machine's python3 too. Needs PyPI for the downloads (CI has it); run after
# scripts/test.sh, whose .venv provides pip. PTYCHONN_WHEELHOUSE: keep this machine's wheelhouse
# there (tests/systemd installs from it).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for target in jetson5 jetson6; do
    scripts/wheelhouse.sh --target "$target" "$work/$target" 2>&1 | grep '^wheelhouse.sh:'
done
here=${PTYCHONN_WHEELHOUSE:-$work/here}
rm -rf "$here"
scripts/wheelhouse.sh --target here "$here" 2>&1 | grep '^wheelhouse.sh:'
/usr/bin/python3 -m venv "$work/online"
"$work/online/bin/python" -m pip install --quiet --disable-pip-version-check --dry-run \
    --constraint "constraints/$(uname -m).txt" ".[cpu]"
echo "constraints/$(uname -m).txt: resolves online"
/usr/bin/python3 -m venv "$work/venv"
# shellcheck source=../scripts/install.sh
source scripts/install.sh --sourced-by-a-test
VENV=$work/venv WHEELS=$here PIP_ARGS="" wheels_install cpu
"$work/venv/bin/ptychonn-edge" check-config systemd/config.example.yaml >/dev/null
"$work/venv/bin/python" -c "import onnxruntime, pvaccess, appliance.runtime; print('offline install: imports work')"
