"""The health figures as NTScalar PVs, read by p4p (an independent PVA implementation) and checked against P:Status."""
from __future__ import annotations

import math
import os
import threading

import pytest
from test_stream import frames, serve

from appliance.scalars import MAJOR, MINOR, NO_ALARM, figures

from onnx_models import affine_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INVALID = 3
RING = 64


def p4p_context(appliance_ports):
    p4p_client = pytest.importorskip("p4p.client.thread", reason="p4p is the independent PVA implementation")
    return p4p_client.Context("pva", useenv=False, nt=False, conf={
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_ADDR_LIST": "127.0.0.1:{}".format(appliance_ports["udp"]),
    })


def p4p_remote_error():
    from p4p.client.thread import RemoteError

    return RemoteError


def figure(suffix):
    return next(f for f in figures(RING) if f.suffix == suffix)


class AlarmWatch:
    """The alarm severities a p4p monitor saw on one PV, in order."""

    def __init__(self, context, pv_name):
        self.severities = []
        self._changed = threading.Condition()
        self._subscription = context.monitor(pv_name, self._update)

    def _update(self, value):
        if isinstance(value, Exception):
            return
        with self._changed:
            self.severities.append(value["alarm.severity"])
            self._changed.notify_all()

    def wait_for(self, sequence, timeout):
        """Whether ``sequence`` appeared, in order (not necessarily adjacent), within ``timeout``."""
        def seen():
            remaining = iter(self.severities)
            return all(any(s == wanted for s in remaining) for wanted in sequence)

        with self._changed:
            return self._changed.wait_for(seen, timeout)

    def close(self):
        self._subscription.close()


def test_scalar_pvs_carry_the_status_values_with_units_and_alarms(tmp_path, names, detector, launch, appliance_ports):
    model = affine_model(str(tmp_path / "identity.onnx"), size=32)
    app, collector = serve(tmp_path, names, launch, model, pipeline={"ring_capacity": RING, "max_wait_ms": 1})
    prefix = names["prefix"]
    context = p4p_context(appliance_ports)
    dropped_alarms = AlarmWatch(context, prefix + ":Dropped:shape")
    try:
        assert dropped_alarms.wait_for([NO_ALARM], timeout=20), "no monitor update from the scalar PV"
        good = frames(10, size=32)
        for unique_id in (1, 2, 3, 4, 5, 8, 9):  # 6 and 7 lost upstream
            detector.send(good[unique_id], unique_id)
        detector.send(frames(1, size=16)[0], 10)  # a shape the engine cannot take
        collector.wait_for(7, timeout=20)
        counted = app.wait_details(lambda s: s["received"] == 8, timeout=20)
        assert counted["received"] == 8, counted
        # Steady: rates are sampled over at least 0.2 s, so a status can repeat the previous sample's rate;
        # a second after the last frame was counted, every sample covers a time without frames.
        status = app.wait_details(lambda s: s["uptime_s"] > counted["uptime_s"] + 1.0 and s["rate_in_hz"] == 0
                                  and s["rate_out_hz"] == 0, timeout=20)
        assert status["rate_in_hz"] == 0 and status["uptime_s"] > counted["uptime_s"] + 1.0, status
        assert dropped_alarms.wait_for([NO_ALARM, MINOR, NO_ALARM], timeout=20), dropped_alarms.severities

        suffixes = [f.suffix for f in figures(RING)]
        # The scalars go out before P:Status: these are from the snapshot above or a later one.
        values = dict(zip(suffixes, context.get([prefix + ":" + s for s in suffixes], timeout=10.0)))
        with pytest.raises(p4p_remote_error()):  # read-only, like every output record
            context.put(prefix + ":RateIn", 123.0, timeout=5.0)
        unchanged = context.get(prefix + ":RateIn", timeout=5.0)
    finally:
        dropped_alarms.close()
        context.close()
    assert app.stop() == 0, app.output

    expected = {
        "Received": 8, "Published": 7, "DroppedTotal": 1, "Dropped:shape": 1, "Dropped:ring_full": 0,
        "MissingUpstream": 2, "Acquisitions": status["acquisitions"], "Overruns": status["upstream_overruns"],
        "RateIn": 0.0, "RateOut": 0.0, "QueueDepth": 0, "RingFill": 0.0,
        "LatencyP50": status["latency"]["p50_ms"], "LatencyP99": status["latency"]["p99_ms"],
        "State": "serving", "DetectorConnected": True,
        "EngineName": "identity.onnx", "EngineSha256": status["engine_sha256"], "EngineBackend": "onnxruntime",
        "EngineSwaps": 0, "EngineRejections": 0, "BuildState": "off",
    }
    for suffix, value in expected.items():
        assert values[suffix]["value"] == pytest.approx(value), suffix
        assert values[suffix]["alarm.severity"] == NO_ALARM, (suffix, values[suffix]["alarm.message"])
    assert len(status["engine_sha256"]) == 64
    assert values["Uptime"]["value"] >= status["uptime_s"] > 0
    assert values["Published"]["timeStamp.secondsPastEpoch"] > 0

    assert values["RateIn"]["display.units"] == "Hz" and values["LatencyP99"]["display.units"] == "ms"
    assert (values["RingFill"]["display.limitLow"], values["RingFill"]["display.limitHigh"]) == (0.0, 100.0)
    assert values["QueueDepth"]["display.limitHigh"] == RING
    # Not a Jetson: its sensors are not known, which EPICS says with INVALID.
    assert math.isnan(values["GpuTemp"]["value"]) and values["GpuTemp"]["alarm.severity"] == INVALID
    assert "no Jetson telemetry" in values["GpuTemp"]["alarm.message"]
    assert unchanged["value"] == 0.0


