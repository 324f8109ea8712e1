"""Scale-out benchmark: N appliances share one pvapy-ad-sim-server stream (data distributor) + the collector.

Per trial (N appliances, a frame rate): the simulator streams 128x128 uint16 frames for
``--duration`` s; N ``ptychonn-edge run`` processes (identity ONNX model, distributor group, one
frame per turn) and ``ptychonn-edge collect`` merge them, and a viewer subscribes to the merged
``P:Phase`` (each appliance's output has the collector as its subscriber). A trial is zero-loss when
the collector merged every id the simulator sent, with nothing missing, and no appliance dropped or
had frames overrun. It also reports the collector's CPU per merged frame during the stream, its idle
cost (measured before the first frame) taken off.

    python scripts/bench_scaleout.py --appliances 1,2,3 --rates 200,400 --duration 10

Every process runs on this machine: on 2 cores the N appliances compete for the same CPUs, so the
aggregate rate measures the host, not what N Jetsons would do (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # onnx_models: the identity model
sys.path.insert(0, os.path.join(ROOT, "scripts"))  # bench_stream: the simulator and process facts

from bench_stream import DETECTOR_PV, FRAME_SIZE, Simulator, allocate_ports, cpu_seconds, pva_env  # noqa: E402


def trial(ports: Dict[str, Dict[str, int]], count: int, rate: float, args: argparse.Namespace) -> Dict[str, Any]:
    from appliance.sim.scaleout import ScaleOut
    from appliance.sim.viewer import Viewer
    from onnx_models import affine_model

    work = tempfile.mkdtemp(prefix="bench-scaleout-", dir=args.workdir)
    model = affine_model(os.path.join(work, "identity.onnx"), size=FRAME_SIZE)
    simulator = Simulator(ports, work, rate, args.duration, args.start_delay)
    group = ScaleOut(work, DETECTOR_PV, ports["sim"], model, count, prefix="SCALE", log_dir=work,
                     collector={"mosaic": {"enabled": False}, "queue_size": args.queue_size},
                     detector={"queue_size": args.queue_size}, mosaic={"enabled": False})
    viewer = None
    try:
        simulator.wait_serving(60)
        group.start()
        viewer = Viewer("SCALE:Phase", keep_images=False)
        collector_pid = group.collector.process.pid
        # Its idle cost (status, searches), measured before the stream, is taken off the per-frame figure.
        idle_from, idle_cpu = time.monotonic(), cpu_seconds(collector_pid)
        time.sleep(max(0.0, simulator.first_frame_at - time.monotonic()))
        idle_rate = (cpu_seconds(collector_pid) - idle_cpu) / max(1e-3, time.monotonic() - idle_from)
        stream_from, cpu_before = time.monotonic(), cpu_seconds(collector_pid)
        simulator.wait_finished(args.duration)
        sent = simulator.frames_sent()
        status = group.collector.wait_details(lambda s: s["merged"] + s["missing"] >= sent and s["reorder_depth"] == 0,
                                              timeout=30)
        cpu = cpu_seconds(collector_pid) - cpu_before - idle_rate * (time.monotonic() - stream_from)
        appliances = [app.details() for app in group.appliances if app is not None]
    finally:
        if viewer is not None:
            viewer.close()
        group.close()
        simulator.stop()
    dropped = sum(a["dropped_total"] for a in appliances)
    overruns = sum(a["upstream_overruns"] for a in appliances) + sum(
        s["overruns"] for s in status["appliances"].values())
    return {"appliances": count, "rate_hz": rate, "sent": sent, "merged": status["merged"],
            "missing": status["missing"], "late": status["late"], "duplicates": status["duplicates"],
            "dropped": dropped, "overruns": overruns, "shares": [a["received"] for a in appliances],
            "zero_loss": status["merged"] >= sent and status["missing"] == 0 and dropped == 0 and overruns == 0,
            "collector_cpu_us_per_frame": 1e6 * cpu / max(1, status["merged"]),
            "collector_idle_cpu_percent": 100.0 * idle_rate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appliances", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2, 3])
    parser.add_argument("--rates", type=lambda t: [float(v) for v in t.split(",")], default=[200.0, 400.0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of streaming per trial")
    parser.add_argument("--start-delay", type=float, default=45.0,
                        help="seconds before the simulator's first frame (the processes start meanwhile)")
    parser.add_argument("--queue-size", type=int, default=1000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="JSON lines of the trials")
    args = parser.parse_args()
    ports = allocate_ports()  # the simulator's and this process's, for every trial: pvAccess reads them once
    os.environ.update(pva_env(ports, "bench", ["sim"]))
    results: List[Dict[str, Any]] = []
    for count in args.appliances:
        for rate in args.rates:
            started = time.monotonic()
            result = trial(ports, count, rate, args)
            result["wall_s"] = time.monotonic() - started
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
