"""ptychonn-edge record: a live scan over PVA into HDF5, every uniqueId once, beside a serving appliance."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import List

import numpy as np
import pytest

from appliance.sim.detector import DetectorProcess

from harness import ApplianceProcess, write_config
from onnx_models import conv_model

h5py = pytest.importorskip("h5py", reason="record writes HDF5 (extra 'record')")


class RecordProcess:
    """``ptychonn-edge record`` in a child process (its own pvAccess client), its output collected."""

    def __init__(self, env, *args: str) -> None:
        self.lines: List[str] = []
        self._connected = threading.Event()
        self.process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "record", *args], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if line.startswith("connected to"):
                self._connected.set()

    def wait_connected(self, timeout: float = 30.0) -> None:
        assert self._connected.wait(timeout), "record never connected: {}".format(self.lines)

    def finish(self, timeout: float = 30.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code


def frames(count: int, first_id: int = 1):
    rng = np.random.default_rng(first_id)
    return [(rng.integers(0, 60000, (64, 64), dtype=np.uint16), (i * 1.5, -i * 0.5)) for i in range(count)]


def test_a_live_scan_is_recorded_every_id_once_while_the_appliance_serves(tmp_path, appliance_env):
    sent = frames(200)
    model = conv_model(str(tmp_path / "conv.onnx"), size=64)
    detector = DetectorProcess("REC:det")
    config = write_config(str(tmp_path / "config.yaml"), "REC:det", "REC", engine_path=model)
    app = ApplianceProcess(config, appliance_env, "REC")
    try:
        app.wait_ready()
        out = tmp_path / "scan.h5"
        record = RecordProcess(appliance_env, str(out), "--pv", "REC:det", "--idle-s", "1.5")
        record.wait_connected()
        detector.stream(sent, rate_hz=500)
        detector.send(sent[199][0], 200)  # sent again, as a reconnect re-sends: written once
        detector.send(sent[0][0], 1)  # ids going back: a new scan, which ends this file
        assert record.finish() == 0, record.lines
        with h5py.File(out, "r") as handle:
            ids = handle["unique_id"][()]
            np.testing.assert_array_equal(ids, np.arange(1, 201))
            np.testing.assert_array_equal(handle["frames"][()], np.stack([image for image, _ in sent]))
            np.testing.assert_allclose(handle["positions_m"][()], np.array([p for _, p in sent]))
            assert handle.attrs["stop_reason"] == "a new acquisition began (uniqueId 1 after 200)"
            assert handle["timestamp"][0] > 1.5e9
        assert "recorded 200 frames" in record.lines[-1] and "0 missing upstream" in record.lines[-1]
        assert "1 repeated skipped" in record.lines[-1]
        assert app.wait_counts(published=200)["published"] >= 200  # the appliance served the scan meanwhile
    finally:
        app.stop()
        detector.close()


def test_recording_stops_at_the_frame_bound_and_says_so(tmp_path, appliance_env):
    detector = DetectorProcess("REC2:det")
    try:
        out = tmp_path / "bounded.h5"
        record = RecordProcess(appliance_env, str(out), "--pv", "REC2:det", "--max-frames", "50",
                               "--config", write_config(str(tmp_path / "c.yaml"), "REC2:det", "REC2",
                                                        detector={"pv": "REC2:det", "positions": {"scale": 1e-6}}))
        record.wait_connected()
        detector.stream(frames(120), rate_hz=500)
        assert record.finish() == 0, record.lines
        with h5py.File(out, "r") as handle:
            np.testing.assert_array_equal(handle["unique_id"][()], np.arange(1, 51))
            np.testing.assert_allclose(handle["positions_m"][()][3], (4.5e-6, -1.5e-6))  # um motors, in metres
            assert handle.attrs["stop_reason"] == "--max-frames 50 reached"
        assert record.lines[-1].endswith("stopped: --max-frames 50 reached")
    finally:
        detector.close()


def test_an_earlier_scans_last_frame_does_not_start_the_idle_clock(tmp_path, appliance_env):
    detector = DetectorProcess("REC3:det")
    try:
        detector.stream(frames(5), rate_hz=500)  # an earlier scan: its last frame stays the PV's value
        out = tmp_path / "next.h5"
        record = RecordProcess(appliance_env, str(out), "--pv", "REC3:det", "--idle-s", "0.5")
        record.wait_connected()
        time.sleep(1.5)  # the next scan starts later than --idle-s: the case under test, not a wait for an event
        assert record.process.poll() is None, "record ended before the scan: {}".format(record.lines)
        detector.stream(frames(30), rate_hz=500)
        assert record.finish() == 0, record.lines
        with h5py.File(out, "r") as handle:
            np.testing.assert_array_equal(handle["unique_id"][()], np.arange(1, 31))
            assert handle.attrs["stop_reason"] == "no frame for --idle-s 0.5 s (the scan ended)"
    finally:
        detector.close()


def test_bad_bounds_are_refused_before_anything_connects(tmp_path, appliance_env):
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "record", str(tmp_path / "x.h5"), "--max-frames", "0"],
                            env=appliance_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--max-frames must be at least 1" in result.stderr
