"""``ptychonn-edge watch``: the live page, drawn from P:Status, in a real terminal (tmux) and as lines."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from appliance.sim.loopback import free_ports, loopback_env
from appliance.status_view import STALE_AFTER_S, watch_page

from harness import write_config
from onnx_models import affine_model

FRAMES = 30


def _status(**changes):
    status = {
        "state": "serving", "engine_name": "m.onnx", "engine_backend": "onnxruntime", "engine_sha256": "ab" * 32,
        "received": 12, "published": 10, "dropped_total": 2, "dropped": {"ring_full": 2, "decode": 0},
        "missing_upstream": 0, "upstream_overruns": 0, "rate_in_hz": 50.0, "rate_out_hz": 49.0,
        "latency": {"p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 3.0}, "queue_depth": 1024, "ring_capacity": 4096,
        "uptime_s": 60.0, "detector_pv": "DET:Image", "detector_connected": True, "engine_swaps": 1,
        "engine_rejections": 1, "engine_build": "idle", "last_rejection": "bad.onnx: truncated",
        "engine_verdicts": [{"file": "m.onnx", "accepted": True, "reason": ""},
                            {"file": "bad.onnx", "accepted": False, "reason": "truncated"}],
    }
    status.update(changes)
    return status


def test_the_page_shows_drops_by_reason_ring_fill_and_the_engine_history():
    page = "\n".join(watch_page("P:Status", _status(), 0.4))
    assert "drops:      ring_full 2\n" in page  # reasons with no drops are left out
    assert "queue:      1024 of 4096 frames (25 % of the ring)" in page
    assert "  accepted m.onnx\n  REJECTED bad.onnx: truncated" in page
    assert "detector:   DET:Image connected" in page
    assert "engines:    1 swaps, 1 rejected, last: bad.onnx: truncated; build idle" in page
    assert "updated 0 s ago" in page and "jetson" not in page


def test_the_page_says_what_is_wrong_before_any_figure():
    assert "waiting for the first update" in watch_page("P:Status", None, 0.0)[0]
    stale = watch_page("P:Status", _status(), STALE_AFTER_S + 2)[0]
    assert "STALE: no update for 5 s" in stale
    waiting = "\n".join(watch_page("P:Status", _status(detector_connected=False, detector_waiting_s=12.0), 0.0))
    assert "detector:   DET:Image NOT CONNECTED for 12 s" in waiting


def test_on_a_jetson_the_page_has_its_load_and_temperatures():
    jetson = _status(jetson_available=True, gpu_load_pct=37.0, temp_gpu_c=41.5, temp_cpu_c=float("nan"),
                     power_total_w=12.25)
    page = watch_page("P:Status", jetson, 0.0)
    assert "jetson:     GPU 37 %, GPU temp 42 C, power 12.2 W" in page  # a NaN figure is left out


class Tmux:
    """A tmux server of this test's own (its own socket), one window of a fixed size."""

    def __init__(self, command: str, env) -> None:
        self.socket = "ptychonn-watch-" + uuid.uuid4().hex[:8]
        exports = []
        for name, value in env.items():
            if name.startswith("EPICS_") or name == "PYTHONPATH":
                exports += ["-e", "{}={}".format(name, value)]
        self.tmux("new-session", "-d", "-s", "w", "-x", "120", "-y", "40", *exports, command)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "w")

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """The screen once it shows ``text`` (tmux has no event for a redraw: its pane is polled)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if text in screen:
                return screen
            assert time.monotonic() < deadline, "no {!r} on the screen:\n{}".format(text, screen)
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def tmux_installed() -> None:
    """tmux is the terminal here; PTYCHONN_REQUIRE_TMUX=1 (CI) makes its absence a failure."""
    if shutil.which("tmux") is None:
        if os.environ.get("PTYCHONN_REQUIRE_TMUX") == "1":
            pytest.fail("PTYCHONN_REQUIRE_TMUX=1 but tmux is not installed")
        pytest.skip("needs tmux (apt install tmux)")


def test_watch_follows_a_running_appliance_in_a_terminal_and_quits_on_q(tmux_installed, tmp_path, names, detector,
                                                                          launch, appliance_ports):
    model = affine_model(str(tmp_path / "identity.onnx"), size=16)
    app = launch(write_config(str(tmp_path / "config.yaml"), names["detector"], names["prefix"], engine_path=model),
                 names["prefix"])
    env = dict(os.environ)
    env.update(loopback_env(free_ports()))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root
    command = "{} -m appliance.cli watch --prefix {} --refresh 0.2; echo watch exited $?; sleep 600".format(
        sys.executable, names["prefix"])
    terminal = Tmux(command, env)
    try:
        terminal.wait_for("state:      serving")
        frames = np.random.default_rng(0).integers(0, 100, (FRAMES, 16, 16)).astype(np.uint16)
        detector.stream(((image, None) for image in frames), rate_hz=100.0)
        published = app.wait_counts(published=FRAMES)["published"]
        screen = terminal.wait_for("published {},".format(published))
        assert "engine:     identity.onnx [onnxruntime]" in screen
        assert "received {}, published {}, dropped 0".format(FRAMES, FRAMES) in screen
        assert "detector:   {} connected".format(names["detector"]) in screen
        terminal.tmux("send-keys", "-t", "w", "q")
        terminal.wait_for("watch exited 0")
    finally:
        terminal.close()
