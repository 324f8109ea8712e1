"""The ring and the hot loop in one process, with real ONNX Runtime engines."""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Tuple

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from appliance.config import PipelineConfig
from appliance.engines import open_engine
from appliance.ntndarray import FrameMeta
from appliance.pipeline import Pipeline
from appliance.ring import FrameRing
from appliance.telemetry import Telemetry
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
