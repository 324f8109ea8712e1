"""The scenario run inside the systemd-nspawn container (as root, system python3, stdlib only).

Booted straight into by tests/systemd/test_under_systemd.py. It installs the
appliance with scripts/install.sh exactly as on a device, then drives the real
unit with systemctl and records what systemd and the journal say into
``results.json``; the host-side tests assert on that file. Every step records
its own failure and the run goes on where later steps still make sense.

Waiting here polls systemctl: systemd's state is only observable from outside by
asking, and every wait is bounded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

PARAMS = "/srv/test/params.json"
UNIT = "ptychonn-edge.service"
VENV = "/opt/ptychonn-edge/venv"
CONFIG_DIR = "/etc/ptychonn-edge"
STATE = "/var/lib/ptychonn-edge"
ENGINES = STATE + "/engines"
HANG_FILE = STATE + "/hang"
DROPIN_DIR = "/etc/systemd/system/{}.d".format(UNIT)
POLL_S = 0.2

params: Dict[str, Any] = {}
results: Dict[str, Any] = {}


def sh(*args: str, timeout: float = 120) -> Dict[str, Any]:
    done = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=timeout)
    return {"rc": done.returncode, "output": done.stdout}


def show(unit: str = UNIT) -> Dict[str, str]:
    props = "ActiveState,SubState,Result,NRestarts,MainPID,StatusText,ExecMainStatus,ExecMainCode,InvocationID"
    out = sh("systemctl", "show", "-p", props, unit)["output"]
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after {} s waiting for {}; unit: {}".format(timeout, what, show()))
        time.sleep(POLL_S)


def flowing(status: str) -> bool:
    match = re.search(r"in (\d+) Hz, out (\d+) Hz", status)
    return bool(match and int(match.group(1)) > 0 and int(match.group(2)) > 0)


def unit_when(predicate: Callable[[Dict[str, str]], bool], unit: str = UNIT) -> Callable[[], Optional[Dict[str, str]]]:
    """For wait_until: the unit's properties once ``predicate`` holds for them."""
    def check() -> Optional[Dict[str, str]]:
        state = show(unit)
        return state if predicate(state) else None

    return check


flowing_now = unit_when(lambda state: state["ActiveState"] == "active" and flowing(state["StatusText"]))


def journal(unit: str = UNIT) -> str:
    return sh("journalctl", "--no-pager", "-o", "cat", "-u", unit)["output"]


def invocation_journal(state: Dict[str, str], containing: str = "") -> Optional[str]:
    """All that one run of the unit (``state`` from ``show``) logged, however much earlier steps did;
    None until it holds ``containing``."""
    text = sh("journalctl", "--no-pager", "-o", "cat", "_SYSTEMD_INVOCATION_ID=" + state["InvocationID"])["output"]
    return text if containing in text else None


def phase_ids() -> List[int]:
    try:
        with open(params["results"] + "/phase-ids") as handle:
            # uniqueId 0: the empty record a monitor sees when it (re)connects before any frame
            return [int(line) for line in handle if line.strip() and int(line) != 0]
    except OSError:
        return []


def write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)


def write_env(path: str, variables: Dict[str, str]) -> None:
    """An EnvironmentFile= for systemd."""
    write(path, "".join("{}={}\n".format(name, value) for name, value in sorted(variables.items())))


def acl_entries(path: str, kind: str) -> List[List[Any]]:
    """[tag, id, permission bits] of a POSIX ACL, decoded from its xattr (no getfacl in the container)."""
    tags = {1: "user_obj", 2: "user", 4: "group_obj", 8: "group", 16: "mask", 32: "other"}
    try:
        raw = os.getxattr(path, "system.posix_acl_" + kind)
    except OSError:
        return []
    entries = []
    for offset in range(4, len(raw), 8):  # a 4-byte version header, then 8-byte entries
        tag, perm, ident = struct.unpack_from("<HHI", raw, offset)
        entries.append([tags.get(tag, tag), ident, perm])
    return entries


def deploy(model: str) -> None:
    """As scripts/deploy-engine.sh does: a dotted temporary name, then an atomic rename."""
    name = os.path.basename(model)
    temporary = os.path.join(ENGINES, "." + name + ".part")
    shutil.copyfile(model, temporary)
    os.chmod(temporary, 0o644)
    os.rename(temporary, os.path.join(ENGINES, name))


