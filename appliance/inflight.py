"""In-flight slots: a batch on its way through an engine.

The pipeline keeps N slots in a FIFO so the host can fill batch k+1 while batch
k computes; completion is asked of each slot, never of the whole device. A CPU
slot finishes inside :meth:`launch`; a CUDA slot (``appliance.gpu_inflight``)
returns as soon as its work is queued on its own stream.
"""
from __future__ import annotations

import abc
from typing import Dict, Optional

import numpy as np

from appliance.engines.base import Engine, run_padded
from appliance.ring import Batch


class InflightSlot(abc.ABC):
    """One batch's journey; a slot is reused once its outputs have been consumed."""

    # While the slot is in flight, how long the pipeline may wait for frames before it asks
    # done() again: how late a completion may be noticed. Slots done at launch are never polled.
    poll_s = 0.0

    def __init__(self) -> None:
        self.batch: Optional[Batch] = None
        self.engine: Optional[Engine] = None

    @abc.abstractmethod
    def launch(self, engine: Engine, batch: Batch) -> None:
        """Start inference of ``batch`` (the frames stay in the ring until the slot is done)."""

    @abc.abstractmethod
    def done(self) -> bool:
        """True once outputs are ready on the host; never blocks."""

    @abc.abstractmethod
    def wait(self) -> None:
        """Block until :meth:`done` would be true, leaving the GIL to other threads (ingest) meanwhile."""

    @abc.abstractmethod
    def outputs(self) -> Dict[str, np.ndarray]:
        """Role -> (batch.size, H, W) host arrays, valid until the next launch; padding excluded."""

    def close(self) -> None:
        """Release what the slot holds (streams, device and pinned buffers); it is not used again."""


class CpuSlot(InflightSlot):
    """Runs synchronously; pads a short batch for fixed-batch models in a reused buffer."""

    def __init__(self) -> None:
        super().__init__()
        self._padded: Optional[np.ndarray] = None
        self._outputs: Dict[str, np.ndarray] = {}

    def launch(self, engine: Engine, batch: Batch) -> None:
        self.engine, self.batch = engine, batch
        spec = engine.io.batch
        if spec.fixed and self._padded is None:
            self._padded = np.zeros((spec.size,) + batch.frames.shape[1:], dtype=batch.frames.dtype)
        self._outputs = run_padded(engine, batch.frames, self._padded)

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        """Nothing to wait for: launch() already ran the batch."""

    def outputs(self) -> Dict[str, np.ndarray]:
        return self._outputs
