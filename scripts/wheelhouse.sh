#!/usr/bin/env bash
# Make a directory of wheels for installing on a device with no internet (a Jetson next to a
# detector usually has none): run it on a workstation that has, copy DIR over, then on the
# device `sudo scripts/install.sh --wheels DIR`.
#
#   scripts/wheelhouse.sh [--target jetson5|jetson6|here] [--extras LIST] [--update-constraints] DIR
#
# --target: JetPack 5.1 (Python 3.8, aarch64), JetPack 6 (Python 3.10, aarch64), or this machine
# (default). --extras: the package's extras (default: jetson5,cpu, jetson6,cpu, or cpu for "here",
# as install.sh picks them; see
# docs/deploy.md "Extras"). TensorRT and python3-systemd come from the device's OS, not from here.
# DIR gets the appliance's own wheel (built from this checkout), every dependency's wheel for the
# target, and a pip new enough for manylinux_2_x wheels (JetPack 5's venv has pip 20.0).
# Versions are those pinned in constraints/TARGET.txt (jetson5, jetson6, or this machine's
# architecture for "here"; install.sh uses the same files online), so devices installed on
# different days get the same; a wheel the file does not pin fails the run. --update-constraints
# resolves afresh (the newest that fit) and rewrites the file from what was downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

target=here
extras=""
update=0
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --target) target=${2:?--target needs jetson5, jetson6 or here}; shift ;;
        --extras) extras=${2:?--extras needs a list}; shift ;;
        --update-constraints) update=1 ;;
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
             extras=${extras:-jetson5,cpu}; pip_spec="pip<25.1" ;;  # pip 25.1 needs Python 3.9
    jetson6) read -r -a where <<< "$(aarch64_tags 35) --python-version 310 --implementation cp --abi cp310"
             extras=${extras:-jetson6,cpu}; pip_spec="pip" ;;
    here) where=(); extras=${extras:-cpu}; pip_spec="pip" ;;
    *) printf 'wheelhouse.sh: unknown target %s\n' "$target" >&2; usage 2 ;;
esac
# The Python each target's pins are for (its OS's python3): the pins hold for that one only.
case "$target" in
    jetson5) platform=jetson5; python_version=3.8 ;;
    jetson6) platform=jetson6; python_version=3.10 ;;
    here) platform=$(uname -m); python_version=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])') ;;
esac
constraints=constraints/$platform.txt
pins=()
if [ "$update" -eq 0 ]; then
    [ -e "$constraints" ] || { printf 'wheelhouse.sh: no %s: make it with --update-constraints\n' "$constraints" >&2; exit 1; }
    pins=(--constraint "$constraints")
fi

python3 -m pip wheel --quiet --no-deps --wheel-dir "$out" .
wheel=$(ls "$out"/ptychonn_edge-*.whl | sort -V | tail -n 1)
python3 -m pip download --quiet --only-binary=:all: ${where[@]+"${where[@]}"} ${pins[@]+"${pins[@]}"} \
    --dest "$out" "$pip_spec" "$wheel${extras:+[$extras]}"

# name==version of each downloaded wheel but the appliance's own (names normalised as pip does).
downloaded_pins() {
    local file name rest
    for file in "$out"/*.whl; do
        file=$(basename "$file")
        name=${file%%-*}; rest=${file#*-}
        name=$(printf '%s' "$name" | tr 'A-Z_.' 'a-z--')
        [ "$name" = ptychonn-edge ] || printf '%s==%s\n' "$name" "${rest%%-*}"
    done | sort -u
}
if [ "$update" -eq 1 ]; then
    mkdir -p constraints
    {
        printf '# Pinned by scripts/wheelhouse.sh --target %s --extras %s --update-constraints on %s.\n' \
            "$target" "$extras" "$(date -u +%Y-%m-%d)"
        printf '# Used by scripts/install.sh (online) and scripts/wheelhouse.sh; for Python %s only.\n' "$python_version"
        downloaded_pins | sed "s/\$/; python_version == \"$python_version\"/"
    } > "$constraints"
    printf 'wheelhouse.sh: wrote %s (%s pins)\n' "$constraints" "$(grep -c '==' "$constraints")"
else
    unpinned=$(downloaded_pins | sed 's/==.*//' | while read -r name; do
        grep -q "^$name==" "$constraints" || echo "$name"; done)
    [ -z "$unpinned" ] || { printf 'wheelhouse.sh: %s does not pin %s: rerun with --update-constraints\n' \
        "$constraints" "$(echo $unpinned)" >&2; exit 1; }
fi
printf 'wheelhouse.sh: %s for %s (extras %s): %s files, %s\n' "$out" "$target" "${extras:-none}" \
    "$(ls "$out" | wc -l)" "$(du -sh "$out" | cut -f1)"
