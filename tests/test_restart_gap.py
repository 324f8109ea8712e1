"""A crashed appliance says after its restart exactly which frames it lost; a stopped one says it stopped."""
from __future__ import annotations

import json
import os
import signal
from typing import Dict, List

import numpy as np

from appliance.sim.detector import DetectorProcess
from appliance.sim.process import StatusWatch
from appliance.status_view import format_status

from harness import Collector, write_config
from onnx_models import affine_model

IMAGE = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)


def _config(tmp_path, names: Dict[str, str]) -> str:
    model = affine_model(str(tmp_path / "identity.onnx"), size=16)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    return write_config(str(tmp_path / "config.yaml"), names["detector"], names["prefix"], engine_path=model,
                        publish={"state_directory": str(state)})


def _send(detector: DetectorProcess, ids: List[int]) -> None:
    for unique_id in ids:
        detector.send(IMAGE, unique_id)


def test_after_a_segfault_the_restart_reports_exactly_the_frames_never_published(tmp_path, names, detector, launch):
    config = _config(tmp_path, names)
    first = launch(config, names["prefix"])
    collector = Collector(names["prefix"] + ":Phase")  # it reconnects to the restarted appliance by itself
    _send(detector, list(range(1, 21)))
    first.wait_counts(published=20)
    collector.wait_for(20, timeout=10)
    os.kill(first.process.pid, signal.SIGSEGV)  # what a pvapy crash does
    assert first.finish() and first.process.returncode == -signal.SIGSEGV
    _send(detector, list(range(21, 31)))  # sent while nobody is there: lost

    second = launch(config, names["prefix"])
    _send(detector, list(range(31, 41)))
    status = second.wait_counts(published=1)
    seen = [item.unique_id for item in collector.wait_for(20 + status["published"], timeout=10)]
    assert second.stop() == 0, second.output
    collector.close()

    # The viewer saw every frame up to the crash, then a gap, then the restarted appliance's frames.
    # The restart's first frame is whichever the detector's record held or sent once the new monitor
    # was up (30 at the earliest); the viewer, reconnecting meanwhile, may see it or a later one.
    assert seen[:20] == list(range(1, 21))
    gap = json.loads(status["json"])["restart_gap"]
    first_id = gap["first_id"]
    assert first_id >= 30  # 21..29 were sent while no appliance ran
    assert gap == {"previous_last_id": 20, "first_id": first_id, "frames_lost": first_id - 21}
    assert all(unique_id >= first_id for unique_id in seen[20:])
    # Said where operators look, not only in --json: systemctl status's line and `ptychonn-edge status`.
    snapshot = json.loads(status["json"])
    assert ", lost at restart {},".format(first_id - 21) in snapshot["summary"], snapshot["summary"]
    assert "restart:    {} frames lost (the previous run last published uniqueId 20, this one first {})".format(
        first_id - 21, first_id) in format_status(snapshot)


def test_a_first_start_reports_no_gap(tmp_path, names, detector, launch):
    app = launch(_config(tmp_path, names), names["prefix"])
    _send(detector, [1, 2, 3])
    status = app.wait_counts(published=3)
    assert app.stop() == 0, app.output
    assert json.loads(status["json"])["restart_gap"] is None
    assert "lost at restart" not in json.loads(status["json"])["summary"]


def test_a_monitor_sees_the_final_status_after_sigterm(tmp_path, names, detector, launch):
    app = launch(_config(tmp_path, names), names["prefix"])
    watch = StatusWatch(names["prefix"] + ":Status")
    try:
        _send(detector, list(range(1, 51)))
        app.wait_counts(published=50)
        # The watch's own client must be connected and current before the stop: a monitor that
        # connects after the server has closed sees nothing, which is not what this test is about.
        assert watch.wait_for(lambda s: s["published"] == 50, timeout=60) is not None
        assert app.stop() == 0, app.output
        final = watch.wait_for(lambda s: s["state"] != "serving" and s["state"] != "stopping", timeout=30)
    finally:
        watch.close()
    assert final is not None and final["state"] == "stopped"
    assert final["published"] == 50
