"""The appliance started long before the detector IOC (a flash-and-forget box) gets a scan's first frame.

pvAccess backs its search for a missing PV off to one search every ~29 s; the
appliance replaces a channel that has not connected within its life
(detector.search_interval_s, plus a turn through the name servers where there
are several), so whatever the wait, its search state is that of a channel at
most one life old. Waiting long enough for the unfixed back-off
to miss a whole short scan (about 10 s here) therefore shows what waiting 60 s
would: the state repeats every life, which the channel count checks.
"""
from __future__ import annotations

import itertools
import json
import time
from typing import Any, Dict

import numpy as np

from appliance.pva import channel_life_s, name_server_count
from appliance.sim.detector import DetectorProcess
from appliance.sim.process import ApplianceProcess, StatusWatch

from harness import write_config
from onnx_models import affine_model

_names = itertools.count()
# Long enough for pvAccess's own back-off to be at 7.2 s between searches (the
# unfixed appliance then found the detector seconds after this scan ended).
WAITED_S = 10.0
SEARCH_INTERVAL_S = 0.5
SCAN_FRAMES = 13
SCAN_RATE_HZ = 10.0
SCAN_STARTS_AFTER_S = 1.0  # the scenario under test, not a synchronisation


def _details(status: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(status["json"] or "{}")  # the record holds no snapshot before its first update


def _waited(status: Dict[str, Any]) -> bool:
    return (_details(status).get("detector_waiting_s") or 0.0) >= WAITED_S


def _scan_is_received_whole(app: ApplianceProcess, detector: DetectorProcess, first_id: int) -> None:
    """The scenario: a short scan starts 1 s after the detector PV appears; every frame must arrive."""
    before = app.status()
    time.sleep(SCAN_STARTS_AFTER_S)
    image = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
    detector.stream([(image, None)] * SCAN_FRAMES, SCAN_RATE_HZ, first_id=first_id)
    expected = before["published"] + SCAN_FRAMES
    status = app.wait_counts(published=expected, timeout=30.0)
    assert status["published"] == expected and status["received"] == before["received"] + SCAN_FRAMES, status
    assert status["state"] == "serving" and status["detector_connected"]


def _wait_long_for_the_detector(watch: StatusWatch, app: ApplianceProcess, pv: str, life_s: float) -> None:
    waiting = watch.wait_for(_waited, timeout=60.0)
    assert waiting is not None, app.finish()
    assert waiting["state"] == "waiting for " + pv and not waiting["detector_connected"]
    assert "waiting for " + pv in waiting["summary"]  # what systemd's STATUS= shows
    details = _details(waiting)
    # A fresh search state at least every life, and no faster than that.
    assert 3 <= details["detector_channels_created"] <= details["detector_waiting_s"] / life_s + 2


def _start(tmp_path, appliance_env):
    n = next(_names)
    pv, prefix = "CONN{}:det:Image".format(n), "CONN{}:pn".format(n)
    model = affine_model(str(tmp_path / "identity.onnx"), size=16)
    config = write_config(str(tmp_path / "config.yaml"), pv, prefix, engine_path=model,
                          detector={"search_interval_s": SEARCH_INTERVAL_S})
    life_s = channel_life_s(SEARCH_INTERVAL_S, name_server_count(appliance_env))
    return pv, ApplianceProcess(config, appliance_env, prefix), StatusWatch(prefix + ":Status"), life_s


def test_a_detector_appearing_long_after_the_appliance_gets_every_frame_of_a_scan_1_s_later(tmp_path, appliance_env):
    pv, app, watch, life_s = _start(tmp_path, appliance_env)
    detector = None
    try:
        _wait_long_for_the_detector(watch, app, pv, life_s)
        detector = DetectorProcess(pv)
        _scan_is_received_whole(app, detector, first_id=1)
        assert app.stop() == 0, app.output
    finally:
        watch.close()
        app.stop()
        if detector is not None:
            detector.close()


def test_after_a_long_detector_ioc_restart_the_next_scan_arrives_whole(tmp_path, appliance_env):
    pv, app, watch, life_s = _start(tmp_path, appliance_env)
    detector = DetectorProcess(pv)
    try:
        app.wait_ready()
        _scan_is_received_whole(app, detector, first_id=1)
        detector.close()
        _wait_long_for_the_detector(watch, app, pv, life_s)
        detector = DetectorProcess(pv)
        _scan_is_received_whole(app, detector, first_id=1)
        assert app.stop() == 0, app.output
    finally:
        watch.close()
        app.stop()
        detector.close()
