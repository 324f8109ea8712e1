#!/usr/bin/env bash
# Make a directory of wheels for installing on a device with no internet (a Jetson next to a
# detector usually has none): run it on a workstation that has, copy DIR over, then on the
# device `sudo scripts/install.sh --wheels DIR`.
#
#   scripts/wheelhouse.sh [--target jetson5|jetson6|here] [--extras LIST] DIR
#
# --target: JetPack 5.1 (Python 3.8, aarch64), JetPack 6 (Python 3.10, aarch64), or this machine
# (default). --extras: the package's extras (default: jetson5, jetson6, or cpu for "here"; see
# docs/deploy.md "Extras"). TensorRT and python3-systemd come from the device's OS, not from here.
# DIR gets the appliance's own wheel (built from this checkout), every dependency's wheel for the
# target, and a pip new enough for manylinux_2_x wheels (JetPack 5's venv has pip 20.0).
set -euo pipefail
cd "$(dirname "$0")/.."

target=here
extras=""
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --target) target=${2:?--target needs jetson5, jetson6 or here}; shift ;;
        --extras) extras=${2:?--extras needs a list}; shift ;;
        -h|--help) usage 0 ;;
        -*) printf 'wheelhouse.sh: unknown option %s\n' "$1" >&2; usage 2 ;;
        *) break ;;
    esac
    shift
done
[ $# -eq 1 ] || usage 2
out=$1
mkdir -p "$out"

# manylinux tags each target's glibc takes: Ubuntu 20.04 (JetPack 5) 2.31, Ubuntu 22.04 (JetPack 6) 2.35.
aarch64_tags() {
    local glibc_minor=$1 minor
    printf -- '--platform manylinux2014_aarch64'
    for minor in $(seq 17 "$glibc_minor"); do printf -- ' --platform manylinux_2_%s_aarch64' "$minor"; done
}
case "$target" in
    jetson5) read -r -a where <<< "$(aarch64_tags 31) --python-version 38 --implementation cp --abi cp38"
             extras=${extras:-jetson5}; pip_spec="pip<25.1" ;;  # pip 25.1 needs Python 3.9
    jetson6) read -r -a where <<< "$(aarch64_tags 35) --python-version 310 --implementation cp --abi cp310"
             extras=${extras:-jetson6}; pip_spec="pip" ;;
    here) where=(); extras=${extras:-cpu}; pip_spec="pip" ;;
    *) printf 'wheelhouse.sh: unknown target %s\n' "$target" >&2; usage 2 ;;
esac

python3 -m pip wheel --quiet --no-deps --wheel-dir "$out" .
wheel=$(ls "$out"/ptychonn_edge-*.whl | sort -V | tail -n 1)
python3 -m pip download --quiet --only-binary=:all: ${where[@]+"${where[@]}"} --dest "$out" \
    "$pip_spec" "$wheel${extras:+[$extras]}"
printf 'wheelhouse.sh: %s for %s (extras %s): %s files, %s\n' "$out" "$target" "${extras:-none}" \
    "$(ls "$out" | wc -l)" "$(du -sh "$out" | cut -f1)"
