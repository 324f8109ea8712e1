#!/usr/bin/env python3
"""GPU path benchmark: the pinned, double-buffered path against the naive one, in the same run.

Frames (uint16, 128x128 by default) are ingested one by one through the stream's
preprocessing (the cast to float32 is the one copy) and inferred in batches by
the NVRTC stand-in engine (tests/gpu/standin_engine.py, which spins for
``--compute-us`` per batch to stand for a network):

- pinned: frames land in the pinned FrameRing; ``--in-flight`` CudaSlots each
  copy a batch in with one async H2D (none on an integrated GPU), run, copy out,
  and are completed by event query, so ingest of batch k+1 overlaps batch k.
- naive: frames land in pageable numpy memory; one stream; H2D, run, D2H and a
  stream synchronize after every batch (how the field's code worked).

Every frame in is a frame out (checked, and the outputs are verified against
the transform), so frames/s is a zero-loss rate. Latency is from a frame's
ingest to its outputs being on the host. Needs CUDA and cuda-python's NVRTC.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Deque, Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "gpu")]

from appliance import cuda  # noqa: E402
from appliance.engines.base import BatchSpec  # noqa: E402
from appliance.engines.manifest import AMPLITUDE, PHASE  # noqa: E402
from appliance.gpu_inflight import CudaSlot  # noqa: E402
from appliance.ntndarray import FrameMeta  # noqa: E402
from appliance.preprocess import Preprocessor  # noqa: E402
from appliance.ring import FrameRing  # noqa: E402

from standin_engine import NvrtcEngine, clock_cycles_per_us  # noqa: E402

Check = Callable[[int, Dict[str, np.ndarray]], None]


class Results:
    """Frames out, their latencies, and a spot check of the values."""

    def __init__(self, engine: NvrtcEngine, source: np.ndarray, check_every: int) -> None:
        self.engine, self.source, self.check_every = engine, source, check_every
        self.latencies: List[float] = []
        self.published = 0
        self.checked = 0

    def take(self, first_frame: int, arrivals: List[float], outputs: Dict[str, np.ndarray]) -> None:
        now = time.perf_counter()
        for index, arrival in enumerate(arrivals):
            self.latencies.append(now - arrival)
            # "publish": the consumer copies each image out of the reused output buffer
            np.copy(outputs[PHASE][index])
        if (first_frame // len(arrivals)) % self.check_every == 0:
            frames = self.source[[(first_frame + i) % len(self.source) for i in range(len(arrivals))]]
            want = self.engine.expected(frames.astype(np.float32))
            for role in (PHASE, AMPLITUDE):
                np.testing.assert_allclose(outputs[role][: len(arrivals)], want[role], rtol=1e-6)
            self.checked += 1
        self.published += len(arrivals)


def run_pinned(engine: NvrtcEngine, source: np.ndarray, total: int, batch: int, in_flight: int,
               results: Results) -> float:
    size = source.shape[1:]
    transform = Preprocessor(size, (0, 0, 0, 0), 1)
    ring = FrameRing(64 * batch, size, np.float32, allocate=cuda.PinnedBuffer)
    slots = [CudaSlot(engine, ring) for _ in range(in_flight)]
    busy: Deque[CudaSlot] = collections.deque()
    first_of: Dict[int, int] = {}

    def complete(slot: CudaSlot) -> None:
        slot.wait()
        assert slot.batch is not None
        results.take(first_of[id(slot)], slot.batch.arrivals, slot.outputs())
        ring.release(slot.batch)

    sent = 0
    started = time.perf_counter()
    while results.published < total:
        while sent < total and ring.waiting() < batch:
            index = ring.reserve()
            if index is None:
                break
            transform(source[sent % len(source)], ring.frames[index])
            ring.commit(FrameMeta(sent, (0, 0, 0), (0, 0, 0), (), None), time.perf_counter())
            sent += 1
        while busy and busy[0].done():
            complete(busy.popleft())
        if len(busy) == len(slots):
            complete(busy.popleft())
            continue
        first = sent - ring.waiting()
        work = ring.take(batch)
        if work is None:
            if busy:
                complete(busy.popleft())
            continue
        slot = next(s for s in slots if s not in busy)
        first_of[id(slot)] = first
        slot.launch(engine, work)
        busy.append(slot)
    elapsed = time.perf_counter() - started
    for slot in slots:
        slot.close()
    ring.close()
    return elapsed


def run_naive(engine: NvrtcEngine, source: np.ndarray, total: int, batch: int, results: Results) -> float:
    size = source.shape[1:]
    transform = Preprocessor(size, (0, 0, 0, 0), 1)
    frames = np.empty((batch,) + size, np.float32)  # pageable
    outputs = {role: np.empty((batch,) + size, np.float32) for role in (PHASE, AMPLITUDE)}
    device_in = cuda.DeviceBuffer(frames.nbytes)
    device_out = {role: cuda.DeviceBuffer(frames.nbytes) for role in outputs}
    stream = cuda.Stream()
    sent = 0
    started = time.perf_counter()
    while sent < total:
        count = min(batch, total - sent)
        arrivals = []
        for index in range(count):
            transform(source[(sent + index) % len(source)], frames[index])
            arrivals.append(time.perf_counter())
        cuda.copy_host_to_device(device_in.ptr, frames.ctypes.data, count * frames[0].nbytes, stream)
        engine.enqueue(device_in.ptr, {r: b.ptr for r, b in device_out.items()}, count, stream.handle)
        for role, out in outputs.items():
            cuda.copy_device_to_host(out.ctypes.data, device_out[role].ptr, count * out[0].nbytes, stream)
        stream.synchronize()
        results.take(sent, arrivals, outputs)
        sent += count
    elapsed = time.perf_counter() - started
    for buffer in [device_in] + list(device_out.values()):
        buffer.close()
    stream.close()
    return elapsed


def measure(path: str, compute_us: float, args: argparse.Namespace, source: np.ndarray) -> Dict[str, Any]:
    engine = NvrtcEngine(size=args.size, batch=BatchSpec(False, args.batch), spin_us=compute_us)
    results = Results(engine, source, check_every=50)
    if path == "pinned":
        elapsed = run_pinned(engine, source, args.frames, args.batch, args.in_flight, results)
    else:
        elapsed = run_naive(engine, source, args.frames, args.batch, results)
    if results.published != args.frames:
        raise AssertionError("{}: {} frames in, {} out".format(path, args.frames, results.published))
    latencies = np.array(results.latencies) * 1e3
    return {
        "path": path, "compute_us": compute_us, "batch": args.batch, "frames": args.frames,
        "lost": args.frames - results.published, "batches_checked": results.checked,
        "frames_per_s": args.frames / elapsed,
        "latency_ms_p50": float(np.percentile(latencies, 50)), "latency_ms_p99": float(np.percentile(latencies, 99)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--compute-us", type=float, nargs="+", default=[0.0, 250.0],
                        help="stand-in compute per batch, microseconds (several: one run each)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    usable, device = cuda.available()
    if not usable:
        print("SKIPPED: no usable CUDA device: {}".format(device))
        return 0
    source = np.random.default_rng(0).integers(0, 4000, (256, args.size, args.size)).astype(np.uint16)
    report: Dict[str, Any] = {
        "device": device, "cuda_python_layout": cuda.runtime_layout(), "python": platform.python_version(),
        "numpy": np.__version__, "clock_cycles_per_us": clock_cycles_per_us(), "runs": [],
    }
    warm = argparse.Namespace(**dict(vars(args), frames=2000))
    for path in ("pinned", "naive"):
        measure(path, 0.0, warm, source)  # compile, allocate, fault in the code paths
    print("device: {}\n".format(device))
    print("| path | compute/batch | batch | frames | lost | frames/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for compute_us in args.compute_us:
        pair = {}
        for path in ("pinned", "naive"):
            row = measure(path, compute_us, args, source)
            pair[path] = row
            report["runs"].append(row)
            print("| {path} | {compute_us:.0f} us | {batch} | {frames} | {lost} | {frames_per_s:,.0f} | "
                  "{latency_ms_p50:.3f} | {latency_ms_p99:.3f} |".format(**row), flush=True)
        speedup = pair["pinned"]["frames_per_s"] / pair["naive"]["frames_per_s"]
        report.setdefault("speedup", {})[str(compute_us)] = speedup
        print("|  | speed-up {:.2f}x |  |  |  |  |  |  |".format(speedup), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