def step(name: str) -> Callable[[Callable[[], Dict[str, Any]]], Callable[[], bool]]:
    def wrap(body: Callable[[], Dict[str, Any]]) -> Callable[[], bool]:
        def run() -> bool:
            started = time.monotonic()
            try:
                record = body()
                ok = True
            except Exception:
                journal = sh("journalctl", "-b", "--no-pager", "-n", "60", "-o", "short-monotonic")["output"]
                record = {"error": traceback.format_exc() + "\nlast of the journal:\n" + journal}
                ok = False
            record["seconds"] = round(time.monotonic() - started, 2)
            results[name] = record
            save()
            return ok

        return run

    return wrap


def save() -> None:
    with open(params["results"] + "/results.json", "w") as handle:
        json.dump(results, handle, indent=1, sort_keys=True)


# -- steps -------------------------------------------------------------------------------
@step("install")
def install() -> Dict[str, Any]:
    """scripts/install.sh as on a device; the test's EPICS environment (its loopback ports) and a drop-in in place.

    With a wheelhouse (PTYCHONN_WHEELHOUSE on the host; CI makes one with scripts/wheelhouse.sh), the
    documented offline path: ``install.sh --wheels DIR --detector-pv PV --pv-prefix P``, with a stand-in
    ``tensorrt`` importable by the OS python and no CUDA, which must end serving on ONNX Runtime and say
    so. Without one, the venv borrows the host venv's packages, so pip needs no index. The drop-in only
    shortens the watchdog and restart delays.
    """
    env = dict(params["env"]["appliance"], PTYCHONN_EDGE_TEST_HANG_FILE=HANG_FILE)
    write_env(CONFIG_DIR + "/environment", env)
    write(DROPIN_DIR + "/60-test.conf", "[Service]\nWatchdogSec=4s\nRestartSec=1s\n")
    script = params["checkout"] + "/scripts/install.sh"
    configure = ["--detector-pv", params["detector_pv"], "--pv-prefix", params["prefix"]]  # ptychonn-edge setup
    if params.get("wheels"):
        stand_in = "/srv/test-env/tensorrt-stand-in"
        write(stand_in + "/tensorrt.py", "__version__ = '8.5.2.2'  # importable, as JetPack's is; no CUDA here\n")
        # --no-apt: a --volatile root has the host's /usr but no dpkg database (python3-venv, python3-systemd: the host's)
        mode, args = "wheels", ["bash", script, "--no-apt", "--no-start", "--wheels", params["wheels"]]
        first = sh("env", "PYTHONPATH=" + stand_in, *args, *configure, timeout=300)
    else:
        sh("python3", "-m", "venv", "--system-site-packages", VENV)
        site = sh(VENV + "/bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")["output"].strip()
        write(site + "/ptychonn-test-deps.pth", "import site; site.addsitedir({!r})\n".format(params["site_packages"]))
        mode = "borrowed venv"
        args = ["bash", script, "--no-apt", "--no-start", "--pip-args", "--no-index --no-build-isolation"]
        first = sh(*args, *configure, timeout=300)
    if first["rc"] != 0:
        raise AssertionError("install.sh failed:\n" + first["output"])
    configured = open(CONFIG_DIR + "/config.yaml").read()
    enabled_after_setup = sh("systemctl", "is-enabled", UNIT)["output"].strip()
    # The operator's own settings (a faster status period for the test), then the upgrade path: install again.
    write(CONFIG_DIR + "/config.yaml", params["config"])
    second = sh(*args, timeout=300)
    engines = os.stat(ENGINES)
    return {
        "mode": mode,
        "configured": configured,
        "enabled_after_setup": enabled_after_setup,
        "verify": sh("systemd-analyze", "verify", UNIT, "ptychonn-edge@test.service"),
        "security": sh("systemd-analyze", "security", "--no-pager", UNIT, "ptychonn-edge@test.service"),
        "first": first,
        "second": second,
        "enabled": sh("systemctl", "is-enabled", UNIT)["output"].strip(),
        "id": sh("id", "ptychonn-edge")["output"].strip(),
        "deploy_group": sh("getent", "group", "ptychonn-deploy")["output"].strip(),
        "engines_mode": oct(engines.st_mode & 0o7777),
        "engines_owner": [sh("id", "-nu", str(engines.st_uid))["output"].strip(),
                          sh("getent", "group", str(engines.st_gid))["output"].split(":")[0]],
        "engines_acl": {kind: acl_entries(ENGINES, kind) for kind in ("access", "default")},
        "config_kept": open(CONFIG_DIR + "/config.yaml").read() == params["config"],
        "network_interfaces": sorted(os.listdir("/sys/class/net")),
    }


