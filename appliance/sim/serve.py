"""Simulate a ptychography scan and serve it as a detector PV (or save it to disk).

The physics runs on a thread ahead of the stream, a few seconds' worth of frames
in hand before the first is sent, so the rate holds through the physics' own
hiccups while memory stays bounded and a long scan starts at once. Where the
physics is slower than the rate asked for, the served rate says so at the end.
"""
from __future__ import annotations

import argparse
import logging
import queue
import sys
import threading
import time
from typing import Iterator, List, Optional, Tuple

import numpy as np
import yaml

from appliance import schema
from appliance.sim.detector import DetectorServer
from appliance.sim.scan import ScanSimulation, SimulationConfig, save_scan

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of simulation settings (keys of SimulationConfig)")
    parser.add_argument("--pv", default="13SIM1:Pva1:Image", help="detector PV to serve")
    parser.add_argument("--rate", type=float, default=100.0, help="frames per second")
    parser.add_argument("--points", type=int, help="scan points")
    parser.add_argument("--pattern", choices=("spiral", "raster"), help="scan trajectory")
    parser.add_argument("--step-nm", type=float, help="scan step in nm")
    parser.add_argument("--frame-size", type=int, help="detector frame size in pixels (e.g. 128 or 516)")
    parser.add_argument("--sample", choices=("etched", "shapes"), help="training-like etched features or test shapes")
    parser.add_argument("--photons", type=float, help="photons on the sample per frame")
    parser.add_argument("--seed", type=int, help="random seed (sample, noise)")
    parser.add_argument("--codec", choices=("lz4", "bslz4", "blosc"), help="compress frames as NDPluginCodec would")
    parser.add_argument("--start-delay", type=float, default=0.0, help="seconds between serving the PV and the first frame")
    parser.add_argument("--save", metavar="PATH", help="write the scan (PATH.h5, or a directory of .npy) instead of serving")


def simulation_config(args: argparse.Namespace) -> SimulationConfig:
    """The YAML settings, then each command-line option given, validated as one document."""
    data = {}
    if args.config:
        with open(args.config, "r", encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    overrides = {
        ("scan", "points"): args.points,
        ("scan", "pattern"): args.pattern,
        ("scan", "step_m"): args.step_nm * 1e-9 if args.step_nm is not None else None,
        ("detector", "frame_size"): args.frame_size,
        ("detector", "photons"): args.photons,
        ("sample", "kind"): args.sample,
        ("seed",): args.seed,
    }
    for path, value in overrides.items():
        if value is None:
            continue
        target = data
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value
    return schema.load(SimulationConfig, data, args.config or "simulation settings")


Frame = Tuple[np.ndarray, Tuple[float, float]]
LEAD_S = 3.0  # frames in hand, in seconds of the stream, before the first is sent


def prepare(sim: ScanSimulation) -> List[Frame]:
    """Every frame with its motor position, in acquisition order."""
    return [(point.frame, (point.x_m, point.y_m)) for point in sim.points(chunk=64)]


def computed_ahead(sim: ScanSimulation, rate_hz: float, lead_s: float = LEAD_S) -> Iterator[Frame]:
    """The scan's frames, computed on a thread at most ``lead_s`` of the stream ahead; the first comes
    once that lead is in hand (or the whole scan, if shorter)."""
    lead = max(1, min(len(sim), int(rate_hz * lead_s)))
    ahead: "queue.Queue[Optional[Frame]]" = queue.Queue(maxsize=lead)
    ready = threading.Event()

    def compute() -> None:
        for count, point in enumerate(sim.points(chunk=64), 1):
            ahead.put((point.frame, (point.x_m, point.y_m)))
            if count == lead:
                ready.set()
        ahead.put(None)
        ready.set()

    threading.Thread(target=compute, name="physics", daemon=True).start()
    ready.wait()
    while True:
        frame = ahead.get()
        if frame is None:
            return
        yield frame


def main(args: argparse.Namespace) -> int:
    try:
        config = simulation_config(args)
    except (OSError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    sim = ScanSimulation(config)
    if args.save:
        print("wrote {}".format(save_scan(sim, args.save)))
        return 0
    print("{} frames of {}x{} (beam {:.0f} nm, step {:.0f} nm, overlap {:.0%}), computed {:.0f} s ahead".format(
        len(sim), config.detector.frame_size, config.detector.frame_size, sim.beam_diameter_m * 1e9,
        config.scan.step_m * 1e9, sim.overlap, LEAD_S), flush=True)  # flushed: under systemd stdout is a pipe
    server = DetectorServer(args.pv)
    try:
        time.sleep(args.start_delay)  # let viewers connect, as pvapy-ad-sim-server's -std does
        frames = computed_ahead(sim, args.rate)
        started = time.monotonic()
        sent = server.stream(frames, args.rate, codec=args.codec) - 1
        elapsed = max(time.monotonic() - started, 1e-9)
        print("served {} frames on {} in {:.1f} s ({:.0f} Hz{})".format(
            sent, args.pv, elapsed, sent / elapsed,
            "" if sent / elapsed > 0.95 * args.rate else "; the physics is slower than --rate here"), flush=True)
    finally:
        server.close()
    return 0


def serve_in_background(server: DetectorServer, frames: List[Tuple[np.ndarray, Tuple[float, float]]], rate: float,
                        codec: Optional[str] = None) -> threading.Thread:
    """Stream on a thread (the demo watches the appliance meanwhile)."""
    thread = threading.Thread(target=server.stream, args=(frames, rate), kwargs={"codec": codec}, daemon=True)
    thread.start()
    return thread
