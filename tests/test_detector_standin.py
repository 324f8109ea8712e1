"""The detector stand-in the tests send from serves in a child process: its crash is one test's error, not the run's."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from appliance.sim.detector import DetectorProcess, DetectorProcessDied

from harness import Collector


def test_frames_sent_from_the_child_arrive_with_their_ids_and_positions(names):
    detector = DetectorProcess(names["detector"])
    viewer = Collector(names["detector"])  # returns once connected: it has the record's first value
    try:
        image = np.arange(64, dtype=np.uint16).reshape(8, 8)
        next_id = detector.stream([(image, (1e-6, 2e-6)), (image + 1, (3e-6, 4e-6))], rate_hz=100.0, first_id=5)
        received = viewer.wait_for(2, timeout=30)
    finally:
        viewer.close()
        detector.close()
    assert next_id == 7 and detector.sent == 2
    assert [item.unique_id for item in received] == [5, 6]
    np.testing.assert_array_equal(received[-1].image, image + 1)
    assert (received[-1].attribute("SampleX"), received[-1].attribute("SampleY")) == (3e-6, 4e-6)


def test_a_crashed_child_fails_the_send_with_its_exit_status_and_the_caller_goes_on(names):
    detector = DetectorProcess(names["detector"])
    os.kill(detector.pid, signal.SIGSEGV)
    with pytest.raises(DetectorProcessDied) as died:
        detector.send(np.zeros((8, 8), np.uint16), 1)
    detector.close()
    assert str(died.value) == "the detector stand-in serving {} died (exit code -11) during send".format(
        names["detector"])
