#!/bin/bash
# Copy an engine file (and its sidecar manifest FILE.yaml, if there is one) to a
# ptychonn-edge appliance, atomically: the file is uploaded under a dotted
# temporary name the appliance ignores, checked, then renamed into place, so the
# appliance never sees half a file. It then validates and swaps to it on its own
# (`journalctl -u ptychonn-edge` on the appliance says whether it was accepted).
#
#   scripts/deploy-engine.sh [--dir DIR] HOST FILE
#
# HOST is anything ssh accepts (user@host, an ssh_config alias); the remote user must
# be in the ptychonn-deploy group. DIR defaults to /var/lib/ptychonn-edge/engines.
# Set SSH_OPTIONS for extra ssh/scp options (e.g. "-J gateway").
set -euo pipefail

DIR=/var/lib/ptychonn-edge/engines
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
die() { printf 'deploy-engine.sh: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR=${2:?--dir needs a directory}; shift ;;
        -h|--help) usage 0 ;;
        -*) printf 'deploy-engine.sh: unknown option %s\n' "$1" >&2; usage 2 ;;
        *) break ;;
    esac
    shift
done
[ $# -eq 2 ] || usage 2
HOST=$1
FILE=$2
[ -f "$FILE" ] || die "$FILE is not a file"
read -r -a OPTIONS <<< "${SSH_OPTIONS:-}"

remote() { ssh "${OPTIONS[@]}" "$HOST" "$1"; }

# Upload one file under a temporary name, verify its checksum there, rename it into place.
deploy_one() {
    local source=$1 name sum q_dir q_temporary q_name
    name=$(basename "$source")
    sum=$(sha256sum "$source" | cut -d' ' -f1)
    q_dir=$(printf '%q' "$DIR")
    q_temporary=$(printf '%q' ".$name.part")
    q_name=$(printf '%q' "$name")
    scp -q "${OPTIONS[@]}" "$source" "$HOST:$DIR/.$name.part"
    if ! remote "set -e; cd $q_dir; printf '%s  %s\n' $sum $q_temporary | sha256sum --check --quiet --strict
            chmod 0644 $q_temporary; mv -f $q_temporary $q_name"; then
        remote "rm -f $q_dir/$q_temporary" || true
        die "upload of $name to $HOST failed (nothing changed there)"
    fi
    printf 'deploy-engine.sh: %s -> %s:%s/%s (sha256 %s)\n' "$source" "$HOST" "$DIR" "$name" "$sum"
}

# The DLA plan and the manifest first: when the engine appears, the appliance reads them with it.
if [ -f "$FILE.dla" ]; then
    deploy_one "$FILE.dla"
fi
if [ -f "$FILE.yaml" ]; then
    deploy_one "$FILE.yaml"
fi
deploy_one "$FILE"
