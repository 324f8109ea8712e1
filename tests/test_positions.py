"""detector.positions: motor units, signs and swapped axes reach the mosaic in metres; points outside show."""
from __future__ import annotations

import time

import numpy as np
import pytest

from appliance import schema
from appliance.config import PositionAttributes, parse_config
from appliance.mosaic import Mosaic, make_window
from appliance.positions import PositionTransform
from appliance.schema import SchemaError
from appliance.sim.detector import DetectorProcess
from appliance.sim.scan import ScanSimulation, SimulationConfig
from appliance.sim.serve import prepare

from harness import ApplianceProcess, Collector, write_config
from onnx_models import conv_model

PIXEL = 10e-9


def latest_with_id(mosaics: Collector, unique_id: int, timeout: float = 10.0):
    """The first P:Mosaic update whose uniqueId (patches stitched) is ``unique_id``: it holds them all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for item in mosaics.items[::-1]:
            if item.unique_id == unique_id:
                return item
        mosaics.wait_for(len(mosaics.items) + 1, timeout=max(0.0, deadline - time.monotonic()))
    raise AssertionError("no P:Mosaic with uniqueId {} in {} s".format(unique_id, timeout))


def test_scale_sign_and_swap_turn_a_reading_into_metres():
    um = PositionTransform(PositionAttributes(scale=1e-6))
    assert um((3.0, -2.0)) == pytest.approx((3e-6, -2e-6))
    turned = PositionTransform(PositionAttributes(scale=1e-3, sign=(-1, 1), swap=True))
    assert turned((3.0, -2.0)) == pytest.approx((2e-3, 3e-3))  # x from the y attribute, flipped
    assert turned(None) is None
    assert PositionTransform(PositionAttributes())((1.5, 2.5)) == (1.5, 2.5)  # metres, as before


@pytest.mark.parametrize("text, message", [
    ("detector: {positions: {scale: 0}}", r"detector.positions.scale: got 0 .*1e-12..1e3 m per motor unit"),
    ("detector: {positions: {sign: [1, 2]}}", r"detector.positions.sign: got \[1, 2\] .*each 1 or -1"),
    ("detector: {positions: {swap: yes please}}", r"detector.positions.swap: got 'yes please'.*true or false"),
])
def test_bad_position_settings_are_refused(text, message):
    with pytest.raises(SchemaError, match=message):
        parse_config(text, "site.yaml")


def test_a_patch_outside_the_mosaic_says_where_and_why():
    mosaic = Mosaic(PIXEL, make_window((8, 8), "flat"), extent_m=(0, 1e-6, 0, 1e-6))
    assert mosaic.add(np.ones((8, 8), np.float32), (5e-7, 5e-7), 1) is None
    problem = mosaic.add(np.ones((8, 8), np.float32), (50.0, 1.0), 2)  # micrometres read as metres
    assert problem == mosaic.last_outside
    assert "uniqueId 2: position (50, 1) m is outside the mosaic: over 2^31 mosaic pixels" in problem
    assert "beyond mosaic.extent_m" in mosaic.add(np.ones((8, 8), np.float32), (2e-6, 0.0), 3)
    assert mosaic.counts["outside"] == 2 and mosaic.counts["stitched"] == 1


def test_micrometre_motors_on_swapped_flipped_axes_stitch_where_the_beam_was(tmp_path, appliance_env):
    """Over PVA: the stage reports y on SampleX and -x on SampleY, in um; the mosaic lands in metres."""
    sim = ScanSimulation(schema.load(SimulationConfig, {"scan": {"points": 30}, "seed": 4}, "test"))
    frames = prepare(sim)
    motor = [(image, (y * 1e6, -x * 1e6)) for image, (x, y) in frames]  # (SampleX, SampleY) in um
    model = conv_model(str(tmp_path / "conv.onnx"))
    config = write_config(str(tmp_path / "config.yaml"), "POS:det", "POS", engine_path=model,
                          detector={"pv": "POS:det", "positions": {"scale": 1e-6, "sign": [-1, 1], "swap": True}},
                          mosaic={"pixel_size_m": PIXEL, "publish_period_s": 0.2})
    detector = DetectorProcess("POS:det")
    app = ApplianceProcess(config, appliance_env, "POS")
    try:
        app.wait_ready()
        phases = Collector("POS:Phase")
        mosaics = Collector("POS:Mosaic", queue_size=10)
        detector.stream(motor, rate_hz=200)
        received = phases.wait_for(len(frames), timeout=20)
        assert app.wait_counts(published=len(frames))["published"] == len(frames)
        final = latest_with_id(mosaics, len(frames))
        expected = Mosaic(PIXEL, make_window(received[0].image.shape, "gaussian", 8.0))
        for item in received:
            expected.add(item.image, frames[item.unique_id - 1][1], item.unique_id)
        picture = expected.snapshot()
        np.testing.assert_allclose(final.image, picture.phase, atol=1e-6)
        assert final.attribute("OriginX") == pytest.approx(picture.origin_m[0])
        assert final.attribute("OriginY") == pytest.approx(picture.origin_m[1])

        # Encoder counts (1e8) read with the um scale: 100 m away, beyond any canvas; P:Status says so.
        detector.stream([(image, (1e8 + y, x)) for image, (x, y) in motor[:5]], rate_hz=200, first_id=1)
        details = app.wait_details(lambda d: d["mosaic"]["outside"] >= 5 and "outside" in d["summary"])
        assert details["mosaic"]["outside"] == 5
        assert "outside the mosaic" in details["mosaic"]["last_outside"]
        assert "5 patches outside the mosaic" in details["summary"]
    finally:
        app.stop()
        detector.close()