@step("peers")
def peers() -> Dict[str, Any]:
    write_env("/srv/test-env/detector.env", params["env"]["detector"])
    write_env("/srv/test-env/collector.env", params["env"]["collector"])
    python, script = VENV + "/bin/python", params["checkout"] + "/tests/systemd/peers.py"
    detector = sh("systemd-run", "--unit=test-detector", "-p", "EnvironmentFile=/srv/test-env/detector.env",
                  python, script, "detector", params["detector_pv"], "50", params["results"] + "/detector-last-id")
    return {"detector": detector}


SSHD_CONFIG = """ListenAddress 127.0.0.1
Port {port}
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PidFile none
Subsystem sftp /usr/lib/openssh/sftp-server
"""


@step("deploy")
def deploy_first() -> Dict[str, Any]:
    """The first engine goes in with scripts/deploy-engine.sh over ssh, as a member of ptychonn-deploy."""
    if not os.path.exists("/usr/sbin/sshd"):
        deploy(params["models"]["first"])
        return {"skipped": "no /usr/sbin/sshd (apt-get install openssh-server)"}
    sh("useradd", "--system", "--no-create-home", "--home-dir", "/run/sshd", "sshd")  # privilege separation
    # Password "*": no password login, but not a locked account (sshd without PAM refuses those).
    sh("useradd", "--create-home", "--groups", "ptychonn-deploy", "--shell", "/bin/bash", "--password", "*",
       "deployer")
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/root/.ssh/id_ed25519")
    os.makedirs("/etc/ssh", exist_ok=True)
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/etc/ssh/ssh_host_ed25519_key")
    write("/home/deployer/.ssh/authorized_keys", open("/root/.ssh/id_ed25519.pub").read(), 0o600)
    sh("chown", "-R", "deployer:", "/home/deployer/.ssh")
    os.chmod("/home/deployer/.ssh", 0o700)
    write("/srv/test-env/sshd_config", SSHD_CONFIG.format(port=params["ssh_port"]))
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = sh("systemd-run", "--unit=test-sshd", "/usr/sbin/sshd", "-D", "-e", "-f", "/srv/test-env/sshd_config")
    options = "-o Port={} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null".format(
        params["ssh_port"])
    env = dict(os.environ, SSH_OPTIONS=options)
    # --no-wait: the service is not started yet, so nothing could judge the file (step "verdict" waits)
    script = [params["checkout"] + "/scripts/deploy-engine.sh", "--no-wait", "deployer@127.0.0.1",
              params["models"]["first"]]
    try:
        wait_until(lambda: sh("ssh", *options.split(), "deployer@127.0.0.1", "true")["rc"] == 0, 10, "sshd")
    except AssertionError:
        raise AssertionError("sshd not reachable: {}\n{}\n{}".format(
            sh("ssh", *options.split(), "deployer@127.0.0.1", "true")["output"], journal("test-sshd.service"),
            sh("ls", "-lan", "/home", "/home/deployer", "/home/deployer/.ssh")["output"]))
    done = subprocess.run(script, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          env=env, timeout=60)
    if done.returncode != 0:
        raise AssertionError("deploy-engine.sh failed ({}):\n{}".format(done.returncode, done.stdout))
    target = os.path.join(ENGINES, os.path.basename(params["models"]["first"]))
    info = os.stat(target)
    params["ssh_options"] = options
    return {
        "sshd": sshd, "rc": done.returncode, "output": done.stdout,
        "mode": oct(info.st_mode & 0o777),
        "owner": [sh("id", "-nu", str(info.st_uid))["output"].strip(),
                  sh("getent", "group", str(info.st_gid))["output"].split(":")[0]],
        "engines_listing": sorted(os.listdir(ENGINES)),
        "same_content": open(target, "rb").read() == open(params["models"]["first"], "rb").read(),
    }


def start_collector() -> Dict[str, Any]:
    python, script = VENV + "/bin/python", params["checkout"] + "/tests/systemd/peers.py"
    return sh("systemd-run", "--unit=test-collector", "-p", "EnvironmentFile=/srv/test-env/collector.env",
              python, script, "collect", params["prefix"] + ":Phase", params["results"] + "/phase-ids")


