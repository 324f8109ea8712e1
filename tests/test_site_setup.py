"""Install -> configure -> start: the appliance refuses the example's detector PV, and
``ptychonn-edge setup`` writes a site's detector PV, prefix and interface (validated as check-config does)."""
from __future__ import annotations

import os
import subprocess
import sys

from appliance import service
from appliance.config import load_config
from appliance.status_view import local_client_settings, read_environment_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "systemd", "config.example.yaml")


def cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)


def _example_copy(tmp_path) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(open(EXAMPLE).read())
    return str(path)


def test_the_appliance_refuses_the_example_detector_pv_with_the_key_the_file_and_the_no_restart_code(
        tmp_path, appliance_env):
    config = _example_copy(tmp_path)
    run = cli("run", "--config", config, env=appliance_env)
    said = run.stdout + run.stderr
    # Exit 2 is the unit's RestartPreventExitStatus (tests/systemd/test_units.py): no restart loop.
    assert run.returncode == service.EXIT_CONFIG == 2, said
    assert "detector.pv" in said and config in said and "13SIM1:Pva1:Image" in said and "setup" in said, said
    assert "started with" not in said


def test_check_config_refuses_the_example_only_when_asked_for_the_service(tmp_path):
    config = _example_copy(tmp_path)
    assert cli("check-config", config).returncode == 0
    checked = cli("check-config", "--service", config)
    assert checked.returncode == 2 and "detector.pv" in checked.stderr and config in checked.stderr


def test_setup_writes_the_detector_prefix_and_interface_and_the_result_is_served(tmp_path):
    config, environment = _example_copy(tmp_path), str(tmp_path / "environment")
    (tmp_path / "environment").write_text("# site notes\nEPICS_PVA_SERVER_PORT=15075\nEPICS_PVA_ADDR_LIST=10.0.0.255\n")
    done = cli("setup", "--config", config, "--environment", environment, "--detector-pv", "BL7:Eiger:Pva1:Image",
               "--prefix", "BL7:NN", "--interface", "lo")
    assert done.returncode == 0, done.stderr
    written = load_config(config)
    assert (written.detector.pv, written.publish.prefix) == ("BL7:Eiger:Pva1:Image", "BL7:NN")
    assert written.detector.positions.x == "SampleX" and written.pipeline.drain_timeout_s == 10.0  # the rest kept
    assert cli("check-config", "--service", config).returncode == 0
    variables = read_environment_file(environment)
    assert variables == {
        "EPICS_PVA_SERVER_PORT": "15075",  # not set by setup: kept
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_PVA_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO", "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    }
    assert "# site notes" in open(environment).read()
    # status/watch/verdict on the device then look for the appliance on that interface
    assert local_client_settings(variables)["EPICS_PVA_ADDR_LIST"].startswith("127.0.0.1")


def test_setup_refuses_what_check_config_refuses_and_changes_nothing(tmp_path):
    config, environment = _example_copy(tmp_path), str(tmp_path / "environment")
    before = open(config).read()
    cases = {
        ("--prefix", "has space"): "publish.prefix: got 'has space' (str); expected a PV name prefix",
        ("--detector-pv", "13SIM1:Pva1:Image"): "detector.pv is 13SIM1:Pva1:Image, the example's",
        ("--interface", "no-such-if0"): "--interface no-such-if0: no such network interface here",
        ("--address", "eth0"): "--address eth0: expected an IPv4 address",
        (): "nothing to set",
    }
    for arguments, expected in cases.items():
        refused = cli("setup", "--config", config, "--environment", environment, *arguments)
        assert refused.returncode == 2 and expected in refused.stderr, (arguments, refused.stderr)
    assert open(config).read() == before and not os.path.exists(environment)
    assert sorted(os.listdir(str(tmp_path))) == ["config.yaml"]  # no partial files left behind
