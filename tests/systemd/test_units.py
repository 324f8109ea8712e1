"""Static checks of the shipped units and snippets, with systemd's own tools (no boot needed).

The same checks run against the installed units inside a booted container in
test_under_systemd.py, where the ExecStart binary exists.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SYSTEMD_DIR = os.path.join(ROOT, "systemd")
UNITS = ["ptychonn-edge.service", "ptychonn-edge@.service"]
EXEC_START = "/opt/ptychonn-edge/venv/bin/ptychonn-edge"

needs_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          cwd=SYSTEMD_DIR, timeout=60)


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies_clean(unit):
    result = _run("systemd-analyze", "verify", "--man=no", "./" + unit)
    complaints = result.stdout.splitlines()
    if not os.path.exists(EXEC_START):  # not installed on this machine: the only complaint allowed
        complaints = [line for line in complaints if "Command {} is not executable".format(EXEC_START) not in line]
    assert complaints == [], result.stdout


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_is_at_most_2(unit):
    result = _run("systemd-analyze", "security", "--offline=true", "--no-pager", "./" + unit)
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert score is not None, result.stdout
    assert float(score.group(1)) <= 2.0, result.stdout


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
