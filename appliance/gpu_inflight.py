"""A batch in flight on the GPU: one stream, one completion event, buffers of its own.

The frames of a batch are consecutive slots of the ring's one pinned buffer, so
getting them to the engine is a single step: on an integrated GPU (Jetson) the
engine reads them through the mapped device pointer with no copy at all; on a
discrete GPU one ``cudaMemcpyAsync`` moves the whole batch. Outputs come back
into pinned host memory on the same stream, and an event recorded after them
tells the pipeline, without blocking, when the batch is done. Each slot has its
own stream, so while one slot computes, the next one's copy-in already runs.

Where the ring's slots are padded to TensorRT's 256-byte alignment (mapped
memory, frames whose size is not a multiple of 256 bytes), a batch of several
frames is not one dense block: it is packed into the slot's staging buffer by
one host copy, as a short batch for a fixed-batch engine is.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from appliance import cuda
from appliance.engines.base import Engine
from appliance.engines.errors import EngineError
from appliance.inflight import InflightSlot
from appliance.ring import Batch, FrameRing

# Stage marks recorded when a slot is made with ``timing=True``, in stream order.
STAGES = ("start", "copied_in", "computed", "copied_out")


class _Output:
    """One output role's device buffer and its pinned host twin."""

    def __init__(self, frames: int, frame_shape: tuple, dtype: np.dtype) -> None:
        self.frame_nbytes = int(np.prod(frame_shape)) * dtype.itemsize
        self.device = cuda.DeviceBuffer(frames * self.frame_nbytes)
        self.host = cuda.PinnedBuffer(frames * self.frame_nbytes, mapped=False)
        self.images = self.host.array.view(dtype).reshape((frames,) + tuple(frame_shape))

    def close(self) -> None:
        self.images = None
        self.device.close()
        self.host.close()


class CudaSlot(InflightSlot):
    poll_s = cuda.POLL_S

    def __init__(self, engine: Engine, ring: FrameRing, timing: bool = False) -> None:
        super().__init__()
        self._ring = ring
        self._zero_copy = ring.memory.device_ptr is not None
        self._stream = cuda.Stream()
        self._done = cuda.Event()
        self.marks: Dict[str, cuda.Event] = {stage: cuda.Event(timing=True) for stage in STAGES} if timing else {}
        self._buffers_for: Optional[Engine] = None
        self._input: Optional[cuda.DeviceBuffer] = None  # discrete GPU: where the batch is copied to
        self._staging: Optional[cuda.PinnedBuffer] = None  # zero-copy: a batch packed or padded for the engine
        self._staged: Optional[np.ndarray] = None  # (frames, H, W) view of the staging buffer
        self._outputs: Dict[str, _Output] = {}
        self._size = 0
        self._allocate(engine)

    @property
    def stream(self) -> cuda.Stream:
        return self._stream

    def _allocate(self, engine: Engine) -> None:
        """Buffers sized for ``engine``'s largest batch; done once per engine, never per batch."""
        self._check_fits(engine)
        self._release_buffers()
        io = engine.io
        capacity_nbytes = io.batch.size * self._ring.frame_nbytes
        if not self._zero_copy:
            self._input = cuda.DeviceBuffer(capacity_nbytes)
        elif io.batch.fixed or self._ring.slot_nbytes != self._ring.frame_nbytes:
            self._staging = cuda.PinnedBuffer(capacity_nbytes, mapped=True)
            self._staging.array[:] = 0
            self._staged = self._staging.array.view(self._ring.dtype).reshape(
                (io.batch.size,) + tuple(self._ring.frame_shape))
        for role in io.outputs:
            self._outputs[role] = _Output(io.batch.size, io.output_image_shape(role), np.dtype(io.outputs[role].dtype))
        self._buffers_for = engine

    def _check_fits(self, engine: Engine) -> None:
        io, ring = engine.io, self._ring
        if np.dtype(io.input.dtype) != ring.dtype or io.image_shape != tuple(ring.frame_shape):
            raise EngineError(
                "{}: takes {} frames {}x{}; the ring holds {} frames {}x{}".format(
                    engine.name, np.dtype(io.input.dtype).name, io.image_shape[0], io.image_shape[1],
                    ring.dtype.name, ring.frame_shape[0], ring.frame_shape[1],
                )
            )

    def launch(self, engine: Engine, batch: Batch) -> None:
        if engine is not self._buffers_for:
            self._allocate(engine)
        spec = engine.io.batch
        if batch.size > spec.size:
            raise EngineError(
                "{}: batch of {} exceeds the engine's {}".format(engine.name, batch.size, spec.describe())
            )
        self.engine, self.batch, self._size = engine, batch, batch.size
        run_size = spec.size if spec.fixed else batch.size
        self._mark("start")
        input_ptr = self._stage_input(batch, run_size)
        self._mark("copied_in")
        output_ptrs = {role: out.device.ptr for role, out in self._outputs.items()}
        engine.enqueue(input_ptr, output_ptrs, run_size, self._stream.handle)
        self._mark("computed")
        for out in self._outputs.values():
            cuda.copy_device_to_host(out.host.host_ptr, out.device.ptr, batch.size * out.frame_nbytes, self._stream)
        self._mark("copied_out")
        self._done.record(self._stream)

    def _stage_input(self, batch: Batch, run_size: int) -> int:
        """The device address of the batch as one dense block, zero-padded to ``run_size`` frames."""
        ring = self._ring
        offset = batch.start * ring.slot_nbytes
        nbytes = batch.size * ring.frame_nbytes
        padding = (run_size - batch.size) * ring.frame_nbytes
        if not self._zero_copy:  # an unmapped ring is packed: the batch is one block
            assert self._input is not None
            cuda.copy_host_to_device(self._input.ptr, ring.memory.host_ptr + offset, nbytes, self._stream)
            if padding:
                cuda.memset(self._input.ptr + nbytes, 0, padding, self._stream)
            return self._input.ptr
        if not padding and ring.is_dense(batch):
            return ring.memory.device_ptr + offset
        # Frames apart in the ring (aligned slots) or a short batch for a fixed-batch engine (the
        # frames after it are not ours to zero): the batch goes to the staging buffer, a host copy.
        assert self._staging is not None and self._staging.device_ptr is not None and self._staged is not None
        self._staged[: batch.size] = batch.frames
        self._staged[batch.size : run_size] = 0
        return self._staging.device_ptr

    def _mark(self, stage: str) -> None:
        event = self.marks.get(stage)
        if event is not None:
            event.record(self._stream)

    def done(self) -> bool:
        return self._done.query()

    def wait(self) -> None:
        self._done.synchronize(self.poll_s)

    def outputs(self) -> Dict[str, np.ndarray]:
        return {role: out.images[: self._size] for role, out in self._outputs.items()}

    def stage_times_ms(self, reference: cuda.Event) -> Dict[str, float]:
        """When each stage of the last batch ended, in ms after ``reference`` (a completed timing event)."""
        return {stage: event.elapsed_ms(reference) for stage, event in self.marks.items()}

    def _release_buffers(self) -> None:
        self._staged = None  # the view goes before the memory under it
        for buffer in [self._input, self._staging] + [o for o in self._outputs.values()]:
            if buffer is not None:
                buffer.close()
        self._input, self._staging, self._outputs = None, None, {}

    def close(self) -> None:
        """Wait for the batch in flight, then free the slot's memory, stream and events."""
        if self._stream.native is None:
            return
        self.wait()
        self._release_buffers()
        events: List[cuda.Event] = [self._done] + list(self.marks.values())
        for event in events:
            event.close()
        self._stream.close()
