"""A short simulated scan over PVA: the live mosaic equals the offline stitching of the published phases."""
from __future__ import annotations

import numpy as np

from appliance import schema
from appliance.demo import offline_mosaic
from appliance.sim.detector import DetectorProcess
from appliance.sim.scan import ScanSimulation, SimulationConfig
from appliance.sim.serve import computed_ahead, prepare

from harness import ApplianceProcess, Collector, put_string, write_config
from onnx_models import conv_model

PIXEL = 10e-9


def test_live_mosaic_matches_offline_stitching_and_resets_on_a_new_scan(tmp_path, appliance_env):
    sim = ScanSimulation(schema.load(SimulationConfig, {"scan": {"points": 60}, "seed": 3}, "test"))
    frames = prepare(sim)
    model = conv_model(str(tmp_path / "conv.onnx"))
    config = write_config(str(tmp_path / "config.yaml"), "SCAN:det", "SCAN", engine_path=model,
                          mosaic={"pixel_size_m": PIXEL, "publish_period_s": 0.2})
    detector = DetectorProcess("SCAN:det")
    app = ApplianceProcess(config, appliance_env, "SCAN")
    try:
        app.wait_ready()
        phases = Collector("SCAN:Phase")
        mosaics = Collector("SCAN:Mosaic", queue_size=10)
        detector.stream(frames, rate_hz=200)
        received = phases.wait_for(len(frames), timeout=20)
        mosaic_count = len(mosaics.items)
        assert app.wait_counts(published=len(frames))["published"] == len(frames)
        # The mosaic is published periodically; wait for one that holds every frame (uniqueId = stitched count).
        final = None
        for item in mosaics.wait_for(mosaic_count + 2, timeout=5)[::-1]:
            if item.unique_id == len(frames):
                final = item
                break
        assert final is not None
        expected = offline_mosaic(received, PIXEL)
        np.testing.assert_allclose(final.image, expected.phase, atol=1e-6)
        assert final.attribute("OriginX") == expected.origin_m[0]
        assert final.attribute("PixelSize") == PIXEL

        detector.stream(frames[:5], rate_hz=200, first_id=1)  # ids restart: a new acquisition
        phases.wait_for(len(frames) + 5, timeout=10)
        status = app.wait_counts(published=len(frames) + 5)
        assert app.details()["mosaic"]["resets"] == 1 and status["acquisitions"] == 2
        put_string("SCAN:Control", "reset")  # an operator starts a new mosaic
        assert app.wait_details(lambda details: details["mosaic"]["resets"] >= 2)["mosaic"]["resets"] == 2
    finally:
        app.stop()
        detector.close()


def test_simulate_saves_a_scan_with_its_ground_truth(tmp_path):
    import subprocess
    import sys

    from appliance.sim.scan import load_scan

    out = tmp_path / "scan"
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "simulate", "--points", "12", "--frame-size", "128",
                             "--sample", "etched", "--save", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    scan = load_scan(str(out))
    assert scan.frames.shape == (12, 128, 128) and scan.frames.dtype == np.uint16
    assert scan.positions_m.shape == (12, 2) and scan.object_phase.ndim == 2
    bad = subprocess.run([sys.executable, "-m", "appliance.cli", "simulate", "--points", "0", "--save", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "scan.points: got 0 (int); expected 1..10000000" in bad.stderr


class CountingSimulation(ScanSimulation):
    """Counts the frames the physics has computed, to see how far ahead of the stream it runs."""

    computed = 0

    def frame_batch(self, indices):
        frames = super().frame_batch(indices)
        self.computed += len(indices)
        return frames


def test_simulate_streams_frames_computed_a_bounded_lead_ahead():
    config = schema.load(SimulationConfig, {"scan": {"points": 400}, "seed": 3}, "test")
    ahead = CountingSimulation(config)
    stream = computed_ahead(ahead, rate_hz=20.0, lead_s=1.0)  # a lead of 20 frames
    first = next(stream)
    assert ahead.computed <= 20 + 64  # the first frame goes out long before the scan is computed (one chunk more)
    received = [first] + list(stream)
    expected = prepare(ScanSimulation(config))
    assert len(received) == len(expected) == 400
    for (image, position), (want, want_position) in zip(received, expected):
        np.testing.assert_array_equal(image, want)
        assert position == want_position
