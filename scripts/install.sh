#!/bin/bash
# Install (or remove) ptychonn-edge as a systemd service on this machine.
#
# Jetson (JetPack 5.1 / 6) or any Debian/Ubuntu box with systemd. Run as root from a
# checkout; running it again upgrades in place and changes nothing else. See
# docs/deploy.md for what it does and why.
#
#   sudo scripts/install.sh --detector-pv PV --pv-prefix P --interface IF
#                                            install, configure (ptychonn-edge setup), enable and start
#   sudo scripts/install.sh                  install; enable and (re)start once configured
#   sudo scripts/install.sh --no-start       install and enable only
#   sudo scripts/install.sh --wheels DIR     install offline, from scripts/wheelhouse.sh's DIR
#   sudo scripts/install.sh --uninstall      remove the service, venv and units; keep config and state
#   sudo scripts/install.sh --uninstall --purge   also remove config, state, engines, user and groups
#
# Options:
#   --prefix DIR     where the venv and docs go (default /opt/ptychonn-edge; the units expect it)
#   --extras LIST    pip extras, comma separated (default: picked from the machine: jetson5
#                    or jetson6 on a Jetson, cuda11/cuda12/cuda13 for the NVIDIA driver where
#                    the OS's python3 has TensorRT; always "cpu", ONNX Runtime, the fallback)
#   --wheels DIR     install from this wheelhouse only (no index): see scripts/wheelhouse.sh
#   --pip-args ARGS  extra pip arguments
#   --no-apt         do not install python3-venv / python3-systemd with apt-get
#
# Configuration (ptychonn-edge setup; without --detector-pv a new install is not started,
# as the example's detector PV is refused):
#   --detector-pv PV          the detector's NTNDArray PV (detector.pv)
#   --pv-prefix P             this appliance's PV prefix (publish.prefix), unique on the network
#   --interface IF            serve and search on this network interface only
#   --address IP              serve on this IPv4 address only
#   --detector-address HOST   search the detector there only (EPICS_PVA_ADDR_LIST)
set -euo pipefail

PREFIX=/opt/ptychonn-edge
EXTRAS=auto
PIP_ARGS=""
WHEELS=""
USE_APT=1
START=1
SETUP_ARGS=()
UNINSTALL=0
PURGE=0

SERVICE=ptychonn-edge
USER_NAME=ptychonn-edge
DEPLOY_GROUP=ptychonn-deploy
CONFIG_DIR=/etc/ptychonn-edge
STATE_DIR=/var/lib/ptychonn-edge
UNIT_DIR=/etc/systemd/system
TEGRA_RELEASE=/etc/nv_tegra_release
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
say() { printf '%s\n' "install.sh: $*"; }
die() { printf '%s\n' "install.sh: error: $*" >&2; exit 1; }

parse_arguments() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
            --extras) EXTRAS=${2?--extras needs a list}; shift ;;
            --pip-args) PIP_ARGS=${2?--pip-args needs arguments}; shift ;;
            --wheels) WHEELS=${2:?--wheels needs a directory}; shift ;;
            --no-apt) USE_APT=0 ;;
            --detector-pv|--pv-prefix|--interface|--address|--detector-address)
                [ $# -ge 2 ] || die "$1 needs a value"
                SETUP_ARGS+=("${1/#--pv-prefix/--prefix}" "$2"); shift ;;
            --no-start) START=0 ;;
            --uninstall) UNINSTALL=1 ;;
            --purge) PURGE=1 ;;
            -h|--help) usage 0 ;;
            *) printf 'install.sh: unknown option %s\n' "$1" >&2; usage 2 ;;
        esac
        shift
    done
    VENV=$PREFIX/venv
}

