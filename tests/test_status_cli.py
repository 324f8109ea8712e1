"""``ptychonn-edge status`` against a running appliance: what it prints, and that reading costs the appliance nothing.

pvapy's server keeps about 41 kB for every channel a pvapy client ever opened
to it (docs/deploy.md): an operator's script calling ``status`` every few
seconds would grow the appliance without bound. Each read here is what one
``status`` call does, in a client process of its own ports.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from appliance.sim.detector import DetectorProcess
from appliance.sim.loopback import free_ports, loopback_env

from harness import write_config
from onnx_models import affine_model

READS = 200  # through pvapy these would keep about 8 MB in the appliance


def _rss_kb(pid: int) -> int:
    with open("/proc/{}/status".format(pid)) as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _client_env(appliance_ports):
    env = dict(os.environ)
    env.update(loopback_env(free_ports()))
    return env


def _read_status(env, prefix: str, count: int) -> None:
    """``count`` status reads, each as the command makes it, in one child (starting one per read takes minutes)."""
    code = ("import sys\nfrom appliance.status_view import read_status\n"
            "for _ in range({}):\n    assert read_status(sys.argv[1], 10.0)['state'] == 'serving'\n").format(count)
    run = subprocess.run([sys.executable, "-c", code, prefix + ":Status"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr


def test_status_prints_the_snapshot_and_repeated_reads_leave_the_appliance_as_it_was(tmp_path, launch,
                                                                                     appliance_ports):
    detector = DetectorProcess("STATUS:det:Image")
    try:
        model = affine_model(str(tmp_path / "identity.onnx"), size=16)
        app = launch(write_config(str(tmp_path / "config.yaml"), "STATUS:det:Image", "STATUS:pn", engine_path=model),
                     "STATUS:pn")
        env = _client_env(appliance_ports)
        shown = subprocess.run([sys.executable, "-m", "appliance.cli", "status", "--prefix", "STATUS:pn"], env=env,
                               capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        assert "state:      serving" in shown.stdout and "engine:     identity.onnx [onnxruntime]" in shown.stdout
        assert "detector:   STATUS:det:Image connected" in shown.stdout
        raw = subprocess.run([sys.executable, "-m", "appliance.cli", "status", "--prefix", "STATUS:pn", "--json"],
                             env=env, capture_output=True, text=True, timeout=120)
        strict = json.loads(raw.stdout, parse_constant=lambda name: pytest.fail("not JSON: " + name))
        assert strict["state"] == "serving" and strict["detector_pv"] == "STATUS:det:Image"

        _read_status(env, "STATUS:pn", 20)  # the first reads settle what any client's first connection costs
        before = _rss_kb(app.process.pid)
        _read_status(env, "STATUS:pn", READS)
        grown = _rss_kb(app.process.pid) - before
        assert grown < 2000, "{} status reads kept {} kB in the appliance".format(READS, grown)
    finally:
        detector.close()
