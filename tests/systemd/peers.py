"""PVA peers of the appliance inside the test container: a detector stand-in and a collector.

Run by tests/systemd/driver.py as transient units with the installed venv's python:
``peers.py detector PV RATE LAST_ID_FILE`` streams frames until SIGUSR1, then writes
the last uniqueId sent and keeps serving (closing at once could lose that last
frame in flight) until SIGTERM; ``peers.py collect PV OUT_FILE`` appends every uniqueId it
receives, one per line, so the driver can check that none went missing.
"""
from __future__ import annotations

import signal
import sys
import threading

import numpy as np


def _event_on(number: int) -> threading.Event:
    event = threading.Event()
    signal.signal(number, lambda received, frame: event.set())
    return event


def detector(pv: str, rate_hz: float, last_id_file: str) -> None:
    from appliance.sim.detector import DetectorServer

    pause, stop = _event_on(signal.SIGUSR1), _event_on(signal.SIGTERM)
    server = DetectorServer(pv)
    image = np.arange(128 * 128, dtype=np.uint16).reshape(128, 128)
    unique_id = 0
    while not pause.wait(1.0 / rate_hz):
        unique_id += 1
        server.send(image, unique_id, position=(unique_id * 1e-7, 0.0))
    with open(last_id_file, "w") as handle:
        handle.write("{}\n".format(unique_id))
    stop.wait()
    server.close()


def collect(pv: str, out_file: str) -> None:
    """Through the appliance's own FrameSource: it reconnects within an interval of each service restart
    (a bare pvapy monitor waited out pvAccess's search back-off, missing whole stretches of frames)."""
    from appliance.pva import FrameSource

    stop = _event_on(signal.SIGTERM)
    out = open(out_file, "a", buffering=1)
    source = FrameSource(pv, 10000, lambda update: out.write("{}\n".format(update["uniqueId"])))
    source.start()
    stop.wait()
    source.stop()
    out.close()


if __name__ == "__main__":
    if sys.argv[1] == "detector":
        detector(sys.argv[2], float(sys.argv[3]), sys.argv[4])
    else:
        collect(sys.argv[2], sys.argv[3])