# --- removal -------------------------------------------------------------------------
uninstall() {
    say "stopping and disabling $SERVICE and its instances"
    systemctl disable --now "$SERVICE.service" 2>/dev/null || true
    systemctl stop "$SERVICE@*.service" "$SERVICE-collect@*.service" 2>/dev/null || true
    systemctl disable "$SERVICE@.service" "$SERVICE-collect@.service" 2>/dev/null || true
    rm -rf "$UNIT_DIR/$SERVICE.service" "$UNIT_DIR/$SERVICE@.service" "$UNIT_DIR/$SERVICE-collect@.service" \
        "$UNIT_DIR/$SERVICE.service.d/50-gpu-devices.conf" "$UNIT_DIR/$SERVICE@.service.d/50-gpu-devices.conf"
    rmdir "$UNIT_DIR/$SERVICE.service.d" "$UNIT_DIR/$SERVICE@.service.d" 2>/dev/null || true
    rm -f /etc/sysusers.d/$SERVICE.conf /etc/sysusers.d/$SERVICE-jtop.conf /etc/tmpfiles.d/$SERVICE.conf
    systemctl daemon-reload
    systemctl reset-failed "$SERVICE.service" "$SERVICE@*.service" 2>/dev/null || true
    rm -rf "$VENV" "$PREFIX/doc" "$PREFIX/share"
    if [ "$(readlink /usr/local/bin/ptychonn-edge 2>/dev/null)" = "$VENV/bin/ptychonn-edge" ]; then
        rm -f /usr/local/bin/ptychonn-edge
    fi
    rmdir "$PREFIX" 2>/dev/null || true
    if [ "$PURGE" -eq 1 ]; then
        say "purging $CONFIG_DIR, $STATE_DIR, user $USER_NAME and group $DEPLOY_GROUP"
        rm -rf "$CONFIG_DIR" "$STATE_DIR"
        if getent passwd "$USER_NAME" >/dev/null; then userdel "$USER_NAME"; fi
        if getent group "$USER_NAME" >/dev/null; then groupdel "$USER_NAME"; fi
        if getent group "$DEPLOY_GROUP" >/dev/null; then groupdel "$DEPLOY_GROUP"; fi
    else
        say "kept $CONFIG_DIR, $STATE_DIR and user $USER_NAME (use --purge to remove them)"
    fi
}

# --- installation steps ----------------------------------------------------------------
os_packages() {
    # The venv sees the OS's python3-systemd (sd_notify, journald) and, on a Jetson,
    # JetPack's TensorRT: both come from apt, not from PyPI.
    local missing=()
    for package in python3-venv python3-systemd; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        command -v apt-get >/dev/null || die "missing ${missing[*]}; install them or use --no-apt"
        say "installing ${missing[*]} (apt-get update first: a fresh system has no package lists)"
        apt-get update -qq || die "apt-get update failed (above): no network or mirror? Install ${missing[*]}" \
            "from a local mirror or .deb files, then rerun with --no-apt"
        apt-get install -y --no-install-recommends "${missing[@]}" || die "apt-get could not install" \
            "${missing[*]} (above). Offline: copy their .deb files (apt-get download on a machine with the same" \
            "OS release), dpkg -i them, then rerun with --no-apt"
    fi
}

users_and_directories() {
    install -D -m 0644 "$SRC/systemd/sysusers.d/$SERVICE.conf" /etc/sysusers.d/$SERVICE.conf
    if getent group jtop >/dev/null; then
        # jetson-stats' socket is group jtop: telemetry needs the service in it.
        printf 'm %s jtop\n' "$USER_NAME" > /etc/sysusers.d/$SERVICE-jtop.conf
    else
        rm -f /etc/sysusers.d/$SERVICE-jtop.conf
    fi
    systemd-sysusers /etc/sysusers.d/$SERVICE.conf
    [ ! -e /etc/sysusers.d/$SERVICE-jtop.conf ] || systemd-sysusers /etc/sysusers.d/$SERVICE-jtop.conf
    install -D -m 0644 "$SRC/systemd/tmpfiles.d/$SERVICE.conf" /etc/tmpfiles.d/$SERVICE.conf
    systemd-tmpfiles --create /etc/tmpfiles.d/$SERVICE.conf
    install -d -m 0755 "$CONFIG_DIR"
}

# --- which extras: cuda-python must fit the CUDA driver (docs/deploy.md, "Extras") ----------
l4t_major_release() {
    # Jetson Linux's release file starts "# R36 (release), REVISION: 4.3, ...": prints 36.
    sed -n '1s/^# R\([0-9][0-9]*\) (release).*/\1/p' "$1"
}

jetpack_extra() {
    # $1: the Jetson Linux (L4T) major release. Each JetPack has its own CUDA driver and Python.
    case "$1" in
        35) echo jetson5 ;;  # JetPack 5.x: Python 3.8, CUDA 11.4
        36) echo jetson6 ;;  # JetPack 6.x: Python 3.10, CUDA 12.2 (6.0) or 12.6 (6.1, 6.2)
        *) return 1 ;;
    esac
}

cuda_extra_for_driver() {
    # $1: an NVIDIA driver version (535.183.01). The oldest driver each CUDA major runs on
    # (CUDA minor version compatibility): 13.x 580, 12.x 525, 11.x 450. Nothing for no driver.
    local major=${1%%.*}
    case "$major" in ''|*[!0-9]*) return 0 ;; esac
    if [ "$major" -ge 580 ]; then echo cuda13
    elif [ "$major" -ge 525 ]; then echo cuda12
    elif [ "$major" -ge 450 ]; then echo cuda11
    fi
}

