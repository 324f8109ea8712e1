"""A client that searches several TCP name servers finds a PV on any of them, served after it started.

pvAccess asks one name server per search attempt, in turn, the attempts
backing off; a channel replaced before its turn reached the right name server
(and heard the reply) missed a PV that was served. The scale-out collector
searched five name servers (the detector, three appliances, its own) when a CI
run failed: it waited 60 s for appliances that were serving. Sites may list
name servers; the tests' loopback network itself is searched by UDP. Here each
server has a search port of its own that no client asks: only the name servers
find them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import List

import pytest

from appliance.pva import channel_life_s
from appliance.sim.child_client import ChildMonitor, stop_with_parent
from appliance.sim.loopback import Ports, free_ports, loopback_env, new_search_port

_SERVE = """
import sys, pvaccess
server = pvaccess.PvaServer()
server.addRecord(sys.argv[1], pvaccess.PvObject({"value": pvaccess.INT}, {"value": 7}))
print("serving", flush=True)
sys.stdin.read()  # until the test closes our stdin (or dies)
"""


def test_with_one_name_server_or_none_a_channel_lives_one_search_interval():
    assert channel_life_s(0.5, 0) == channel_life_s(0.5, 1) == 0.5


def test_a_channel_lives_until_it_has_asked_every_name_server_and_one_interval_more():
    # attempts at 0, 0.225, 0.675, 1.575 and 3.375 s reach the 5th name server
    assert channel_life_s(0.5, 5) == pytest.approx(0.225 * (1 + 2 + 4 + 8) + 0.5)
    assert channel_life_s(0.5, 2) == pytest.approx(0.225 + 0.5)
    # pvAccess's back-off settles at ~29 s between attempts: each further name server adds that
    assert channel_life_s(0.5, 12) - channel_life_s(0.5, 11) == pytest.approx(29.0)


def _unsearched_ports() -> Ports:
    """Ports of a server that no UDP search reaches."""
    return dict(free_ports(), udp=new_search_port())


def _serve(name: str, ports: Ports) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(loopback_env(ports))
    server = subprocess.Popen([sys.executable, "-c", _SERVE, name], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, preexec_fn=stop_with_parent)
    assert server.stdout is not None and server.stdout.readline().strip() == "serving"
    return server


@pytest.mark.parametrize("position", [4, 1])
def test_a_viewer_searching_five_name_servers_finds_a_pv_served_after_it_started(position, monkeypatch):
    ports = [_unsearched_ports() for _ in range(6)]
    name = "NSTEST{}:value".format(position)
    servers: List[subprocess.Popen] = []
    monitor = None
    try:
        # the other name servers serve other PVs, as the appliances do for the collector
        servers += [_serve("NSTEST{}:other{}".format(position, i), ports[i]) for i in range(5) if i != position]
        for key, value in loopback_env(ports[5]).items():  # the viewer child reads them when it starts
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("EPICS_PVA_NAME_SERVERS", " ".join("127.0.0.1:{}".format(p["tcp"])
                                                             for p in [ports[5]] + ports[:5]))  # its own first
        values: List[int] = []
        arrived = threading.Event()

        def on_message(message, first):
            values.append(message["status"]["value"])
            arrived.set()

        monitor = ChildMonitor(name, ["monitor", "status", name], on_message)
        assert monitor.wait_for_child(1, 30.0)
        servers.append(_serve(name, ports[position]))
        assert arrived.wait(60.0), "no update of {} within 60 s; the monitor: {}".format(name, monitor.deaths)
        assert values[0] == 7
    finally:
        if monitor is not None:
            monitor.close()
        for server in servers:
            if server.stdin is not None:
                server.stdin.close()
            server.wait(timeout=30)
