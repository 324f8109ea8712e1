#!/usr/bin/env bash
# The offline install path (docs/deploy.md, "Offline"): wheelhouses resolve for both JetPacks and
# this machine, and this machine's installs into a fresh venv with no index at all, as
# scripts/install.sh --wheels does it. Needs PyPI for the downloads (CI has it); run after
# scripts/test.sh, whose .venv provides pip.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for target in jetson5 jetson6; do
    scripts/wheelhouse.sh --target "$target" "$work/$target" 2>&1 | grep '^wheelhouse.sh:'
done
scripts/wheelhouse.sh --target here "$work/here" 2>&1 | grep '^wheelhouse.sh:'
/usr/bin/python3 -m venv "$work/venv"
# shellcheck source=../scripts/install.sh
source scripts/install.sh --sourced-by-a-test
VENV=$work/venv WHEELS=$work/here PIP_ARGS="" wheels_install cpu
"$work/venv/bin/ptychonn-edge" check-config systemd/config.example.yaml >/dev/null
"$work/venv/bin/python" -c "import onnxruntime, pvaccess, appliance.runtime; print('offline install: imports work')"
