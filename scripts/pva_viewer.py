"""A beamline viewer stand-in: p4p monitors on NTNDArray PVs, reporting what each one received.

Benchmarks run one per consumer so that every output PV has a subscriber, as at
a beamline, and the tests use it as the independent client (p4p is a second
PVAccess implementation, and a crash in it cannot take a test process down).
It runs until SIGTERM or SIGINT, prints ``connected PV`` once per PV when its
first update arrives, and then writes one JSON line per PV to stdout:

    {"pv": ..., "updates": ..., "frames": ..., "first_id": ..., "last_id": ...,
     "missed": ..., "latency_p50_ms": ..., "latency_p99_ms": ...}

``missed`` counts uniqueIds between the first and the last that never arrived:
the updates the server squashed because this viewer's queue was full (its own
overruns). Latency is from the frame's ``timeStamp`` to arrival here (same host
clock). While it runs it prints ``latest PV ID`` when the newest uniqueId changes. A SIGSTOP'd
viewer is a frozen display; after SIGCONT it catches up and reports as usual.

    python scripts/pva_viewer.py BENCH:Phase BENCH:Mosaic --queue-size 64
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import numpy as np


class Tally:
    """What one PV delivered: counts, the ids seen, arrival latencies."""

    def __init__(self, pv: str) -> None:
        self.pv = pv
        self.updates = 0
        self.ids: List[int] = []
        self.latencies_ms: List[float] = []
        self.connected = threading.Event()

    def add(self, value: Any) -> None:
        arrived = time.time()
        self.updates += 1
        self.connected.set()
        unique_id = int(value["uniqueId"])
        if unique_id == 0:
            return  # the record's initial, never-written value
        self.ids.append(unique_id)
        stamp = value["timeStamp"]
        sent = stamp["secondsPastEpoch"] + stamp["nanoseconds"] * 1e-9
        self.latencies_ms.append((arrived - sent) * 1e3)

    def summary(self) -> Dict[str, Any]:
        ids = np.unique(np.asarray(self.ids, dtype=np.int64))
        latencies = np.asarray(self.latencies_ms)
        result: Dict[str, Any] = {"pv": self.pv, "updates": self.updates, "frames": len(self.ids),
                                  "distinct": int(ids.size)}
        if ids.size:
            result.update(first_id=int(ids[0]), last_id=int(ids[-1]),
                          missed=int(ids[-1] - ids[0] + 1 - ids.size))
        if latencies.size:
            result.update(latency_p50_ms=round(float(np.percentile(latencies, 50)), 2),
                          latency_p99_ms=round(float(np.percentile(latencies, 99)), 2))
        return result


def watch(pvs: List[str], queue_size: int) -> None:
    # pvxs searches name servers over TCP, and pvAccessCPP servers (pvapy's) were not seen to answer
    # that here: with EPICS_PVA_NAME_SERVERS set, p4p never found them. UDP search finds them.
    os.environ.pop("EPICS_PVA_NAME_SERVERS", None)
    from p4p.client.thread import Context

    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    context = Context("pva", nt=False)
    tallies = [Tally(pv) for pv in pvs]
    request = "record[queueSize={}]field()".format(queue_size)
    subscriptions = [context.monitor(t.pv, t.add, request=request, notify_disconnect=False) for t in tallies]
    for tally in tallies:
        threading.Thread(target=_announce, args=(tally, done), daemon=True).start()
    done.wait()
    for subscription in subscriptions:
        subscription.close()
    for tally in tallies:
        print(json.dumps(tally.summary()), flush=True)
    context.close()


def _announce(tally: Tally, done: threading.Event) -> None:
    """``connected PV`` once, then ``latest PV ID`` whenever the newest uniqueId changed (twice a second)."""
    while not done.is_set() and not tally.connected.wait(0.5):
        pass
    print("connected {}".format(tally.pv), flush=True)
    shown = None
    while not done.wait(0.5):
        latest = tally.ids[-1] if tally.ids else None
        if latest != shown:
            print("latest {} {}".format(tally.pv, latest), flush=True)
            shown = latest


def parse_report(text: str) -> Dict[str, Dict[str, Any]]:
    """The per-PV summaries in a viewer's output, by PV name."""
    found = {}
    for line in text.splitlines():
        if line.startswith("{"):
            summary = json.loads(line)
            found[summary["pv"]] = summary
    return found


def loopback_viewer_env(base: Dict[str, str], server_udp_port: int) -> Dict[str, str]:
    """``base`` with the PVA settings that find one server on loopback by its UDP search port."""
    env = {key: value for key, value in base.items() if not key.startswith("EPICS_")}
    env.update(EPICS_PVA_AUTO_ADDR_LIST="NO", EPICS_PVA_ADDR_LIST="127.0.0.1:{}".format(server_udp_port))
    return env


class ViewerProcess:
    """This script in a child process, for benchmarks and tests: a display that can also freeze.

    ``env`` carries the child's PVA search settings (loopback in benchmarks and tests).
    """

    def __init__(self, pvs: List[str], env: Dict[str, str], log_path: str, queue_size: int = 64) -> None:
        self.pvs = list(pvs)
        self.log_path = log_path
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), *pvs, "--queue-size",
                                         str(queue_size)], env=env, stdout=open(log_path, "w"),
                                        stderr=subprocess.STDOUT)

    def connected(self) -> bool:
        """Every PV has delivered its first update (the record's current value)."""
        with open(self.log_path) as handle:
            text = handle.read()
        return all("connected {}".format(pv) in text for pv in self.pvs)

    def wait_connected(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.connected():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("viewer of {} did not connect; see {}".format(", ".join(self.pvs), self.log_path))
            time.sleep(0.1)  # another process's log: no event to await

    def wait_for_id(self, pv: str, unique_id: int, timeout: float) -> bool:
        """Until ``pv`` has delivered ``unique_id`` (or a later one); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        prefix = "latest {} ".format(pv)
        while time.monotonic() < deadline and self.process.poll() is None:
            with open(self.log_path) as handle:
                latest = [int(line[len(prefix):]) for line in handle if line.startswith(prefix)]
            if latest and latest[-1] >= unique_id:
                return True
            time.sleep(0.2)  # another process's log: no event to await
        return False

    def freeze(self) -> None:
        """A display that stops reading (a hung GUI): the process is stopped, its sockets stay open."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def report(self, timeout: float = 10.0) -> Dict[str, Dict[str, Any]]:
        """What each PV delivered, once the viewer has stopped (killed if it does not stop in ``timeout``)."""
        if self.process.poll() is None:
            self.thaw()
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with open(self.log_path) as handle:
            return parse_report(handle.read())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pvs", nargs="+", help="NTNDArray PVs to monitor")
    parser.add_argument("--queue-size", type=int, default=64, help="server-side queue for each monitor")
    args = parser.parse_args(argv)
    watch(args.pvs, args.queue_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
