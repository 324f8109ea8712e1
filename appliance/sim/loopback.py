"""PVAccess settings that keep the demo's, the tests' and the benchmarks' traffic on 127.0.0.1.

pvAccess reads them when a process creates its first PVA object, so they go
into the environment before that. A run (one test session, one benchmark, one
demo) is a loopback network of its own: every server of the run has its own
TCP port and all of them share one UDP search port, as servers on one host
share 5076 at a beamline. A search sent to 127.0.0.1 on that port reaches one
of them, and pvAccess hands it on to the others on the host (its local
multicast, 224.0.0.128 on lo): every server answers for its own PVs, and a
search finds a PV on any of them at once. Runs on one machine cannot
cross-talk: each has a search port of its own.

Giving each server its own UDP port instead does not work: pvAccess keeps one
port per address in EPICS_PVA_ADDR_LIST, so a client found only the first
listed server by UDP. TCP name servers (EPICS_PVA_NAME_SERVERS) filled that
gap before and failed at random on two busy cores: pvAccess asks one of them
per search attempt, in turn, and a collector or viewer searching five of them
waited 30-90 s for PVs that were served, or lost a connected one for 27 s.
"""
from __future__ import annotations

import socket
from typing import Dict, List

Ports = Dict[str, int]

_search_port: List[int] = []  # this process's run: chosen once, shared by every server it starts


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_search_port() -> int:
    """A UDP port free now: the search port of a loopback network apart from this run's."""
    return _free_port(socket.SOCK_DGRAM)


def search_port() -> int:
    """This run's UDP search port, shared by all of its servers."""
    if not _search_port:
        _search_port.append(new_search_port())
    return _search_port[0]


def free_ports() -> Ports:
    """A TCP (server) port that is free now, on this run's UDP search port."""
    return {"tcp": _free_port(socket.SOCK_STREAM), "udp": search_port()}


def loopback_env(own: Ports) -> Dict[str, str]:
    """For a process serving on ``own`` ports that finds every server of its network (``own["udp"]``)."""
    return {
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_SERVER_PORT": str(own["tcp"]),
        "EPICS_PVA_BROADCAST_PORT": str(own["udp"]),
        "EPICS_PVA_ADDR_LIST": "127.0.0.1:{}".format(own["udp"]),
    }
