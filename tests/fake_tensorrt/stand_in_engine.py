"""A GPU engine stand-in for the FAKE CUDA runtime: what a TensorRT engine does to a slot's stream.

The pipeline tests and scripts/bench_gpu_loop.py share it, so the benchmark measures the loop the
tests check.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from appliance.engines.base import BatchSpec, Engine, EngineIO, TensorSpec
from appliance.engines.errors import EngineError
from appliance.engines.manifest import PHASE


class Deadline:
    """A gate that opens by itself: a kernel that computes for ``seconds`` after its launch."""

    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds

    def is_set(self) -> bool:
        return time.monotonic() >= self._at


class StreamEngine(Engine):
    """A GPU engine stand-in: phase = 2 * x + 1, queued on the slot's stream as TensorRT's enqueue is.

    It takes its input as TensorRT does, one dense (batch, H, W) block at a 256-byte
    aligned device address. Kernel k computes for ``compute_s`` or until ``gates[k]``
    is set; launch k raises when k is in ``refuse``.
    """

    backend = "stand-in"

    def __init__(self, cudart, size: int = 8, max_batch: int = 4, max_in_flight: Optional[int] = None,
                 compute_s: float = 0.0, gates: Optional[Dict[int, threading.Event]] = None,
                 refuse: Tuple[int, ...] = ()) -> None:
        frame = TensorSpec("x", (size, size), np.dtype(np.float32))
        phase = TensorSpec("phase", (size, size), np.dtype(np.float32))
        io = EngineIO(frame, {PHASE: phase}, BatchSpec(False, max_batch))
        super().__init__("standin.engine", io, "0" * 64)
        self._cudart, self._size, self._limit = cudart, size, max_in_flight
        self._compute_s, self._gates, self._refuse = compute_s, gates or {}, refuse
        self._launches = 0
        self._launched = threading.Condition()
        self.seen: List[np.ndarray] = []  # what each kernel read

    @property
    def runs_on_gpu(self) -> bool:
        return True

    @property
    def max_in_flight(self) -> Optional[int]:
        return self._limit

    def run(self, frames: np.ndarray) -> Dict[str, np.ndarray]:
        return {PHASE: frames * np.float32(2) + np.float32(1)}

    def enqueue(self, input_ptr: int, output_ptrs: Mapping[str, int], batch: int, stream: int) -> None:
        with self._launched:
            index = self._launches
            self._launches += 1
            self._launched.notify_all()
        if index in self._refuse:
            raise EngineError("stand-in: launch {} refused".format(index))
        if input_ptr % 256:
            raise EngineError("stand-in: input address {:#x} is not 256-byte aligned".format(input_ptr))
        nbytes = batch * self._size * self._size * 4
        shape = (batch, self._size, self._size)
        frames = self._cudart.device_view(input_ptr, nbytes).view(np.float32).reshape(shape)
        phase = self._cudart.device_view(output_ptrs[PHASE], nbytes).view(np.float32).reshape(shape)

        def kernel() -> None:
            self.seen.append(frames.copy())
            phase[...] = self.run(frames)[PHASE]

        self._cudart.launch(stream, kernel, self._gates.get(index) or Deadline(self._compute_s))

    def wait_launched(self, count: int) -> None:
        with self._launched:
            assert self._launched.wait_for(lambda: self._launches >= count, 10.0), self._launches