@step("start")
def start() -> Dict[str, Any]:
    began = time.monotonic()
    started = sh("systemctl", "start", UNIT)
    after_start = show()
    record = {"start": started, "after_start": after_start, "start_seconds": round(time.monotonic() - began, 2)}
    record["collector"] = start_collector()
    record["flowing"] = wait_until(flowing_now, 30, "frames flowing")
    record["phase_ids"] = len(wait_until(lambda: phase_ids(), 15, "phase images on P:Phase"))
    # As a user on the device asks, from a bare shell: the appliance's environment file finds it. The
    # command is on PATH where /usr/local/bin is writable (here /usr is the host's, read-only: the venv's).
    command = "/usr/local/bin/ptychonn-edge"
    status = sh(command if os.path.exists(command) else VENV + "/bin/ptychonn-edge", "status", "--json")
    record["status_backend"] = json.loads(status["output"]).get("engine_backend") if status["rc"] == 0 else status
    entries = [json.loads(line) for line in sh("journalctl", "-u", UNIT, "-o", "json")["output"].splitlines()
               if line.startswith("{")]
    started_entries = [e for e in entries if str(e.get("MESSAGE", "")).startswith("started with")]
    record["journal_started_entry"] = started_entries[-1] if started_entries else None
    return record


def merged(status: str) -> int:
    """Frames merged, from the collector's STATUS= line (0 before it says)."""
    match = re.search(r"merged (\d+) from", status)
    return int(match.group(1)) if match else 0


@step("collector_unit")
def collector_unit() -> Dict[str, Any]:
    """The collector role as installed: ptychonn-edge-collect@test, sandboxed as the appliance, merges its
    P:Phase, READY only once it serves, and stops cleanly."""
    unit = "ptychonn-edge-collect@test.service"
    write(CONFIG_DIR + "/collect-test.yaml", params["collect_config"])
    write_env(CONFIG_DIR + "/collect-test.env", params["env"]["collector_unit"])
    started = sh("systemctl", "start", unit)
    after_start = show(unit)
    merging = wait_until(unit_when(lambda s: merged(s["StatusText"]) > 0, unit), 60, "the collector merging")
    user = sh("ps", "-o", "user=", "-p", merging["MainPID"])["output"].strip()
    stopped = sh("systemctl", "stop", unit)
    return {"start": started, "after_start": after_start, "merging": merging, "user": user, "stop": stopped,
            "after_stop": show(unit), "journal": journal(unit)[-3000:]}


@step("sandbox")
def sandbox() -> Dict[str, Any]:
    pid = show()["MainPID"]
    with open("/proc/{}/status".format(pid)) as handle:
        status = dict(line.split(":", 1) for line in handle if ":" in line)
    probe_unit = "/etc/systemd/system/ptychonn-probe.service"
    text = sh("systemctl", "cat", UNIT)["output"]
    keep = [line for line in text.splitlines() if not line.startswith(("#", "ExecStart=", "ExecReload=", "Type=",
                                                                        "Watchdog", "Restart", "NotifyAccess="))]
    keep.insert(keep.index("[Service]") + 1, "Type=oneshot\nExecStart=/usr/bin/python3 /srv/test/probe.py {}".format(
        "/home/alice/secret.txt"))
    write("/home/alice/secret.txt", "not for the appliance")
    write(probe_unit, "\n".join(keep) + "\n")
    sh("systemctl", "daemon-reload")
    run = sh("systemctl", "start", "ptychonn-probe.service")
    try:
        with open(STATE + "/state/probe.json") as handle:
            probe = json.load(handle)
    except (OSError, ValueError) as exc:
        probe = {"error": str(exc), "journal": journal("ptychonn-probe.service")}
    os.unlink(probe_unit)
    sh("systemctl", "daemon-reload")
    in_namespace = {
        "write_config_dir": sh("nsenter", "-t", pid, "-m", "touch", CONFIG_DIR + "/.x")["rc"],
        "write_engines": sh("nsenter", "-t", pid, "-m", "touch", ENGINES + "/.x")["rc"],
        "list_home": sh("nsenter", "-t", pid, "-m", "ls", "-A", "/home")["output"].strip(),
    }
    return {
        "uid": status["Uid"].split(), "gid": status["Gid"].split(), "groups": status["Groups"].split(),
        "service_uid": sh("id", "-u", "ptychonn-edge")["output"].strip(),
        "service_gid": sh("id", "-g", "ptychonn-edge")["output"].strip(),
        "video_gid": sh("getent", "group", "video")["output"].split(":")[2],
        "probe_run": run, "probe": probe, "main_process_namespace": in_namespace,
    }


