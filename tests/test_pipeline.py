"""The ring and the hot loop in one process, with real ONNX Runtime engines, and the GPU path's
loop (CUDA slots, pinned ring) on the FAKE CUDA runtime with a stand-in GPU engine."""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Tuple

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from appliance import cuda
from appliance import pipeline as pipeline_module
from appliance.config import PipelineConfig
from appliance.engines import open_engine
from appliance.engines.base import Engine
from appliance.engines.manifest import PHASE
from appliance.gpu_inflight import CudaSlot
from appliance.ntndarray import FrameMeta
from appliance.pipeline import Pipeline, make_slots
from appliance.ring import FrameRing
from appliance.telemetry import LATENCY_IDLE_S, LatencyWindow, Telemetry

import fake_tensorrt
from fake_tensorrt.stand_in_engine import StreamEngine
from harness import fill
from onnx_models import affine_model


def meta(unique_id: int) -> FrameMeta:
    return FrameMeta(unique_id, (0, 0, 0), (0, 0, 0), (), None)


class Sink:
    """Collects results; lets a test await a number of them."""

    def __init__(self) -> None:
        self.results: List[Tuple[int, Dict[str, np.ndarray]]] = []
        self._changed = threading.Condition()

    def __call__(self, frame: FrameMeta, images: Dict[str, np.ndarray]) -> None:
        with self._changed:
            self.results.append((frame.unique_id, {k: v.copy() for k, v in images.items()}))
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> List[int]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.results) >= count, timeout), len(self.results)
            return [uid for uid, _ in self.results]


def push(ring: FrameRing, unique_id: int, value: float) -> None:
    index = ring.reserve()
    assert index is not None
    ring.frames[index] = value
    ring.commit(meta(unique_id), time.monotonic())


def make(tmp_path, model_kwargs=None, **config) -> Tuple[Pipeline, FrameRing, Sink, Telemetry]:
    model = affine_model(str(tmp_path / "m.onnx"), size=8, **(model_kwargs or {}))
    engine = open_engine(model, dynamic_batch=config.get("max_batch", 8))
    ring = FrameRing(config.pop("ring_capacity", 64), (8, 8), np.float32)
    telemetry = Telemetry(100)
    sink = Sink()
    pipeline = Pipeline(PipelineConfig(**config), ring, engine, sink, telemetry)
    return pipeline, ring, sink, telemetry


def test_ring_refuses_when_full_and_batches_stop_at_the_buffer_end():
    ring = FrameRing(5, (2, 2), np.uint16)
    for uid in range(1, 6):
        push(ring, uid, uid)
    assert ring.reserve() is None
    first = ring.take(3)
    assert [m.unique_id for m in first.metas] == [1, 2, 3] and first.frames[:, 0, 0].tolist() == [1, 2, 3]
    ring.release(first)
    push(ring, 6, 6)  # wraps to slot 0
    second = ring.take(8)
    assert [m.unique_id for m in second.metas] == [4, 5]  # contiguous up to the end of the buffer
    third = ring.take(8)
    assert [m.unique_id for m in third.metas] == [6] and third.start == 0
    with pytest.raises(RuntimeError, match="out of order"):
        ring.release(third)


def test_a_backlog_goes_out_in_full_batches_and_a_trickle_after_max_wait(tmp_path):
    pipeline, ring, sink, telemetry = make(tmp_path, max_batch=8, max_wait_ms=30)
    for uid in range(1, 21):
        push(ring, uid, uid)
    pipeline.start()
    assert sink.wait_for(20) == list(range(1, 21))
    assert telemetry.counters.batches == 3  # 8 + 8 + 4
    push(ring, 21, 21.0)
    push(ring, 22, 22.0)
    assert sink.wait_for(22)[-2:] == [21, 22]  # the partial batch ran without waiting for more frames
    # One batch of two, or two of one when this thread pushed 22 more than max_wait after 21 (a busy machine).
    assert telemetry.counters.batches in (4, 5)
    assert pipeline.stop(5)
    np.testing.assert_array_equal(sink.results[-1][1]["phase"], np.full((8, 8), 22.0, np.float32))


def test_stop_publishes_everything_received_first(tmp_path):
    pipeline, ring, sink, telemetry = make(tmp_path, max_batch=4, max_wait_ms=1000)
    pipeline.start()
    for uid in range(1, 51):
        push(ring, uid, uid)
    assert pipeline.stop(10)
    assert [uid for uid, _ in sink.results] == list(range(1, 51))
    assert ring.depth() == 0


def test_fixed_batch_models_are_padded_and_padding_is_not_published(tmp_path):
    pipeline, ring, sink, telemetry = make(tmp_path, model_kwargs={"batch": 8, "scale": 3.0}, max_batch=8, max_wait_ms=1)
    pipeline.start()
    for uid in range(1, 14):
        push(ring, uid, uid)
    assert sink.wait_for(13) == list(range(1, 14))
    assert pipeline.stop(5)
    assert len(sink.results) == 13
    assert [float(images["phase"][0, 0]) for _, images in sink.results] == [3.0 * uid for uid in range(1, 14)]


