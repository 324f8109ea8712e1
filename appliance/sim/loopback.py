"""PVAccess settings that keep the demo's, the tests' and the benchmarks' traffic on 127.0.0.1.

pvAccess reads them when a process creates its first PVA object, so they go
into the environment before that. Each process gets ports of its own: several
runs on one machine cannot cross-talk. Search uses TCP name servers as well as
UDP, because pvAccess keeps only one UDP port per address in its address list.
"""
from __future__ import annotations

import socket
from typing import Dict

Ports = Dict[str, int]


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports() -> Ports:
    """A TCP (server) and a UDP (search) port that are free now."""
    return {"tcp": _free_port(socket.SOCK_STREAM), "udp": _free_port(socket.SOCK_DGRAM)}


def loopback_env(own: Ports, other: Ports, *more: Ports) -> Dict[str, str]:
    """For a process serving on ``own`` ports that must also find the servers on ``other`` (and ``more``)."""
    return {
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_SERVER_PORT": str(own["tcp"]),
        "EPICS_PVA_BROADCAST_PORT": str(own["udp"]),
        "EPICS_PVA_ADDR_LIST": "127.0.0.1:{}".format(other["udp"]),
        "EPICS_PVA_NAME_SERVERS": " ".join("127.0.0.1:{}".format(p["tcp"]) for p in (own, other) + more),
    }
