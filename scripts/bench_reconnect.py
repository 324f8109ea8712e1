"""How soon a plain pvapy viewer of P:Phase sees the appliance again after a clean restart (docs/deploy.md,
"Viewers after a restart"): the appliance is stopped with SIGTERM, left down for --down seconds and
started again; prints the seconds from that start to the viewer's first update, as JSON.

All on loopback (appliance.sim.loopback); a simulated detector streams at 20 Hz.

    .venv/bin/python scripts/bench_reconnect.py --down 60
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from appliance.sim.loopback import free_ports, loopback_env  # noqa: E402
from appliance.sim.process import write_config  # noqa: E402

from onnx_models import affine_model  # noqa: E402

# The viewer as a user would write it: one Channel, one monitor, nothing done on a disconnect.
VIEWER = """
import sys, time, pvaccess
channel = pvaccess.Channel(sys.argv[1])
channel.subscribe("v", lambda pv: (sys.stdout.write("%f\\n" % time.time()), sys.stdout.flush()))
channel.startMonitor("field(uniqueId)")
while True:
    time.sleep(1)
"""


def _updates(path: str) -> List[float]:
    with open(path) as handle:
        return [float(line) for line in handle if line.strip()]


def _wait_for(path: str, after: float, timeout: float, count: int = 1) -> List[float]:
    """The viewer's update times after ``after``, once there are ``count`` of them ([] after ``timeout``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen = [t for t in _updates(path) if t > after]
        if len(seen) >= count:
            return seen
        time.sleep(0.2)
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--down", type=float, default=60.0, help="seconds between the stop and the next start")
    parser.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the viewer after the start")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-reconnect-")
    appliance, detector, viewer = free_ports(), free_ports(), free_ports()
    config = write_config(os.path.join(work, "config.yaml"), "RECONNECT:det", "RECONNECT:pn",
                          engine_path=affine_model(os.path.join(work, "identity.onnx")),
                          publish={"state_directory": work}, mosaic={"enabled": False})
    bare = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    source = subprocess.Popen([sys.executable, "-m", "appliance.cli", "simulate", "--pv", "RECONNECT:det",
                               "--rate", "20", "--points", "20000", "--start-delay", "0"],
                              env=dict(bare, **loopback_env(detector)), stdout=subprocess.DEVNULL)
    log = open(os.path.join(work, "appliance.log"), "w")

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "--config", config],
                                env=dict(bare, **loopback_env(appliance)), stdout=log,
                                stderr=subprocess.STDOUT)

    updates = os.path.join(work, "viewer.txt")
    watcher = subprocess.Popen([sys.executable, "-c", VIEWER, "RECONNECT:pn:Phase"], stdout=open(updates, "w"),
                               env=dict(bare, **loopback_env(viewer)))
    try:
        run = start()
        if not _wait_for(updates, 0.0, 60.0, count=20):  # frames flowing to it, not only the first value
            raise SystemExit("the viewer saw nothing of the first run (log: {})".format(log.name))
        run.send_signal(signal.SIGTERM)
        stop_rc = run.wait()
        time.sleep(args.down)
        started = time.time()
        run = start()
        seen = _wait_for(updates, started, args.wait)
        print(json.dumps({"down_s": args.down, "stop_rc": stop_rc, "waited_s": args.wait,
                          "reconnect_s": round(seen[0] - started, 2) if seen else None}))
        run.send_signal(signal.SIGTERM)
        run.wait()
    finally:
        for process in (watcher, source):
            process.kill()
            process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