def _batch_one_only_model(path: str) -> str:
    """Runs for one frame, fails at run time for more (a Reshape to batch 1): a real engine fault."""
    shape = ["batch", 1, 8, 8]
    nodes = [helper.make_node("Reshape", ["input.1", "target"], ["94"])]
    target = helper.make_tensor("target", TensorProto.INT64, [4], [1, 1, 8, 8])
    graph = helper.make_graph(nodes, "fragile", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("94", TensorProto.FLOAT, shape)], [target])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_a_failing_batch_is_counted_and_the_next_one_runs(tmp_path):
    engine = open_engine(_batch_one_only_model(str(tmp_path / "fragile.onnx")))
    ring = FrameRing(16, (8, 8), np.float32)
    telemetry = Telemetry(100)
    sink = Sink()
    pipeline = Pipeline(PipelineConfig(max_batch=3, max_wait_ms=1), ring, engine, sink, telemetry)
    for uid in range(1, 4):
        push(ring, uid, uid)
    pipeline.start()  # frames 1..3 form a full batch at once, and it fails
    push(ring, 4, 4)  # alone in the next batch, which succeeds
    assert sink.wait_for(1) == [4]
    assert pipeline.stop(5)
    assert telemetry.counters.dropped["engine"] == 3
    assert "inference of 3 frames (uniqueId 1..3) on fragile.onnx: " in telemetry.recent_errors[-1]
    assert pipeline.failure() is None


def test_engine_swap_happens_between_batches_and_releases_the_old_engine(tmp_path):
    pipeline, ring, sink, telemetry = make(tmp_path, max_batch=4, max_wait_ms=1)
    old = pipeline.engine
    pipeline.start()
    for uid in range(1, 5):
        push(ring, uid, uid)
    assert sink.wait_for(4) == [1, 2, 3, 4]
    negate = open_engine(affine_model(str(tmp_path / "neg.onnx"), size=8, scale=-1.0))
    pipeline.swap_engine(negate)
    for uid in range(5, 9):
        push(ring, uid, uid)
    assert sink.wait_for(8) == list(range(1, 9))
    assert pipeline.stop(5)
    values = [float(images["phase"][0, 0]) for _, images in sink.results]
    assert values == [1, 2, 3, 4, -5, -6, -7, -8]
    assert pipeline.engine is negate
    assert old._session is None  # closed after its last batch


# -- the GPU path: CUDA slots on the FAKE CUDA runtime ------------------------------------------
def gpu_pipeline(engine: Engine, **config) -> Tuple[Pipeline, FrameRing, Sink, Telemetry]:
    ring = FrameRing(config.pop("ring_capacity", 16), engine.io.image_shape, np.float32, allocate=cuda.PinnedBuffer)
    telemetry = Telemetry(100)
    sink = Sink()
    return Pipeline(PipelineConfig(**config), ring, engine, sink, telemetry), ring, sink, telemetry


def phases(sink: Sink) -> List[float]:
    return [float(images[PHASE][0, 0]) for _, images in sink.results]


@pytest.mark.parametrize("integrated", [False, True], ids=["discrete", "integrated"])
def test_a_finished_batch_is_published_without_waiting_for_another_frame(monkeypatch, integrated):
    cudart = fake_tensorrt.install_cuda(monkeypatch, integrated=integrated)
    monkeypatch.setattr(pipeline_module, "_IDLE_TICK_S", 3600.0)  # a loop waiting for frames would sleep an hour
    engine = StreamEngine(cudart, compute_s=0.003)
    pipeline, ring, sink, telemetry = gpu_pipeline(engine, max_batch=4, max_wait_ms=1)
    pipeline.start()
    push(ring, 1, 5.0)  # a lone frame: no other ever comes
    assert sink.wait_for(1) == [1]
    assert phases(sink) == [11.0]
    assert ring.waiting() == 0 and ring.depth() == 0
    assert pipeline.stop(5)  # a stop ends the hour-long idle wait at once


def test_a_failed_launch_behind_a_batch_in_flight_is_dropped_in_order(monkeypatch):
    cudart = fake_tensorrt.install_cuda(monkeypatch)
    first_done = threading.Event()
    engine = StreamEngine(cudart, max_batch=2, gates={0: first_done}, refuse=(1,))
    pipeline, ring, sink, telemetry = gpu_pipeline(engine, max_batch=2, max_wait_ms=1, in_flight=2)
    for uid in range(1, 7):
        push(ring, uid, uid)
    pipeline.start()  # batch 1-2 computes; 3-4 fails to launch; 5-6 runs on the slot 3-4 did not get
    engine.wait_launched(3)
    first_done.set()
    assert sink.wait_for(4) == [1, 2, 5, 6]
    assert pipeline.stop(5)
    assert pipeline.failure() is None
    assert telemetry.counters.dropped["engine"] == 2
    assert "inference of 2 frames (uniqueId 3..4) on standin.engine: EngineError: stand-in: launch 1 refused" in (
        telemetry.recent_errors[-1])
    assert phases(sink) == [3.0, 5.0, 11.0, 13.0]
    assert ring.depth() == 0  # every slot came back, in order