@step("verdict")
def verdict() -> Dict[str, Any]:
    """A broken model deployed with scripts/deploy-engine.sh: the deployer is told it was rejected, and why."""
    if "ssh_options" not in params:
        return {"skipped": "no sshd: step deploy did not run deploy-engine.sh"}
    broken = "/srv/test-env/broken.onnx"
    write(broken, open(params["models"]["second"], "rb").read()[:64].decode("latin-1"))
    script = [params["checkout"] + "/scripts/deploy-engine.sh", "--timeout", "60", "deployer@127.0.0.1", broken]
    done = subprocess.run(script, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          env=dict(os.environ, SSH_OPTIONS=params["ssh_options"]), timeout=180)
    os.unlink(os.path.join(ENGINES, "broken.onnx"))
    return {"rc": done.returncode, "output": done.stdout, "after": show()}


@step("reload")
def reload() -> Dict[str, Any]:
    before = show()
    ids_before = len(phase_ids())
    deploy(params["models"]["second"])
    reloaded = sh("systemctl", "reload", UNIT)
    second = os.path.basename(params["models"]["second"])
    state = wait_until(unit_when(lambda s: second in s["StatusText"] and flowing(s["StatusText"])), 20,
                       "the second engine serving")
    wait_until(lambda: len(phase_ids()) > ids_before + 25, 15, "phase images after the reload")
    return {"before": before, "reload": reloaded, "after": state, "phase_ids": phase_ids(),
            "journal": journal()[-3000:]}


@step("watchdog")
def watchdog() -> Dict[str, Any]:
    before = show()
    write(HANG_FILE, "")
    try:
        wait_until(unit_when(lambda s: int(s["NRestarts"]) > int(before["NRestarts"])), 30,
                   "a restart by the watchdog")
    finally:
        os.unlink(HANG_FILE)
    restarted = show()
    recovered = wait_until(flowing_now, 30, "frames flowing after the restart")
    return {"before": before, "restarted": restarted, "recovered": recovered, "journal": journal()[-6000:]}


_RESTART_GAP = re.compile(r"restart gap: previous run last published uniqueId (\d+), this one first (\d+): (\w+) frames lost")


def restart_gap_logged(pid: str) -> Optional[Dict[str, Any]]:
    """The restart gap the process ``pid`` logged, once it has."""
    found = _RESTART_GAP.search(sh("journalctl", "--no-pager", "-o", "cat", "_PID=" + pid)["output"])
    if found is None:
        return None
    lost = found.group(3)
    return {"previous_last_id": int(found.group(1)), "first_id": int(found.group(2)),
            "frames_lost": None if lost == "None" else int(lost)}


@step("crash")
def crash() -> Dict[str, Any]:
    """A SIGSEGV mid-scan, as a pvapy crash would be: systemd restarts the service, which reports its gap."""
    before = wait_until(flowing_now, 30, "frames flowing before the crash")
    sh("systemctl", "kill", "--kill-whom=main", "--signal=SIGSEGV", UNIT)
    restarted = wait_until(unit_when(lambda s: int(s["NRestarts"]) > int(before["NRestarts"])), 30,
                           "a restart after the crash")
    recovered = wait_until(flowing_now, 30, "frames flowing after the restart")
    gap = wait_until(lambda: restart_gap_logged(recovered["MainPID"]), 10, "the restart gap in the journal")
    wait_until(lambda: max(phase_ids()) >= gap["first_id"], 10, "frames after the restart on P:Phase")
    return {"before": before, "restarted": restarted, "recovered": recovered, "gap": gap,
            "phase_ids": phase_ids(), "journal": journal()[-3000:]}


@step("stop")
def stop() -> Dict[str, Any]:
    """Frames pile up behind a blocked pipeline; SIGTERM must still publish every one of them."""
    write(HANG_FILE, "")
    time.sleep(1.0)  # about 50 frames accumulate in the ring at 50 Hz
    sh("systemctl", "kill", "--signal=SIGUSR1", "test-detector.service")
    last_id_file = params["results"] + "/detector-last-id"
    wait_until(lambda: os.path.exists(last_id_file), 5, "the detector stand-in to stop sending")
    last_id = int(wait_until(lambda: open(last_id_file).read().strip(), 5, "the last id sent"))
    sh("systemctl", "stop", "--no-block", UNIT)
    wait_until(unit_when(lambda s: s["ActiveState"] in ("deactivating", "inactive", "failed")), 10,
               "deactivating")
    os.unlink(HANG_FILE)
    final = wait_until(unit_when(lambda s: s["ActiveState"] in ("inactive", "failed")), 60, "the service stopped")
    wait_until(lambda: last_id in phase_ids(), 10, "the last frame sent on P:Phase")
    return {"last_id": last_id, "final": final, "phase_ids": phase_ids(), "journal": journal()[-3000:]}


