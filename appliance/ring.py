"""The bounded frame ring between ingest (pvAccess thread) and the pipeline.

Slots live in one contiguous host buffer so that consecutive frames form a
batch the engine can read in place: one H2D copy per batch on a discrete GPU,
none at all through the mapped pointer on an integrated one. The buffer comes
from an allocator so the same ring runs on pinned CUDA memory or plain memory.

Where an engine reads the ring in place (mapped memory: ``memory.device_ptr``
set), every slot starts on a 256-byte boundary, the alignment TensorRT's
``setTensorAddress`` requires of a batch's first frame: the slot stride is the
frame's size rounded up to 256 bytes. Elsewhere slots are packed, so that a batch
is one dense block (one H2D copy on a discrete GPU, read as is on the CPU).

One writer and one reader. Slots move through three states in order:
free -> written (reserved, filled, committed) -> taken (in a batch) -> free.
A full ring refuses the frame; the caller counts it as dropped.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from appliance.ntndarray import FrameMeta

_ALIGNMENT = 4096
SLOT_ALIGNMENT = 256  # TensorRT's setTensorAddress: device addresses of I/O tensors are 256-byte aligned


class HostBuffer:
    """Plain page-aligned host memory; the CUDA module provides a pinned twin with the same attributes."""

    device_ptr: Optional[int] = None

    def __init__(self, nbytes: int) -> None:
        raw = np.empty(nbytes + _ALIGNMENT, dtype=np.uint8)
        offset = (-raw.ctypes.data) % _ALIGNMENT
        self.array = raw[offset : offset + nbytes]
        self.host_ptr = int(self.array.ctypes.data)

    def close(self) -> None:
        """Plain memory is freed with its last reference."""


Allocator = Callable[[int], Any]


@dataclass
class Batch:
    """Consecutive ring slots handed to the engine together."""

    start: int
    frames: np.ndarray  # (n, H, W) view into the ring buffer, rows ``FrameRing.slot_nbytes`` apart
    metas: List[FrameMeta]
    arrivals: List[float]  # time.monotonic() when each frame was received

    @property
    def size(self) -> int:
        return len(self.metas)


class FrameRing:
    def __init__(
        self,
        capacity: int,
        frame_shape: Tuple[int, int],
        dtype: Any,
        allocate: Allocator = HostBuffer,
    ) -> None:
        self.capacity = capacity
        self.frame_shape = tuple(frame_shape)
        self.dtype = np.dtype(dtype)
        self.frame_nbytes = int(np.prod(self.frame_shape)) * self.dtype.itemsize
        aligned_nbytes = -(-self.frame_nbytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        self.memory = allocate(capacity * aligned_nbytes)
        # Bytes from one slot to the next: aligned where an engine reads slots in place, packed elsewhere.
        self.slot_nbytes = aligned_nbytes if self.memory.device_ptr is not None else self.frame_nbytes
        row_nbytes = self.frame_shape[1] * self.dtype.itemsize
        self.frames = np.ndarray(
            (capacity,) + self.frame_shape, self.dtype, buffer=self.memory.array,
            strides=(self.slot_nbytes, row_nbytes, self.dtype.itemsize),
        )
        self._metas: List[Optional[FrameMeta]] = [None] * capacity
        self._arrivals = [0.0] * capacity
        # Monotonic counters; slot index = counter % capacity.
        self._written = 0  # committed by ingest
        self._taken = 0  # handed out in batches
        self._freed = 0  # released after the batch completed
        self._woken = False  # wake() called since the reader's last wait ended
        self._changed = threading.Condition(threading.Lock())

    # -- writer side (ingest) -------------------------------------------------
    def reserve(self, timeout: float = 0.0) -> Optional[int]:
        """The next free slot's index, or None when the ring stays full for ``timeout`` seconds."""
        with self._changed:
            if self._written - self._freed >= self.capacity:
                if timeout <= 0 or not self._changed.wait_for(
                    lambda: self._written - self._freed < self.capacity, timeout
                ):
                    return None
            return self._written % self.capacity

    def commit(self, meta: FrameMeta, arrival: float) -> None:
        """Publish the slot returned by :meth:`reserve`, now filled, to the reader."""
        with self._changed:
            index = self._written % self.capacity
            self._metas[index] = meta
            self._arrivals[index] = arrival
            self._written += 1
            self._changed.notify_all()

    # -- reader side (pipeline) -----------------------------------------------
    def waiting(self) -> int:
        with self._changed:
            return self._written - self._taken

    def oldest_arrival(self) -> Optional[float]:
        with self._changed:
            if self._written == self._taken:
                return None
            return self._arrivals[self._taken % self.capacity]

    def wait_for_frames(self, count: int, deadline: Optional[float]) -> int:
        """Block until ``count`` frames wait, ``deadline`` (monotonic) passes or :meth:`wake` is called;
        returns how many wait. A wake that comes while the reader is not waiting ends its next wait at once."""
        with self._changed:
            while self._written - self._taken < count and not self._woken:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._changed.wait(remaining)
            self._woken = False
            return self._written - self._taken

    def wake(self) -> None:
        """End the reader's wait (shutdown, engine swap), or its next one if it is not waiting now."""
        with self._changed:
            self._woken = True
            self._changed.notify_all()

    def is_dense(self, batch: Batch) -> bool:
        """Whether ``batch`` is one block of ``batch.size * frame_nbytes`` bytes, the layout an engine reads."""
        return batch.size == 1 or self.slot_nbytes == self.frame_nbytes

    def take(self, max_frames: int) -> Optional[Batch]:
        """Up to ``max_frames`` consecutive waiting frames, stopping at the buffer's end to stay contiguous."""
        with self._changed:
            available = self._written - self._taken
            if available == 0:
                return None
            start = self._taken % self.capacity
            count = min(available, max_frames, self.capacity - start)
            self._taken += count
            metas = self._metas[start : start + count]
            arrivals = self._arrivals[start : start + count]
        return Batch(start, self.frames[start : start + count], metas, arrivals)  # type: ignore[arg-type]

    def release(self, batch: Batch) -> None:
        """Return a completed batch's slots to the writer; batches complete in the order taken."""
        with self._changed:
            if batch.start != self._freed % self.capacity:
                raise RuntimeError(
                    "batch at slot {} released out of order (expected slot {})".format(
                        batch.start, self._freed % self.capacity
                    )
                )
            for index in range(batch.start, batch.start + batch.size):
                self._metas[index] = None
            self._freed += batch.size
            self._changed.notify_all()

    def depth(self) -> int:
        """Frames received but not yet released (waiting + in flight)."""
        with self._changed:
            return self._written - self._freed

    def close(self) -> None:
        self.memory.close()

