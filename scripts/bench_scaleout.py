"""Scale-out benchmark: N appliances share one pvapy-ad-sim-server stream (data distributor) + the collector.

Per trial (N appliances, a frame rate): the simulator streams 128x128 uint16 frames for
``--duration`` s; N ``ptychonn-edge run`` processes (identity ONNX model, distributor group, one
frame per turn) and ``ptychonn-edge collect`` merge them, and a viewer subscribes to the merged
``P:Phase`` (each appliance's output has the collector as its subscriber). A trial is zero-loss when
the collector merged every id the simulator sent, with nothing missing, and no appliance dropped or
had frames overrun. It also reports the collector's CPU per merged frame during the stream, its idle
cost (measured before the first frame) taken off.

The baseline runs on the same stream in the same trial: N ``pvapy-hpc-consumer`` processes with
the pass-through processor in their own distributor group, one update per turn (``-dg hpc -du 1
-oo N``: what ``-nc N -du 1`` starts, as N processes so that each serves its output on its own
ports, as each appliance does), each output with a viewer. Zero loss for it: no consumer missed,
overran or failed an id, the last id was processed, and every frame was processed and republished.

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

from appliance.sim.loopback import free_ports  # noqa: E402

from bench_stream import DETECTOR_PV, FRAME_SIZE, HpcConsumer, Simulator, allocate_ports, cpu_seconds, pva_env  # noqa: E402
from pva_viewer import ViewerProcess  # noqa: E402

MAX_APPLIANCES = 3


def baseline_roles(count: int) -> List[str]:
    return ["hpc{}".format(k) for k in range(1, count + 1)]


def start_baseline(ports: Dict[str, Dict[str, int]], work: str, count: int, queue_size: int) -> List[HpcConsumer]:
    """``count`` pass-through consumers sharing the stream through the distributor, as the appliances do."""
    return [HpcConsumer(ports, work, queue_size, role=role, output="BENCH:{}:output".format(role),
                        status="BENCH:{}:status".format(role),
                        options=["-id", str(k), "-dg", "hpc", "-du", "1", "-oo", str(count)])
            for k, role in enumerate(baseline_roles(count), start=1)]


def baseline_verdict(consumers: List[HpcConsumer], sent: int) -> Dict[str, Any]:
    stats = [c.status() or {} for c in consumers]

    def total(group: str, key: str) -> int:
        return sum(int(s.get(group, {}).get(key, 0)) for s in stats)

    result = {"processed": total("processorStats", "nProcessed"), "missed": total("processorStats", "nMissed"),
              "errors": total("processorStats", "nErrors"), "overruns": total("receiverStats", "nOverruns"),
              "published": total("publisherStats", "nPublished"),
              "last_id": max(int(s.get("processorStats", {}).get("lastObjectId", 0)) for s in stats),
              "shares": [int(s.get("processorStats", {}).get("nProcessed", 0)) for s in stats]}
    result["zero_loss"] = (result["missed"] == result["errors"] == result["overruns"] == 0 and result["last_id"] >= sent
                           and result["processed"] >= sent and result["published"] >= sent)
    return result


def trial(ports: Dict[str, Dict[str, int]], count: int, rate: float, args: argparse.Namespace) -> Dict[str, Any]:
    from appliance.sim.scaleout import ScaleOut
    from appliance.sim.viewer import Viewer

    from onnx_models import affine_model

    work = tempfile.mkdtemp(prefix="bench-scaleout-", dir=args.workdir)
    model = affine_model(os.path.join(work, "identity.onnx"), size=FRAME_SIZE)
    simulator = Simulator(ports, work, rate, args.duration, args.start_delay)
    group = ScaleOut(work, DETECTOR_PV, model, count, prefix="SCALE", log_dir=work,
                     collector={"mosaic": {"enabled": False}, "queue_size": args.queue_size},
                     detector={"queue_size": args.queue_size}, mosaic={"enabled": False})
    viewer = None
    baseline: List[HpcConsumer] = []
    baseline_viewers: List[ViewerProcess] = []
    try:
        simulator.wait_serving(60)
        baseline = start_baseline(ports, work, count, args.queue_size)
        for consumer in baseline:
            while consumer.status() is None:  # its first statistics: it runs (remote state without an event)
                if time.monotonic() > simulator.first_frame_at:
                    raise RuntimeError("{} did not start; see its log".format(consumer.log_path))
                time.sleep(0.1)
        # One viewer per consumer (p4p finds a server by its UDP port alone here: see pva_viewer.py).
        baseline_viewers = [ViewerProcess(["BENCH:{}:output".format(role)], pva_env(ports, "bench"),
                                          os.path.join(work, "viewer-{}.log".format(role)))
                            for role in baseline_roles(count)]
        for baseline_viewer in baseline_viewers:
            baseline_viewer.wait_connected(30.0)
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
        for consumer in baseline:
            consumer.stop()  # it prints its final statistics on the way out
        baseline_result = baseline_verdict(baseline, sent)
        baseline_result["viewers"] = [v.report() for v in baseline_viewers]
    finally:
        if viewer is not None:
            viewer.close()
        for consumer in baseline:
            if consumer.process.poll() is None:
                consumer.process.kill()
        for baseline_viewer in baseline_viewers:
            if baseline_viewer.process.poll() is None:
                baseline_viewer.process.kill()
        group.stop()
        simulator.stop()
    dropped = sum(a["dropped_total"] for a in appliances)
    overruns = sum(a["upstream_overruns"] for a in appliances) + sum(
        s["overruns"] for s in status["appliances"].values())
    return {"appliances": count, "rate_hz": rate, "sent": sent, "merged": status["merged"],
            "missing": status["missing"], "late": status["late"], "duplicates": status["duplicates"],
            "dropped": dropped, "overruns": overruns, "shares": [a["received"] for a in appliances],
            "zero_loss": status["merged"] >= sent and status["missing"] == 0 and dropped == 0 and overruns == 0,
            "collector_cpu_us_per_frame": 1e6 * cpu / max(1, status["merged"]),
            "collector_idle_cpu_percent": 100.0 * idle_rate, "baseline": baseline_result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appliances", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2, 3],
                        help="appliance counts to try, each at most {}".format(MAX_APPLIANCES))
    parser.add_argument("--rates", type=lambda t: [float(v) for v in t.split(",")], default=[200.0, 400.0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of streaming per trial")
    parser.add_argument("--start-delay", type=float, default=45.0,
                        help="seconds before the simulator's first frame (the processes start meanwhile)")
    parser.add_argument("--queue-size", type=int, default=1000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="JSON lines of the trials")
    args = parser.parse_args()
    ports = allocate_ports()  # the simulator's and this process's, for every trial: pvAccess reads them once
    ports.update((role, free_ports()) for role in baseline_roles(MAX_APPLIANCES))
    os.environ.update(pva_env(ports, "bench"))
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
