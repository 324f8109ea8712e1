"""Several appliances on one detector through the PVA data distributor: config, request, accounting.

The splitting itself is the detector server's (pvapy's ``pydistributor`` plugin): these tests check
that we ask for it as pvapy's hpc consumer does, and that an instance's holes in ``uniqueId`` are
reported as its peers' ids, not as losses.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from appliance.config import parse_config
from appliance.pva import monitor_request
from appliance.schema import SchemaError
from appliance.sim.loopback import free_ports
from appliance.sim.process import ApplianceProcess, write_config

from harness import Collector, appliance_process_env
from onnx_models import affine_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_off_by_default_and_the_request_is_unchanged():
    config = parse_config("")
    assert config.detector.distributor.enabled is False
    assert monitor_request(1000) == "record[queueSize=1000]field()"


def test_the_request_is_the_one_pvapy_hpc_consumer_builds():
    distributor = parse_config("detector: {distributor: {enabled: true, group: g1, updates: 8}}").detector.distributor
    assert distributor.plugin_option() == "pydistributor=group:g1;trigger:uniqueId;updates:8"
    assert monitor_request(100, distributor.plugin_option()) == (
        "record[queueSize=100]field(_[pydistributor=group:g1;trigger:uniqueId;updates:8])")
    with_set = parse_config("detector: {distributor: {enabled: true, plugin: distributor, group: g, set: s2}}")
    assert with_set.detector.distributor.plugin_option() == "distributor=group:g;set:s2;trigger:uniqueId;updates:1"


def test_a_group_is_required_and_values_cannot_break_the_request():
    with pytest.raises(SchemaError) as missing:
        parse_config("detector: {distributor: {enabled: true}}")
    assert "detector.distributor: detector.distributor.group is required" in str(missing.value)
    with pytest.raises(SchemaError) as bad:
        parse_config("detector: {distributor: {group: 'a;updates:9', set: 'x]', updates: 0, plugin: ''}}")
    problems = bad.value.problems
    assert len(problems) == 4, problems
    assert any(p.startswith("detector.distributor.group: got 'a;updates:9'") for p in problems)
    assert any(p.startswith("detector.distributor.set: got 'x]'") for p in problems)
    assert any(p.startswith("detector.distributor.updates: got 0 (int); expected 1..100000") for p in problems)


def test_check_config_shows_the_distributor(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("detector: {distributor: {enabled: true, group: beamline, updates: 4}}\n")
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "check-config", str(path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "  distributor:\n    enabled: true\n    plugin: pydistributor\n    group: beamline\n" in result.stdout
    assert "    updates: 4\n" in result.stdout


def test_two_instances_split_the_stream_and_count_the_holes_as_peer_ids(tmp_path, names, detector):
    model = affine_model(str(tmp_path / "identity.onnx"), size=16)
    ports = [free_ports(), free_ports()]
    apps, viewers = [], []
    try:
        for index, own in enumerate(ports):
            prefix = "{}{}".format(names["prefix"], index)
            config = write_config(str(tmp_path / "config{}.yaml".format(index)), names["detector"], prefix,
                                  engine_path=model, detector={"distributor": {"enabled": True, "group": "g",
                                                                               "updates": 2}})
            apps.append(ApplianceProcess(config, appliance_process_env(own), prefix))
            apps[-1].wait_ready()
            viewers.append(Collector(prefix + ":Phase"))
        image = np.ones((16, 16), np.uint16)
        for unique_id in range(1, 41):
            detector.send(image, unique_id)
        for viewer in viewers:
            viewer.wait_for(20, timeout=20)
        statuses = [app.wait_details(lambda s: s["published"] >= 20) for app in apps]
    finally:
        codes = [app.stop() for app in apps]
    assert codes == [0, 0], [app.output for app in apps]
    seen = [[item.unique_id for item in viewer.items] for viewer in viewers]
    assert sorted(seen[0] + seen[1]) == list(range(1, 41)), seen
    for ids, status in zip(seen, statuses):
        assert len(ids) == 20 and all(b - a in (1, 3) for a, b in zip(ids, ids[1:])), ids  # turns of 2
        assert status["missing_upstream"] == 0
        assert status["peer_ids"] == ids[-1] - ids[0] + 1 - 20
        distributor = status["distributor"]
        assert (distributor["group"], distributor["updates"], distributor["set"]) == ("g", 2, "")
        assert distributor["share"] == pytest.approx(20 / (20 + status["peer_ids"]))
