"""``ptychonn-edge verdict``: the person deploying a model learns what the appliance made of it.

The command runs as on the device: no EPICS settings in its shell, only the service's
environment file, from which it finds the appliance on this host.
"""
from __future__ import annotations

import os
import subprocess
import sys

from appliance.engines.files import file_sha256
from appliance.sim.loopback import loopback_env
from appliance.status_view import local_client_settings, read_environment_file, verdict_of

from harness import write_config
from onnx_models import affine_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_service_environment_file_tells_a_client_on_this_host_where_the_appliance_answers(tmp_path):
    service = loopback_env({"tcp": 5101, "udp": 5102})  # as the tests' appliances
    path = tmp_path / "environment"
    path.write_text("# EPICS settings\n\n" + "".join('{}="{}"\n'.format(k, v) for k, v in service.items()))
    assert read_environment_file(str(path)) == service
    assert local_client_settings(service) == {
        "EPICS_PVA_AUTO_ADDR_LIST": "NO", "EPICS_PVA_ADDR_LIST": "127.0.0.1:5102",
        "EPICS_PVA_NAME_SERVERS": "127.0.0.1:5101"}  # the appliance's own ports
    assert local_client_settings({"EPICS_PVAS_INTF_ADDR_LIST": "10.0.0.5", "EPICS_PVAS_BROADCAST_PORT": "5076"})[
        "EPICS_PVA_ADDR_LIST"] == "10.0.0.5:5076"
    assert read_environment_file(str(tmp_path / "absent")) == {}


def test_a_verdict_is_given_once_the_file_is_judged_and_serving():
    judged = {"engine_verdicts": [{"file": "a.onnx", "sha256": "aa", "accepted": True, "reason": ""},
                                  {"file": "b.onnx", "sha256": "bb", "accepted": False, "reason": "truncated"}],
              "engine_sha256": "cc", "engine_backend": "onnxruntime"}
    assert verdict_of(judged, "bb") == (1, "rejected: truncated")
    assert verdict_of(judged, "aa") is None  # accepted, not yet swapped in
    assert verdict_of(dict(judged, engine_sha256="aa"), "aa") == (0, "accepted and serving: a.onnx [onnxruntime]")
    assert verdict_of(judged, "dd") is None


def _verdict(sha256: str, environment: str, prefix: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    bare = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    bare["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "appliance.cli", "verdict", sha256, "--prefix", prefix,
                           "--environment", environment, "--timeout", str(timeout)],
                          env=bare, capture_output=True, text=True, timeout=timeout + 60)


def test_deployed_files_get_their_verdict_from_a_shell_with_only_the_service_environment(
        tmp_path, names, detector, launch, appliance_env):
    engines = tmp_path / "engines"
    engines.mkdir()
    affine_model(str(engines / "first.onnx"), size=16)
    good = affine_model(str(tmp_path / "good.onnx"), size=16, scale=2.0)
    launch(write_config(str(tmp_path / "config.yaml"), names["detector"], names["prefix"], engine_dir=str(engines),
                        engine={"settle_s": 0.1}), names["prefix"])
    environment = tmp_path / "environment"
    environment.write_text("".join("{}={}\n".format(k, v) for k, v in appliance_env.items() if k.startswith("EPICS_")))

    os.replace(good, str(engines / "good.onnx"))
    accepted = _verdict(file_sha256(str(engines / "good.onnx")), str(environment), names["prefix"])
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip() == "accepted and serving: good.onnx [onnxruntime]"

    broken = engines / "broken.onnx"
    broken.write_bytes(open(str(engines / "good.onnx"), "rb").read()[:100])
    rejected = _verdict(file_sha256(str(broken)), str(environment), names["prefix"])
    assert rejected.returncode == 1 and rejected.stderr.startswith("rejected: "), rejected.stderr
    assert "broken.onnx" in rejected.stderr

    silent = _verdict("0" * 64, str(environment), names["prefix"], timeout=2.0)
    assert silent.returncode == 3 and silent.stderr.startswith("no verdict within 2 s"), silent.stderr
