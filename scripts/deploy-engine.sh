#!/bin/bash
# Copy an engine file (and its sidecar manifest FILE.yaml, if there is one) to a
# ptychonn-edge appliance, atomically: the file is uploaded under a dotted
# temporary name the appliance ignores, checked, then renamed into place, so the
# appliance never sees half a file. The appliance validates it and swaps to it on its
# own; this script waits for that verdict and exits with it: 0 accepted and serving,
# 1 rejected (the reason is printed), 3 no verdict in time.
#
#   scripts/deploy-engine.sh [--dir DIR] [--port N] [--timeout S] [--no-wait] HOST FILE
#
# HOST is anything ssh accepts (user@host, an ssh_config alias); the remote user must
# be in the ptychonn-deploy group. DIR defaults to /var/lib/ptychonn-edge/engines.
# --port is the ssh port (-p for ssh, -P for scp); SSH_OPTIONS holds extra options
# both ssh and scp take (e.g. "-J gateway" or "-o Port=2222", not "-p 2222").
set -euo pipefail

DIR=/var/lib/ptychonn-edge/engines
PORT=""
TIMEOUT=300
WAIT=1
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
die() { printf 'deploy-engine.sh: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR=${2:?--dir needs a directory}; shift ;;
        --port) PORT=${2:?--port needs a port}; shift ;;
        --timeout) TIMEOUT=${2:?--timeout needs seconds}; shift ;;
        --no-wait) WAIT=0 ;;
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
SSH_PORT=()
SCP_PORT=()
if [ -n "$PORT" ]; then SSH_PORT=(-p "$PORT"); SCP_PORT=(-P "$PORT"); fi

# ${a[@]+"${a[@]}"}: an empty array under set -u, also for the bash 3.2 of a macOS workstation
remote() { ssh ${OPTIONS[@]+"${OPTIONS[@]}"} ${SSH_PORT[@]+"${SSH_PORT[@]}"} "$HOST" "$1"; }

# Upload one file under a temporary name, verify its checksum there, rename it into place.
deploy_one() {
    local source=$1 name sum q_dir q_temporary q_name
    name=$(basename "$source")
    sum=$(sha256sum "$source" | cut -d' ' -f1)
    q_dir=$(printf '%q' "$DIR")
    q_temporary=$(printf '%q' ".$name.part")
    q_name=$(printf '%q' "$name")
    scp -q ${OPTIONS[@]+"${OPTIONS[@]}"} ${SCP_PORT[@]+"${SCP_PORT[@]}"} "$source" "$HOST:$DIR/.$name.part"
    if ! remote "set -e; cd $q_dir; printf '%s  %s\n' $sum $q_temporary | sha256sum --check --quiet --strict
            chmod 0644 $q_temporary; mv -f $q_temporary $q_name"; then
        remote "rm -f $q_dir/$q_temporary" || true
        die "upload of $name to $HOST failed (nothing changed there)"
    fi
    printf 'deploy-engine.sh: %s -> %s:%s/%s (sha256 %s)\n' "$source" "$HOST" "$DIR" "$name" "$sum"
    DEPLOYED_SHA256=$sum
}

# The DLA plan and the manifest first: when the engine appears, the appliance reads them with it.
if [ -f "$FILE.dla" ]; then
    deploy_one "$FILE.dla"
fi
if [ -f "$FILE.yaml" ]; then
    deploy_one "$FILE.yaml"
fi
deploy_one "$FILE"
[ "$WAIT" -eq 1 ] || exit 0

# The verdict, from the appliance's P:Status, read on the appliance (its own EPICS settings).
printf 'deploy-engine.sh: waiting up to %s s for the verdict on %s\n' "$TIMEOUT" "$(basename "$FILE")"
code=0
remote "PATH=\$PATH:/opt/ptychonn-edge/venv/bin; ptychonn-edge verdict $DEPLOYED_SHA256 --timeout $TIMEOUT" || code=$?
exit "$code"
