#!/usr/bin/env python3
"""Arrival-to-publish latency of the GPU loop for lone frames (issue 13, defect 1), on a CPU.

A finished batch must be published when its slot completes, not when the next frame arrives:
at 50 Hz a loop that only wakes on frames publishes each frame a frame period (20 ms) late, and
one that sleeps on the ring's idle tick up to 250 ms late. This drives the real Pipeline, ring
and CUDA slots on the FAKE CUDA runtime (tests/fake_tensorrt) with the stand-in engine whose
kernel completes ``--compute-ms`` after launch, so the figure is the loop's own latency; on a
GPU the kernel time adds to it. Target: p99 <= max_wait_ms + 10 ms.

    python scripts/bench_gpu_loop.py --rate 50 --frames 500 --compute-ms 3 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Dict, List

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from appliance import cuda  # noqa: E402
from appliance.config import PipelineConfig  # noqa: E402
from appliance.ntndarray import FrameMeta  # noqa: E402
from appliance.pipeline import Pipeline  # noqa: E402
from appliance.ring import FrameRing  # noqa: E402
from appliance.telemetry import Telemetry  # noqa: E402

import fake_tensorrt  # noqa: E402
from fake_tensorrt.stand_in_engine import StreamEngine  # noqa: E402


class PublishClock:
    """The sink: when each frame's phase image left the pipeline, relative to its arrival."""

    def __init__(self, expected: int) -> None:
        self.latencies_ms: List[float] = []
        self._arrivals: Dict[int, float] = {}
        self._expected = expected
        self._done = threading.Event()

    def arrived(self, unique_id: int, at: float) -> None:
        self._arrivals[unique_id] = at

    def __call__(self, frame: FrameMeta, images: Dict[str, np.ndarray]) -> None:
        self.latencies_ms.append((time.monotonic() - self._arrivals[frame.unique_id]) * 1e3)
        if len(self.latencies_ms) >= self._expected:
            self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)


def trial(args: argparse.Namespace, cudart) -> List[float]:
    engine = StreamEngine(cudart, size=args.size, max_batch=args.max_batch, compute_s=args.compute_ms / 1e3)
    ring = FrameRing(64, engine.io.image_shape, np.float32, allocate=cuda.PinnedBuffer)
    clock = PublishClock(args.frames)
    config = PipelineConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, in_flight=2)
    pipeline = Pipeline(config, ring, engine, clock, Telemetry(args.frames))
    pipeline.start()
    period = 1.0 / args.rate
    start = time.monotonic()
    for unique_id in range(1, args.frames + 1):
        time.sleep(max(0.0, start + unique_id * period - time.monotonic()))
        index = ring.reserve()
        ring.frames[index] = float(unique_id)
        now = time.monotonic()
        clock.arrived(unique_id, now)
        ring.commit(FrameMeta(unique_id, (0, 0, 0), (0, 0, 0), (), None), now)
    if not clock.wait(30.0):
        raise SystemExit("only {} of {} frames published".format(len(clock.latencies_ms), args.frames))
    pipeline.stop(5)
    return clock.latencies_ms


def percentile(values: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="frames per second")
    parser.add_argument("--frames", type=int, default=500, help="frames per trial")
    parser.add_argument("--compute-ms", type=float, default=3.0, help="the stand-in kernel's time")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the shipped default")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cudart = fake_tensorrt.install_cuda(pytest.MonkeyPatch())
    print("| trial | frames | p50 (ms) | p99 (ms) | max (ms) | target p99 (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    p99s = []
    for index in range(1, args.repeats + 1):
        latencies = trial(args, cudart)
        p99s.append(percentile(latencies, 99))
        print("| {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.0f} |".format(
            index, len(latencies), percentile(latencies, 50), p99s[-1], max(latencies), args.max_wait_ms + 10))
    print("median p99 over {} trials: {:.1f} ms".format(args.repeats, statistics.median(p99s)))


if __name__ == "__main__":
    main()
