"""The tests' names for the real PVA peers they use (see appliance.sim).

Every PVA client a test uses runs in a child process (appliance.sim.child_client):
a crash in pvapy's client fails no test run. Servers (detector stand-ins) stay in
the test process.
"""
from __future__ import annotations

from appliance.sim.child_client import put_string  # noqa: F401
from appliance.sim.process import ApplianceProcess, write_config  # noqa: F401
from appliance.sim.viewer import Received, Viewer as Collector  # noqa: F401


def fill(ring, count: int, seed: int = 0, high: float = 1000.0):
    """Commit ``count`` random frames to ``ring`` as ingest would; returns them."""
    import time

    import numpy as np

    from appliance.ntndarray import FrameMeta

    data = np.random.default_rng(seed).uniform(0, high, (count,) + ring.frame_shape).astype(ring.dtype)
    for index, image in enumerate(data):
        slot = ring.reserve()
        assert slot is not None
        ring.frames[slot] = image
        ring.commit(FrameMeta(index, (0, 0, 0), (0, 0, 0), (), None), time.monotonic())
    return data