def test_loss_counters_are_minor_while_they_rise_and_clear_when_they_stop():
    dropped = figure("DroppedTotal")
    assert dropped.reading({"dropped_total": 3}, None).severity == NO_ALARM
    rising = dropped.reading({"dropped_total": 5}, 3)
    assert rising.severity == MINOR and "rose by 2" in rising.message
    assert dropped.reading({"dropped_total": 5}, 5).severity == NO_ALARM
    assert figure("Dropped:ring_full").reading({"dropped": {"ring_full": 2}}, 1).severity == MINOR


def test_ring_fill_is_minor_from_half_full_and_major_from_ninety_percent():
    fill = figure("RingFill")
    assert fill.reading({"queue_depth": 31}, None).severity == NO_ALARM
    assert fill.reading({"queue_depth": 32}, None).severity == MINOR
    major = fill.reading({"queue_depth": 58}, None)
    assert major.severity == MAJOR and major.value == pytest.approx(100.0 * 58 / RING)


def test_state_is_major_on_a_pipeline_failure_and_minor_while_not_serving():
    state = figure("State")
    failed = state.reading({"state": "serving", "pipeline_failure": "CUDA error 700\ntraceback"}, None)
    assert failed.severity == MAJOR and failed.message == "pipeline failed: CUDA error 700"
    assert state.reading({"state": "serving", "engine_manager": "died: OSError: gone"}, None).severity == MAJOR
    waiting = state.reading({"state": "waiting for DET:Image"}, None)
    assert waiting.severity == MINOR and waiting.message == "waiting for DET:Image"
    assert state.reading({"state": "serving", "engine_manager": "running"}, None).severity == NO_ALARM


def test_unknown_numbers_are_invalid_with_the_reason():
    latency = figure("LatencyP99").reading({"latency": {"p99_ms": None}}, None)
    assert latency.severity == INVALID and latency.message == "no frame published yet"
    gpu = figure("GpuLoad").reading({"gpu_load_pct": float("nan"), "jetson_detail": "jetson-stats not installed"}, None)
    assert gpu.severity == INVALID and gpu.message.endswith("jetson-stats not installed")


def test_every_scalar_pv_is_documented():
    with open(os.path.join(ROOT, "docs", "configuration.md")) as handle:
        text = handle.read()
    missing = [f.suffix for f in figures(RING) if "`P:{}`".format(f.suffix) not in text]
    assert not missing