nvidia_driver_version() {
    # One line per GPU, all with the same driver; nothing without nvidia-smi or a driver.
    command -v nvidia-smi >/dev/null || return 0
    { nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null || true; } | sed -n 1p
}

platform_extras() {
    # $1: Jetson Linux's release file (absent elsewhere), $2: the NVIDIA driver version or "",
    # $3: 1 when the OS python imports tensorrt. A Jetson gets its JetPack's extra, another
    # TensorRT machine the one for its driver; every machine "cpu" (ONNX Runtime), so that a TensorRT
    # that imports but cannot serve (a CUDA it does not fit, a stand-in) still serves, on the CPU.
    local release_file=$1 driver=$2 tensorrt=$3 platform="" release
    if [ -e "$release_file" ]; then
        release=$(l4t_major_release "$release_file")
        platform=$(jetpack_extra "$release") ||
            die "$release_file says Jetson Linux R${release:-?}, neither JetPack 5 (R35) nor 6 (R36): no" \
                "cuda-python is known to fit its CUDA driver; choose the extras with --extras (docs/deploy.md)"
    elif [ "$tensorrt" = 1 ]; then
        platform=$(cuda_extra_for_driver "$driver")
    fi
    echo "${platform:+$platform,}cpu"
}

# The pinned versions for this machine (constraints/PLATFORM.txt, as scripts/wheelhouse.sh uses them):
# devices installed on different days get the same. Nothing for a platform without a file.
constraints_file() {
    local extras=$1 platform
    case ",$extras," in
        *,jetson5,*) platform=jetson5 ;;
        *,jetson6,*) platform=jetson6 ;;
        *) platform=$(uname -m) ;;
    esac
    [ ! -e "$SRC/constraints/$platform.txt" ] || echo "$SRC/constraints/$platform.txt"
}

checkout_install() {
    # Build from a copy: pip's in-tree build would leave root-owned build/ and
    # *.egg-info directories in the checkout.
    local extras=$1 constraints pins=()
    constraints=$(constraints_file "$extras")
    if [ -n "$constraints" ]; then
        pins=(--constraint "$constraints")
        say "versions pinned by ${constraints#"$SRC"/} (for its Python; others resolve unpinned)"
    fi
    STAGING=$(mktemp -d)
    trap 'rm -rf "$STAGING"' EXIT
    tar -C "$SRC" --exclude=.git --exclude=build --exclude=dist --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=.venv -cf - . | tar -C "$STAGING" -xf -
    say "installing ptychonn-edge${extras:+[$extras]} into $VENV"
    # shellcheck disable=SC2086 # PIP_ARGS is a list of arguments
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check ${pins[@]+"${pins[@]}"} $PIP_ARGS \
        "$STAGING${extras:+[$extras]}"
}

wheels_install() {
    # Offline: nothing is built (JetPack 5's setuptools could not build the package), and pip
    # first replaces itself from the wheelhouse (pip 20.0 does not know manylinux_2_x wheels).
    local extras=$1 wheel
    [ -d "$WHEELS" ] || die "--wheels $WHEELS is not a directory (make one with scripts/wheelhouse.sh)"
    wheel=$(ls "$WHEELS"/ptychonn_edge-*.whl 2>/dev/null | sort -V | tail -n 1)
    [ -n "$wheel" ] || die "$WHEELS has no ptychonn_edge wheel: make it with scripts/wheelhouse.sh"
    say "installing $(basename "$wheel")${extras:+[$extras]} into $VENV from $WHEELS (offline)"
    # shellcheck disable=SC2086 # PIP_ARGS is a list of arguments
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" \
        $PIP_ARGS --upgrade pip
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" \
        $PIP_ARGS --force-reinstall --no-deps "$wheel"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" \
        $PIP_ARGS "$wheel${extras:+[$extras]}"
}