def test_slots_are_capped_at_what_the_engine_runs_at_once(monkeypatch, caplog):
    cudart = fake_tensorrt.install_cuda(monkeypatch)
    engine = StreamEngine(cudart, max_in_flight=1)
    pipeline, ring, sink, telemetry = gpu_pipeline(engine, max_batch=4, max_wait_ms=1, in_flight=3)
    assert len(make_slots(engine, ring, 3)) == 1
    assert pipeline.in_flight_cap == "standin.engine runs at most 1 batches at once: pipeline.in_flight 3 capped to 1"
    assert pipeline.in_flight_cap in caplog.text
    pipeline.start()
    for uid in range(1, 10):
        push(ring, uid, uid)
    assert sink.wait_for(9) == list(range(1, 10))
    assert pipeline.stop(5)
    assert telemetry.counters.dropped["engine"] == 0
    unlimited = StreamEngine(cudart)
    assert len(make_slots(unlimited, ring, 3)) == 3
    assert gpu_pipeline(unlimited, in_flight=3)[0].in_flight_cap is None


def test_ingest_keeps_running_while_the_pipeline_waits_for_a_batch(monkeypatch):
    cudart = fake_tensorrt.install_cuda(monkeypatch)
    ingest_ran = threading.Event()  # the batch computes until ingest has stored frames meanwhile
    engine = StreamEngine(cudart, max_batch=1, gates={0: ingest_ran})
    pipeline, ring, sink, telemetry = gpu_pipeline(engine, max_batch=1, max_wait_ms=1, in_flight=1)
    stored_during_the_wait: List[int] = []

    def ingest() -> None:  # the pvAccess callback's work: reserve, write and commit ring slots
        engine.wait_launched(1)
        for uid in (2, 3, 4):
            push(ring, uid, uid)
            stored_during_the_wait.append(uid)
        ingest_ran.set()

    push(ring, 1, 1.0)
    thread = threading.Thread(target=ingest)
    pipeline.start()  # one slot: the pipeline launches frame 1, then waits for it
    thread.start()
    assert sink.wait_for(4) == [1, 2, 3, 4]
    thread.join()
    assert pipeline.stop(5)
    assert stored_during_the_wait == [2, 3, 4]
    assert telemetry.counters.dropped["engine"] == 0  # the wait for frame 1 ended with its result


def test_ring_slots_on_mapped_memory_start_on_256_byte_boundaries(monkeypatch):
    fake_tensorrt.install_cuda(monkeypatch, integrated=True)
    ring = FrameRing(8, (100, 100), np.float32, allocate=cuda.PinnedBuffer)  # 40000-byte frames
    assert ring.memory.device_ptr is not None
    for index in range(ring.capacity):
        host = ring.frames[index].ctypes.data
        device = ring.memory.device_ptr + (host - ring.memory.host_ptr)
        assert host % 256 == 0 and device % 256 == 0, index
    assert ring.frames[3].flags.c_contiguous  # ingest writes each slot as one image
    ring.close()
    packed = FrameRing(8, (100, 100), np.float32)  # plain memory: no engine reads it in place
    assert packed.frames.flags.c_contiguous  # a batch is one block, as ONNX Runtime reads it


@pytest.mark.parametrize("integrated", [False, True], ids=["discrete", "integrated"])
def test_a_batch_from_any_slot_of_an_aligned_ring_runs_correctly(monkeypatch, integrated):
    cudart = fake_tensorrt.install_cuda(monkeypatch, integrated=integrated)
    engine = StreamEngine(cudart, size=100, max_batch=5)
    ring = FrameRing(12, (100, 100), np.float32, allocate=cuda.PinnedBuffer)
    slot = CudaSlot(engine, ring)
    data = fill(ring, 10)
    before = ring.frames.copy()
    for start, size in ((0, 3), (3, 1), (4, 5)):  # batches starting at slots 0, 3 and 4
        batch = ring.take(size)
        assert batch.start == start and batch.frames.shape == (size, 100, 100)
        slot.launch(engine, batch)
        slot.wait()
        np.testing.assert_array_equal(engine.seen[-1], data[start : start + size])
        np.testing.assert_allclose(slot.outputs()[PHASE], data[start : start + size] * 2 + 1)
        ring.release(batch)
    np.testing.assert_array_equal(ring.frames, before)  # read in place or copied, never written
    slot.close()
    ring.close()
    assert cudart.live_allocations() == (0, 0)


def test_latency_figures_describe_recent_frames_and_are_withdrawn_when_idle():
    window = LatencyWindow(10)
    assert window.percentiles()["p99_ms"] is None  # nothing published yet
    window.add(0.002, time.monotonic())
    assert window.percentiles()["p99_ms"] == pytest.approx(2.0)
    window.add(0.003, time.monotonic() - LATENCY_IDLE_S - 1.0)  # the last frame was published long ago
    assert window.percentiles() == {"p50_ms": None, "p99_ms": None, "max_ms": None}
