"""PVA clients of the tests, the demo and the benchmarks run in child processes: a crash in one fails nothing.

pvapy 5.6 crashed a CI run with a segfault inside ``Channel.monitor`` in the
pytest process. Here a client child is killed with that very signal; the test
process lives on, and the watch goes on through a new child.
"""
from __future__ import annotations

import os
import signal

from appliance.pva import Server
from appliance.sim.process import StatusWatch


def test_a_status_watch_whose_client_segfaults_goes_on_through_a_new_child(monkeypatch):
    # The record is this process's: its children search this process's own UDP port as well.
    own = "127.0.0.1:" + os.environ["EPICS_PVA_BROADCAST_PORT"]
    monkeypatch.setenv("EPICS_PVA_ADDR_LIST", os.environ["EPICS_PVA_ADDR_LIST"] + " " + own)
    server = Server()
    record = server.add_status("CHILD:Status")
    watch = StatusWatch("CHILD:Status")
    try:
        record.publish({"state": "serving", "received": 1})
        assert watch.wait_for(lambda s: s["received"] == 1, 30.0) is not None
        monitor = watch.monitor
        os.kill(monitor.pid, signal.SIGSEGV)
        assert monitor.wait_for_child(2, 30.0), monitor.deaths
        record.publish({"state": "serving", "received": 2})
        assert watch.wait_for(lambda s: s["received"] == 2, 30.0) is not None
        assert len(monitor.deaths) == 1 and "exited -{}".format(signal.SIGSEGV) in monitor.deaths[0]
    finally:
        watch.close()
        server.close()