python_environment() {
    local python=/usr/bin/python3 extras=$EXTRAS tensorrt=0 driver machine
    if [ "$extras" = auto ]; then
        "$python" -c 'import tensorrt' 2>/dev/null && tensorrt=1
        driver=$(nvidia_driver_version)
        extras=$(platform_extras "$TEGRA_RELEASE" "$driver" "$tensorrt")
        machine="NVIDIA driver ${driver:-none}"
        [ ! -e "$TEGRA_RELEASE" ] || machine="Jetson Linux R$(l4t_major_release "$TEGRA_RELEASE")"
        say "extras \"$extras\" for $machine, TensorRT $([ "$tensorrt" = 1 ] || printf 'not ')importable" \
            "(--extras overrides)"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV (with the system site packages)"
        "$python" -m venv --system-site-packages "$VENV"
    fi
    if [ -n "$WHEELS" ]; then
        wheels_install "$extras"
    else
        checkout_install "$extras"
    fi
    # status, watch and verdict on everyone's PATH (a read-only /usr, as in an image-based OS, keeps them in the venv)
    ln -sfn "$VENV/bin/ptychonn-edge" /usr/local/bin/ptychonn-edge 2>/dev/null ||
        say "note: cannot link /usr/local/bin/ptychonn-edge; the command is $VENV/bin/ptychonn-edge"
    install -d -m 0755 "$PREFIX/doc"
    install -m 0644 "$SRC"/docs/*.md "$PREFIX/doc/"
    install -d -m 0755 "$PREFIX/share"
    install -m 0644 "$SRC/systemd/ptychonn-edge.bob" "$PREFIX/share/"   # the Phoebus operator screen
}

# Which backend serves here, said before the service starts: an install that cannot serve fails now.
backend_check() {
    local verdict
    verdict=$("$VENV/bin/python" - <<'PYTHON'
from appliance.engines.tensorrt import choose_backend
backend, why = choose_backend("auto")
usable = backend == "tensorrt"
if not usable:
    try:
        import onnxruntime  # noqa: F401 (an install that is there but broken cannot serve either)
        usable = True
    except ImportError as exc:
        why += "; onnxruntime: " + str(exc)
print(("serves on " if usable else "CANNOT SERVE: ") + backend + " (" + why + ")")
PYTHON
    ) || die "the installed package does not import in $VENV"
    say "backend: $verdict"
    case "$verdict" in "CANNOT SERVE"*) die "no backend can serve models here: install the cpu extra (--extras cpu)" \
        "or make TensorRT and CUDA usable" ;; esac
}

# The example's detector PV is pvapy's simulator's: an appliance would search for it (and serve PTYCHONN:*)
# on every interface, colliding with any other on the network. The appliance refuses it (exit 2); so
# does this check, which is the appliance's own (check-config --service), so install does not start it.
configured() {
    "$VENV/bin/ptychonn-edge" check-config --service "$CONFIG_DIR/config.yaml" >/dev/null 2>&1
}

configuration() {
    if [ ! -e "$CONFIG_DIR/config.yaml" ]; then
        say "writing $CONFIG_DIR/config.yaml from systemd/config.example.yaml: edit detector.pv"
        install -m 0644 "$SRC/systemd/config.example.yaml" "$CONFIG_DIR/config.yaml"
    fi
    if [ ${#SETUP_ARGS[@]} -gt 0 ]; then
        "$VENV/bin/ptychonn-edge" setup --config "$CONFIG_DIR/config.yaml" --environment "$CONFIG_DIR/environment" \
            "${SETUP_ARGS[@]}" || die "not configured: ptychonn-edge setup refused the settings (above)"
    fi
    if ! "$VENV/bin/ptychonn-edge" check-config "$CONFIG_DIR/config.yaml" >/dev/null; then
        say "WARNING: $CONFIG_DIR/config.yaml is not valid (above); the service will not start until it is fixed"
    fi
}

shipped_engines() {
    local engines=$STATE_DIR/engines file copied=0
    [ -z "$(ls -A "$engines")" ] || return 0
    for file in "$SRC"/engines/*; do
        [ -f "$file" ] || continue
        install -m 0664 -g "$DEPLOY_GROUP" "$file" "$engines/"
        copied=1
    done
    [ "$copied" -eq 0 ] || say "installed the shipped default engine into $engines"
}

character_devices() {
    # "PATH GROUP" for each character device node under /dev.
    { find /dev -xdev -type c -printf '%p %g\n' 2>/dev/null || true; } | sort
}

gpu_device_nodes() {
    # The GPU's nodes among character_devices' lines (stdin), as they came. Jetson: /dev/nvmap,
    # /dev/nvhost-* (JetPack 5: the iGPU, and the DLAs), /dev/nvgpu/igpu0/* (JetPack 6), whose
    # CUDA also opens /dev/host1x-fence (sync fences) and a DRM render node; discrete GPUs:
    # /dev/nvidia*, /dev/nvidia-caps/*. Render nodes only beside /dev/nvgpu/: elsewhere they
    # belong to another GPU (the display's) that CUDA does not use.
    local listing path group nvgpu=0
    listing=$(cat)
    case "$listing" in /dev/nvgpu/*|*$'\n'/dev/nvgpu/*) nvgpu=1 ;; esac
    while read -r path group; do
        case "$path" in
            /dev/nvmap|/dev/nvhost-*|/dev/nvgpu/*|/dev/host1x-fence|/dev/nvidia*) echo "$path $group" ;;
            /dev/dri/renderD*) [ "$nvgpu" -eq 0 ] || echo "$path $group" ;;
        esac
    done <<<"$listing"
}

gpu_dropin() {
    # The unit drop-in allowing the "PATH GROUP" nodes on stdin (nothing for none). Their groups
    # other than root and video (the unit's) are added to SupplementaryGroups=: render on JetPack 6.
    local path group nodes=() groups=()
    while read -r path group; do
        [ -n "$path" ] || continue
        nodes+=("$path")
        case "$group" in root|video|'') ;; *) groups+=("$group") ;; esac
    done
    [ ${#nodes[@]} -gt 0 ] || return 0
    echo "# Written by scripts/install.sh from the GPU device nodes present; rerun it after a JetPack upgrade."
    echo "[Service]"
    printf 'DeviceAllow=%s rw\n' "${nodes[@]}"
    if [ ${#groups[@]} -gt 0 ]; then
        echo "SupplementaryGroups=$(printf '%s\n' "${groups[@]}" | sort -u | paste -sd ' ' -)"
    fi
}

gpu_device_dropins() {
    # DevicePolicy=closed in the units: allow exactly the GPU nodes this machine has.
    # CPU-only machines get no drop-in.
    local dropin unit
    dropin=$(character_devices | gpu_device_nodes | gpu_dropin)
    for unit in "$SERVICE.service" "$SERVICE@.service"; do
        if [ -z "$dropin" ]; then
            rm -f "$UNIT_DIR/$unit.d/50-gpu-devices.conf"
            continue
        fi
        install -d -m 0755 "$UNIT_DIR/$unit.d"
        printf '%s\n' "$dropin" > "$UNIT_DIR/$unit.d/50-gpu-devices.conf"
    done
    [ -z "$dropin" ] || say "allowed $(grep -c '^DeviceAllow=' <<<"$dropin") GPU device nodes (50-gpu-devices.conf)"
}

units() {
    install -d -m 0755 "$UNIT_DIR"
    install -m 0644 "$SRC/systemd/$SERVICE.service" "$SRC/systemd/$SERVICE@.service" \
        "$SRC/systemd/$SERVICE-collect@.service" "$UNIT_DIR/"
    gpu_device_dropins
    systemctl daemon-reload
    if ! configured; then
        say "not enabled or started: $("$VENV/bin/ptychonn-edge" check-config --service "$CONFIG_DIR/config.yaml" 2>&1 \
            >/dev/null | head -n 1). Configure it:" \
            "ptychonn-edge setup --detector-pv PV --prefix P --interface IF (or rerun install.sh with" \
            "--detector-pv, --pv-prefix, --interface), then: systemctl enable --now $SERVICE"
        return 0
    fi
    systemctl enable --quiet "$SERVICE.service"
    if [ "$START" -eq 1 ]; then
        say "(re)starting $SERVICE"
        if ! systemctl restart "$SERVICE.service"; then
            systemctl status --no-pager --lines=20 "$SERVICE.service" || true
            die "$SERVICE did not start; see journalctl -u $SERVICE"
        fi
        systemctl status --no-pager --lines=0 "$SERVICE.service" || true
    fi
}

main() {
    parse_arguments "$@"
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 $*)"
    command -v systemctl >/dev/null || die "systemd is required (systemctl not found)"
    [ "$PURGE" -eq 0 ] || [ "$UNINSTALL" -eq 1 ] || die "--purge only goes with --uninstall"
    if [ "$UNINSTALL" -eq 1 ]; then
        uninstall
        exit 0
    fi
    [ "$USE_APT" -eq 0 ] || os_packages
    users_and_directories
    python_environment
    backend_check
    configuration
    shipped_engines
    units
    say "done. Logs: journalctl -u $SERVICE; engines go to $STATE_DIR/engines (group $DEPLOY_GROUP:" \
        "usermod -aG $DEPLOY_GROUP USER), e.g. with scripts/deploy-engine.sh"
}

# Sourced (tests/: the detection functions with a fake machine), it only defines them.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
