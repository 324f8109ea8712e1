#!/usr/bin/env python3
"""Hot-swap benchmark: swap latency, and frame latency during swaps versus without.

One run, one appliance process, one stream: a quiet phase (no swaps) and a swap
phase (a new model dropped into the engines directory every few seconds,
alternating identity and negation so the viewer can tell which engine produced
each frame). Swap latency is the time from the file's close to the first output
computed by the new engine, including the settle time (engine.settle_s).

    python scripts/bench_hotswap.py --rate 500 --swaps 8
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from appliance.sim.loopback import free_ports, loopback_env  # noqa: E402

from pva_viewer import ViewerProcess, loopback_viewer_env  # noqa: E402


def percentile(values: List[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="frames per second")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--swaps", type=int, default=8)
    parser.add_argument("--interval", type=float, default=4.0, help="seconds between swaps")
    parser.add_argument("--quiet", type=float, default=15.0, help="seconds of streaming without swaps")
    args = parser.parse_args(argv)

    mine, theirs = free_ports(), free_ports()
    os.environ.update(loopback_env(mine))

    import numpy as np

    from appliance.sim.detector import DetectorServer
    from appliance.sim.viewer import Viewer

    from harness import ApplianceProcess, write_config
    from onnx_models import affine_model

    work = tempfile.mkdtemp(prefix="bench-hotswap-")
    engines = os.path.join(work, "engines")
    os.makedirs(engines)
    affine_model(os.path.join(engines, "m000.onnx"), size=args.size, scale=1.0)
    blobs = {}
    for scale in (1.0, -1.0):
        path = affine_model(os.path.join(work, "src{}.onnx".format(scale)), size=args.size, scale=scale)
        with open(path, "rb") as handle:
            blobs[scale] = handle.read()
    config = write_config(os.path.join(work, "config.yaml"), "BENCHHS:det", "BENCHHS", engine_dir=engines,
                          pipeline={"max_batch": 8, "max_wait_ms": 2}, mosaic={"pixel_size_m": 1e-8})
    env = dict(os.environ)
    env.update(loopback_env(theirs))
    env["PYTHONPATH"] = ROOT
    detector = DetectorServer("BENCHHS:det")
    app = ApplianceProcess(config, env, "BENCHHS")
    app.wait_ready()
    viewer = Viewer("BENCHHS:Phase", keep_images=False)  # swap latency: which engine made each frame
    display = ViewerProcess(["BENCHHS:Phase", "BENCHHS:Mosaic"], loopback_viewer_env(env, theirs["udp"]),  # and a beamline's display
                            os.path.join(work, "viewer.log"))
    display.wait_connected(30)

    image = np.full((args.size, args.size), 100, np.uint16)
    stop = threading.Event()
    sent = [0]

    def frames():
        uid = 0
        while not stop.is_set():
            uid += 1
            sent[0] = uid
            yield image, None

    streamer = threading.Thread(target=lambda: detector.stream(frames(), args.rate), daemon=True)
    streamer.start()
    time.sleep(args.quiet)
    quiet_end = time.time()
    swaps = []
    for index in range(1, args.swaps + 1):
        scale = -1.0 if index % 2 else 1.0
        path = os.path.join(engines, "m{:03d}.onnx".format(index))
        with open(path, "wb") as handle:
            handle.write(blobs[scale])
        swaps.append((time.time(), scale))
        time.sleep(args.interval)
    stop.set()
    streamer.join()
    items = viewer.wait_for(sent[0], timeout=30)
    status = app.wait_counts(published=sent[0])
    display.wait_for_id("BENCHHS:Phase", sent[0], timeout=30)
    displayed = display.report()
    app.stop()
    detector.close()
    for pv, seen in sorted(displayed.items()):
        print("display {}: {} frames, {} missed (its own overruns)".format(pv, seen["frames"], seen.get("missed", 0)))
    return report(items, swaps, quiet_end, status, sent[0])


def report(items, swaps, quiet_end, status, sent) -> int:
    from appliance.sim.viewer import latencies_ms

    latency = latencies_ms(items)
    quiet = [ms for item, ms in zip(items, latency) if item.arrived < quiet_end]
    near_swap = [ms for item, ms in zip(items, latency) if any(abs(item.arrived - t) < 2.0 for t, _ in swaps)]
    swap_latency = []
    for written, scale in swaps:  # identity keeps +100, negation gives -100
        first = next((i for i in items if i.arrived > written and float(i.image[0, 0]) * scale > 0), None)
        if first is not None:
            swap_latency.append(first.arrived - written)
    print("frames sent {}, published {}, dropped {}, missing upstream {}".format(
        sent, status["published"], status["dropped_total"], status["missing_upstream"]))
    print("swaps {}, swap latency (last write -> first frame on the new engine): median {:.2f} s, max {:.2f} s".format(
        len(swap_latency), percentile(swap_latency, 50), max(swap_latency) if swap_latency else float("nan")))
    print("| phase | frames | latency p50 (ms) | p99 (ms) | max (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in (("no swap", quiet), ("within 2 s of a swap", near_swap)):
        print("| {} | {} | {:.2f} | {:.2f} | {:.2f} |".format(
            name, len(values), percentile(values, 50), percentile(values, 99), max(values) if values else float("nan")))
    return 0 if status["published"] == sent and len(swap_latency) == len(swaps) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