def test_only_modules(*names: str) -> str:
    """A directory holding only ``names`` from the host venv (links): test dependencies for the service's
    PYTHONPATH that shadow nothing the installed appliance brought."""
    directory = "/srv/test-env/test-only-modules"
    os.makedirs(directory, exist_ok=True)
    for entry in os.listdir(params["site_packages"]):
        if entry.split(".")[0] in names and not entry.endswith((".dist-info", ".pth")):
            link = os.path.join(directory, entry)
            if not os.path.lexists(link):
                os.symlink(os.path.join(params["site_packages"], entry), link)
    return directory


@step("autobuild")
def autobuild() -> Dict[str, Any]:
    """On a TensorRT device (the FAKE TensorRT and GPU, through a drop-in), the sandboxed service builds
    the deployed ONNX model in a child process and swaps the engine in."""
    fake = "/srv/test/fake_tensorrt/child:/srv/test"  # a copy: the checkout may be where the sandbox cannot see
    if params.get("wheels"):  # the fake's ONNX parser needs onnx, a test dependency the wheelhouse lacks
        fake += ":" + test_only_modules("onnx", "ml_dtypes", "typing_extensions")
    dropin = DROPIN_DIR + "/70-fake-tensorrt.conf"
    write(dropin, "[Service]\nEnvironment=PYTHONPATH={}\nEnvironment=FAKE_TENSORRT_VERSION=8.5.2.2\n".format(fake))
    sh("systemctl", "daemon-reload")
    sh("systemctl", "reset-failed", UNIT)
    try:
        started = sh("systemctl", "start", UNIT)
        built = wait_until(unit_when(lambda s: "trt8.5.2.2" in s["StatusText"]), 60, "the built engine serving")
        cache = STATE + "/state/engine-cache"
        files = {name: sh("stat", "-c", "%U %a", os.path.join(cache, name))["output"].strip()
                 for name in sorted(os.listdir(cache))}
        # journald may store the swap's log line a little after the status shows it
        logged = wait_until(lambda: invocation_journal(built, containing=" from second.onnx"), 10,
                            "the build's result in the journal")
        return {"start": started, "built": built, "cache": files, "journal": logged}
    finally:
        sh("systemctl", "stop", UNIT)
        os.unlink(dropin)
        sh("systemctl", "daemon-reload")


@step("broken_config")
def broken_config() -> Dict[str, Any]:
    write(CONFIG_DIR + "/config.yaml", "pipeline:\n  max_batch: 0\nno_such_section: {}\n")
    sh("systemctl", "reset-failed", UNIT)
    started = sh("systemctl", "start", UNIT)
    first = show()
    time.sleep(3.0)  # an observation window: with RestartSec=1s a restart storm would show by now
    return {"start": started, "first": first, "later": show(), "journal": journal()[-3000:]}


@step("uninstall")
def uninstall() -> Dict[str, Any]:
    removed = sh("bash", params["checkout"] + "/scripts/install.sh", "--uninstall")
    return {
        "uninstall": removed,
        "unit_known": sh("systemctl", "cat", UNIT)["rc"] == 0,
        "venv_exists": os.path.exists(VENV),
        "config_kept": os.path.exists(CONFIG_DIR + "/config.yaml"),
    }


def main() -> None:
    with open(PARAMS) as handle:
        params.update(json.load(handle))
    results["python"] = sys.version
    # The container's only link is loopback, which wait-online never calls online: network-online.target
    # would hold the service's start for wait-online's two minutes
    sh("systemctl", "mask", "--runtime", "systemd-networkd-wait-online.service")
    if install() and peers() and deploy_first() and start():
        collector_unit()
        sandbox()
        verdict()
        reload()
        watchdog()
        crash()
        stop()
        autobuild()
    broken_config()
    uninstall()
    for unit in ("test-collector.service", "test-detector.service", "test-sshd.service"):
        sh("systemctl", "stop", unit)
    results["complete"] = True
    save()


if __name__ == "__main__":
    main()
