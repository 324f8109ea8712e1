"""Shared fixtures: loopback-only PVA with ports of this run's own, and model files.

pvAccess reads its address settings when a process first creates a PVA object,
so they are set here, at import, before any test touches pvapy. Each test run
picks free ports: runs in parallel (or a stale server) cannot cross-talk.
"""
from __future__ import annotations

import itertools
import os
import sys
from typing import Any, Dict, Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


from appliance.sim.loopback import free_ports, loopback_env  # noqa: E402

TEST_PORTS = free_ports()  # this pytest process's own server (detector stand-ins)
APPLIANCE_PORTS = free_ports()  # appliance processes started by tests
os.environ.update(loopback_env(TEST_PORTS))
# A child that crashes in native code (pvapy) prints its Python threads' stacks: the test's output says where.
os.environ["PYTHONFAULTHANDLER"] = "1"


@pytest.fixture(autouse=True)
def close_client_children() -> Iterator[None]:
    """Each test's PVA client children end with it, whether or not the test closed its viewers."""
    from appliance.sim.child_client import close_all

    yield
    close_all()


@pytest.fixture
def appliance_env() -> Dict[str, str]:
    """Environment for an appliance subprocess that must find this process's detector stand-in."""
    from harness import appliance_process_env

    return appliance_process_env(APPLIANCE_PORTS)


@pytest.fixture
def launch(appliance_env):
    """Start ``ptychonn-edge run`` processes that are stopped at teardown, whatever the test did."""
    from appliance.sim.process import ApplianceProcess

    started = []

    def start(config_path: str, prefix: str) -> ApplianceProcess:
        app = ApplianceProcess(config_path, appliance_env, prefix)
        started.append(app)
        app.wait_ready()
        return app

    yield start
    for app in started:
        app.stop()


@pytest.fixture
def appliance_ports() -> Dict[str, int]:
    return dict(APPLIANCE_PORTS)


@pytest.fixture
def detector_ports() -> Dict[str, int]:
    """The ports of this process's server (the detector stand-ins), for processes that must find it."""
    return dict(TEST_PORTS)


_names = itertools.count()


@pytest.fixture
def names() -> Dict[str, str]:
    """PV names of this test's own: a detector PV and an appliance prefix."""
    n = next(_names)
    return {"detector": "TEST{}:det:Image".format(n), "prefix": "TEST{}:pn".format(n)}


@pytest.fixture
def detector(names: Dict[str, str]) -> Iterator[Any]:
    """A detector stand-in serving this test's detector PV, from a child process as an IOC would."""
    from appliance.sim.detector import DetectorProcess

    server = DetectorProcess(names["detector"])
    yield server
    server.close()
