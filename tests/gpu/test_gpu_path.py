"""The GPU path on a real CUDA device: pinned ring, mapped pointers, streams, events, overlap.

The engine is the NVRTC stand-in (standin_engine.py): a known elementwise
transform, so every result is checked exactly. Skipped without CUDA (see conftest).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from appliance import cuda
from appliance.engines.base import BatchSpec
from appliance.engines.manifest import AMPLITUDE, PHASE
from appliance.gpu_inflight import CudaSlot
from appliance.ring import FrameRing

from harness import fill as fill_ring
from standin_engine import NvrtcEngine

SIZE = 128


def pinned(mapped):
    return lambda nbytes: cuda.PinnedBuffer(nbytes, mapped=mapped)


def fill(ring, count, seed=0):
    return fill_ring(ring, count, seed, high=1000.0)


def device_to_numpy(ptr, shape, dtype=np.float32):
    out = np.empty(shape, dtype)
    stream = cuda.Stream()
    cuda.copy_device_to_host(out.ctypes.data, ptr, out.nbytes, stream)
    stream.synchronize()
    stream.close()
    return out


def test_device_and_module_layout(capsys):
    info = cuda.device_info()
    assert info.name and info.compute_capability >= (5, 0)
    with capsys.disabled():
        print("\n  device: {}; cuda-python layout: {}".format(info.describe(), cuda.runtime_layout()))


def test_pinned_and_device_memory_round_trip_on_a_stream():
    stream, done = cuda.Stream(), cuda.Event()
    source, target = cuda.PinnedBuffer(1 << 20, mapped=False), cuda.PinnedBuffer(1 << 20, mapped=False)
    device = cuda.DeviceBuffer(1 << 20)
    source.array[:] = np.arange(1 << 20) % 251
    cuda.copy_host_to_device(device.ptr, source.host_ptr, 1 << 20, stream)
    cuda.memset(device.ptr + (1 << 19), 3, 1 << 19, stream)
    cuda.copy_device_to_host(target.host_ptr, device.ptr, 1 << 20, stream)
    done.record(stream)
    done.synchronize()
    np.testing.assert_array_equal(target.array[: 1 << 19], source.array[: 1 << 19])
    assert (target.array[1 << 19 :] == 3).all()
    for resource in (source, target, device, done, stream):
        resource.close()


def test_event_query_answers_at_once_while_the_gpu_is_busy():
    engine = NvrtcEngine(size=16, batch=BatchSpec(False, 1), spin_us=50_000)
    buffers = [cuda.DeviceBuffer(16 * 16 * 4) for _ in range(3)]
    stream, done = cuda.Stream(), cuda.Event()
    engine.enqueue(buffers[0].ptr, {PHASE: buffers[1].ptr, AMPLITUDE: buffers[2].ptr}, 1, stream.handle)
    done.record(stream)
    started = time.perf_counter()
    busy = not done.query()
    asked_in = time.perf_counter() - started
    assert busy and asked_in < 0.005
    done.synchronize()
    assert done.query()


def test_mapped_pinned_memory_is_read_in_place():
    engine = NvrtcEngine(batch=BatchSpec(False, 4))
    frames = cuda.PinnedBuffer(4 * SIZE * SIZE * 4, mapped=True)
    assert frames.device_ptr is not None
    data = np.random.default_rng(1).normal(size=(4, SIZE, SIZE)).astype(np.float32)
    frames.array.view(np.float32)[:] = data.ravel()
    outputs = {role: cuda.DeviceBuffer(data.nbytes) for role in (PHASE, AMPLITUDE)}
    stream = cuda.Stream()
    engine.enqueue(frames.device_ptr, {r: b.ptr for r, b in outputs.items()}, 4, stream.handle)
    stream.synchronize()
    for role, values in engine.expected(data).items():
        np.testing.assert_allclose(device_to_numpy(outputs[role].ptr, data.shape), values, rtol=1e-6)


@pytest.mark.parametrize("size", [SIZE, 100], ids=["packed", "aligned-slots"])  # 100x100 float32: padded slots
@pytest.mark.parametrize("mapped", [False, True], ids=["h2d-copy", "zero-copy"])
@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
def test_slot_results_match_the_transform_exactly(mapped, fixed, size):
    ring = FrameRing(24, (size, size), np.float32, allocate=pinned(mapped))
    engine = NvrtcEngine(size=size, batch=BatchSpec(fixed, 8))
    slot = CudaSlot(engine, ring)
    data = fill(ring, 21)
    before = ring.frames.copy()
    for start, count in ((0, 8), (8, 8), (16, 5)):
        batch = ring.take(8)
        assert batch.size == count
        slot.launch(engine, batch)
        slot.wait()
        outputs = slot.outputs()
        for role, values in engine.expected(data[start : start + count]).items():
            assert outputs[role].shape == (count, size, size)
            np.testing.assert_allclose(outputs[role], values, rtol=1e-6)
        ring.release(batch)
    if fixed:  # the padded frames the engine saw were zeros
        padded = device_to_numpy(slot._outputs[PHASE].device.ptr, (8, size, size))[5:]
        assert (padded == engine.offset).all()
    np.testing.assert_array_equal(ring.frames, before)  # read in place or copied, never written
    slot.close()
    ring.close()


def test_fp16_frames():
    ring = FrameRing(8, (SIZE, SIZE), np.float16, allocate=cuda.PinnedBuffer)
    engine = NvrtcEngine(batch=BatchSpec(False, 8), dtype=np.float16)
    slot = CudaSlot(engine, ring)
    data = fill(ring, 6)
    slot.launch(engine, ring.take(8))
    slot.wait()
    np.testing.assert_allclose(slot.outputs()[PHASE], engine.expected(data)[PHASE], rtol=1e-6)
    slot.close()


def test_a_slot_follows_an_engine_swap():
    ring = FrameRing(16, (SIZE, SIZE), np.float32, allocate=cuda.PinnedBuffer)
    old, new = NvrtcEngine(batch=BatchSpec(False, 8)), NvrtcEngine(batch=BatchSpec(True, 4), scale=-1.0, offset=0.0)
    slot = CudaSlot(old, ring)
    data = fill(ring, 11)
    for engine, start, size in ((old, 0, 8), (new, 8, 3)):
        batch = ring.take(engine.io.batch.size)
        slot.launch(engine, batch)
        slot.wait()
        np.testing.assert_allclose(slot.outputs()[PHASE], engine.expected(data[start : start + size])[PHASE])
        ring.release(batch)
    slot.close()


def test_copy_in_of_the_next_batch_overlaps_compute_of_this_one(capsys):
    if cuda.device_info().integrated:
        pytest.skip("an integrated GPU reads the ring in place: there is no copy-in to overlap")
    engine = NvrtcEngine(batch=BatchSpec(False, 8), spin_us=3000)
    ring = FrameRing(32, (SIZE, SIZE), np.float32, allocate=cuda.PinnedBuffer)
    slots = [CudaSlot(engine, ring, timing=True) for _ in range(2)]
    data = fill(ring, 16)
    reference = cuda.Event(timing=True)
    reference.record(slots[0].stream)
    first, second = ring.take(8), ring.take(8)
    slots[0].launch(engine, first)
    slots[1].launch(engine, second)
    for slot in slots:
        slot.wait()
    a, b = (slot.stage_times_ms(reference) for slot in slots)
    with capsys.disabled():
        for name, times in (("batch k  ", a), ("batch k+1", b)):
            print("\n  {}: ".format(name) + ", ".join("{} {:.3f} ms".format(k, v) for k, v in times.items()), end="")
        print()
    assert b["copied_in"] < a["computed"]  # k+1 was on the device while k was still computing
    assert a["computed"] - a["copied_in"] > 2.0  # the spin really ran (3 ms asked)
    for slot, start in zip(slots, (0, 8)):
        np.testing.assert_allclose(slot.outputs()[PHASE], engine.expected(data[start : start + 8])[PHASE])
        slot.close()
