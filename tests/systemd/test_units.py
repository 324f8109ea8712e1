"""Static checks of the shipped units and snippets, with systemd's own tools (no boot needed).

The same checks run against the installed units inside a booted container in
test_under_systemd.py, where the ExecStart binary exists.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional

import pytest

from installer import run_installer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SYSTEMD_DIR = os.path.join(ROOT, "systemd")
UNITS = ["ptychonn-edge.service", "ptychonn-edge@.service"]
COLLECTOR_UNIT = "ptychonn-edge-collect@.service"
EXEC_START = "/opt/ptychonn-edge/venv/bin/ptychonn-edge"

needs_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")


def _run(*args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          cwd=SYSTEMD_DIR, env=env, timeout=60)


def _verify_complaints(output: str) -> List[str]:
    complaints = output.splitlines()
    if not os.path.exists(EXEC_START):  # not installed on this machine: the only complaint allowed
        complaints = [line for line in complaints if "Command {} is not executable".format(EXEC_START) not in line]
    return complaints


def _exposure(output: str) -> float:
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert score is not None, output
    return float(score.group(1))


@needs_analyze
@pytest.mark.parametrize("unit", UNITS + [COLLECTOR_UNIT])
def test_unit_verifies_clean(unit):
    result = _run("systemd-analyze", "verify", "--man=no", "./" + unit)
    assert _verify_complaints(result.stdout) == [], result.stdout


@needs_analyze
@pytest.mark.parametrize("unit", UNITS + [COLLECTOR_UNIT])
def test_unit_exposure_is_at_most_2(unit):
    result = _run("systemd-analyze", "security", "--offline=true", "--no-pager", "./" + unit)
    assert _exposure(result.stdout) <= 2.0, result.stdout


def _lines(unit: str) -> List[str]:
    with open(os.path.join(SYSTEMD_DIR, unit)) as handle:
        return [line for line in handle.read().splitlines() if line and not line.startswith("#")]


def test_template_differs_from_the_unit_only_where_the_instance_matters():
    """Both files are maintained by hand; a directive changed in one must change in the other."""
    single, template = _lines(UNITS[0]), _lines(UNITS[1])
    only_single = [line for line in single if line not in template]
    only_template = [line for line in template if line not in single]
    assert only_single == [
        "Description=PtychoNN edge inference appliance",
        "ExecStart={} run --config /etc/ptychonn-edge/config.yaml".format(EXEC_START),
        "StateDirectory=ptychonn-edge/state",
        "WorkingDirectory=/var/lib/ptychonn-edge/state",
    ]
    assert only_template == [
        "Description=PtychoNN edge inference appliance (%i)",
        "EnvironmentFile=-/etc/ptychonn-edge/%i.env",
        "ExecStart={} run --config /etc/ptychonn-edge/%i.yaml".format(EXEC_START),
        "StateDirectory=ptychonn-edge/%i",
        "WorkingDirectory=/var/lib/ptychonn-edge/%i",
    ]


def test_unit_relies_on_the_exit_codes_the_service_uses():
    from appliance import service

    assert "RestartPreventExitStatus={}".format(service.EXIT_CONFIG) in _lines(UNITS[0])
    assert "RestartPreventExitStatus={}".format(service.EXIT_CONFIG) in _lines(COLLECTOR_UNIT)
    assert service.EXIT_FAILED != service.EXIT_CONFIG


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("systemd-sysusers"),
                    reason="needs root and systemd-sysusers/systemd-tmpfiles (creates files owned by other users)")
def test_sysusers_and_tmpfiles_snippets_apply_to_an_empty_root(tmp_path):
    root = str(tmp_path)
    for kind in ("sysusers.d", "tmpfiles.d"):
        os.makedirs(os.path.join(root, "etc", kind))
        shutil.copy(os.path.join(SYSTEMD_DIR, kind, "ptychonn-edge.conf"), os.path.join(root, "etc", kind))
    sysusers = _run("systemd-sysusers", "--root=" + root, "ptychonn-edge.conf")
    assert sysusers.returncode == 0, sysusers.stdout
    with open(os.path.join(root, "etc", "group")) as handle:
        groups = {line.split(":")[0]: line.strip().split(":") for line in handle}
    assert groups["video"][3] == "ptychonn-edge"
    assert "ptychonn-deploy" in groups and "ptychonn-edge" in groups
    # The ACL line needs the names resolvable by the host's NSS: it is checked in the container test.
    tmpfiles = _run("systemd-tmpfiles", "--root=" + root, "--create", "ptychonn-edge.conf")
    assert tmpfiles.returncode == 0, tmpfiles.stdout
    engines = os.stat(os.path.join(root, "var/lib/ptychonn-edge/engines"))
    top = os.stat(os.path.join(root, "var/lib/ptychonn-edge"))
    assert oct(engines.st_mode & 0o7777) == "0o2775" and engines.st_uid == 0
    assert engines.st_gid == int(groups["ptychonn-deploy"][2])
    assert (top.st_uid, top.st_gid, oct(top.st_mode & 0o7777)) == (0, 0, "0o755")


# -- the GPU drop-in scripts/install.sh writes (DevicePolicy=closed) ----------------------------
# Character devices as `find /dev -type c -printf '%p %g\n'` lists them, trimmed to what matters.
OTHER_DEVICES = ["/dev/null root", "/dev/tty0 tty", "/dev/ttyTHS0 dialout", "/dev/fb0 video", "/dev/video0 video",
                 "/dev/dri/card0 video", "/dev/i2c-1 i2c"]
JETPACK5_GPU = ["/dev/nvmap video"] + ["/dev/nvhost-{} video".format(name) for name in (
    "as-gpu", "ctrl", "ctrl-gpu", "ctxsw-gpu", "dbg-gpu", "gpu", "prof-gpu", "sched-gpu", "tsg-gpu",
    "nvdla0", "nvdla1", "ctrl-nvdla0", "ctrl-nvdla1")]
# Orin: the out-of-tree nvgpu; its CUDA also opens the sync-fence node and the iGPU's DRM render node.
JETPACK6_GPU = ["/dev/nvmap video", "/dev/host1x-fence video", "/dev/dri/renderD128 render"] + [
    "/dev/nvgpu/igpu0/{} video".format(name) for name in (
        "as", "channel", "ctrl", "ctxsw", "dbg", "nvsched", "power", "prof", "prof-ctx", "prof-dev", "sched", "tsg")]
DISCRETE_GPU = ["/dev/nvidia0 root", "/dev/nvidiactl root", "/dev/nvidia-uvm root", "/dev/nvidia-uvm-tools root",
                "/dev/nvidia-caps/nvidia-cap1 root"]
# Render nodes serve CUDA only beside nvgpu (JetPack 6); on JetPack 5 and a PC they are the display GPU's.
DISPLAY_RENDER_NODE = ["/dev/dri/renderD128 render"]


def _gpu_dropin(devices: List[str]) -> str:
    result = run_installer("gpu_device_nodes | gpu_dropin", stdin="".join(line + "\n" for line in sorted(devices)))
    assert result.returncode == 0, result.stderr
    return result.stdout


def _allowed(dropin: str) -> List[str]:
    return sorted(line[len("DeviceAllow="):] for line in dropin.splitlines() if line.startswith("DeviceAllow="))


def _nodes(devices: List[str]) -> List[str]:
    return sorted(line.split()[0] + " rw" for line in devices)


@pytest.mark.parametrize("gpu, others", [
    (JETPACK5_GPU, OTHER_DEVICES + DISPLAY_RENDER_NODE),
    (JETPACK6_GPU, OTHER_DEVICES),
    (DISCRETE_GPU, OTHER_DEVICES + DISPLAY_RENDER_NODE),
], ids=["jetpack5", "jetpack6", "discrete"])
def test_gpu_dropin_allows_exactly_the_gpu_nodes(gpu, others):
    dropin = _gpu_dropin(gpu + others)
    assert _allowed(dropin) == _nodes(gpu)
    assert ("SupplementaryGroups" in dropin) == (gpu is JETPACK6_GPU)


def test_jetpack6_dropin_adds_the_render_group_of_its_render_node():
    """/dev/dri/renderD* is group render, not video: without it CUDA cannot open the iGPU."""
    dropin = _gpu_dropin(JETPACK6_GPU + OTHER_DEVICES)
    assert "DeviceAllow=/dev/host1x-fence rw" in dropin.splitlines()
    assert [line for line in dropin.splitlines() if line.startswith("SupplementaryGroups=")] == [
        "SupplementaryGroups=render"]


def test_no_gpu_no_dropin():
    assert _gpu_dropin(OTHER_DEVICES) == ""


@needs_analyze
@pytest.mark.parametrize("gpu", [JETPACK5_GPU, JETPACK6_GPU], ids=["jetpack5", "jetpack6"])
@pytest.mark.parametrize("unit", UNITS)
def test_units_with_the_gpu_dropin_verify_clean_and_stay_at_most_2(tmp_path, unit, gpu):
    shutil.copy(os.path.join(SYSTEMD_DIR, unit), str(tmp_path))
    os.mkdir(str(tmp_path / (unit + ".d")))
    (tmp_path / (unit + ".d") / "50-gpu-devices.conf").write_text(_gpu_dropin(gpu + OTHER_DEVICES))
    env = dict(os.environ, SYSTEMD_UNIT_PATH=str(tmp_path) + ":")  # the trailing colon keeps the default path
    name = unit.replace("@.", "@gpu.")
    verify = _run("systemd-analyze", "verify", "--man=no", name, env=env)
    assert _verify_complaints(verify.stdout) == [], verify.stdout
    security = _run("systemd-analyze", "security", "--offline=true", "--no-pager", name, env=env)
    assert "/dev/nvmap:rw" in security.stdout, security.stdout  # the drop-in was read
    assert _exposure(security.stdout) <= 2.0, security.stdout
