"""Shared fixtures: loopback-only PVA with ports of this run's own, and model files.

pvAccess reads its address settings when a process first creates a PVA object,
so they are set here, at import, before any test touches pvapy. Each test run
picks free ports: runs in parallel (or a stale server) cannot cross-talk.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Dict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_pair() -> Dict[str, int]:
    return {"tcp": _free_port(socket.SOCK_STREAM), "udp": _free_port(socket.SOCK_DGRAM)}


TEST_PORTS = _port_pair()  # this pytest process's own server (detector stand-ins)
APPLIANCE_PORTS = _port_pair()  # appliance processes started by tests


def pva_env(own: Dict[str, int], reach: Dict[str, int]) -> Dict[str, str]:
    """Environment for a process serving on ``own`` and searching its own and ``reach``'s servers."""
    return {
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_SERVER_PORT": str(own["tcp"]),
        "EPICS_PVA_BROADCAST_PORT": str(own["udp"]),
        # One UDP search address per host only (pvAccess keeps the first port listed for an IP),
        # so servers are also found by TCP name-server search, which takes several ports.
        "EPICS_PVA_ADDR_LIST": "127.0.0.1:{}".format(reach["udp"]),
        "EPICS_PVA_NAME_SERVERS": "127.0.0.1:{} 127.0.0.1:{}".format(own["tcp"], reach["tcp"]),
    }


os.environ.update(pva_env(TEST_PORTS, APPLIANCE_PORTS))


@pytest.fixture
def appliance_env() -> Dict[str, str]:
    """Environment for an appliance subprocess that must find this process's detector stand-in."""
    env = dict(os.environ)
    env.update(pva_env(APPLIANCE_PORTS, TEST_PORTS))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def appliance_ports() -> Dict[str, int]:
    return dict(APPLIANCE_PORTS)
