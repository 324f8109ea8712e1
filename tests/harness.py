"""The tests' names for the real PVA peers they use (see appliance.sim).

Every PVA client a test uses runs in a child process (appliance.sim.child_client):
a crash in pvapy's client fails no test run. Servers (detector stand-ins) stay in
the test process.
"""
from __future__ import annotations

import os
from typing import Dict

from appliance.sim.child_client import put_string  # noqa: F401
from appliance.sim.loopback import Ports, loopback_env
from appliance.sim.process import ApplianceProcess, write_config  # noqa: F401
from appliance.sim.viewer import Received  # noqa: F401
from appliance.sim.viewer import Viewer as Collector  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def appliance_process_env(ports: Ports) -> Dict[str, str]:
    """This process's environment for an appliance child serving on ``ports`` (it finds the test's detector)."""
    env = dict(os.environ)
    env.update(loopback_env(ports))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


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
