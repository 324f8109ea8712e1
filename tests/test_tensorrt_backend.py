"""The TensorRT backend, the CUDA in-flight slots and the engine builder, on the FAKE TensorRT.

``tests/fake_tensorrt`` stands in for TensorRT (8.5 and 10.x APIs) and for
cuda-python on machines without a GPU: work is queued on fake streams and only
runs when an event is waited on, device memory is not host-addressable,
engines only load on the version and GPU that built them, TensorRT keeps the
process's first logger, plugin layers need the plugins registered, and a
Jetson's DLA cores run fixed-batch plans built for them.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import queue
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from appliance import cuda
from appliance.config import EngineConfig, PipelineConfig
from appliance.engines import build as build_module
from appliance.engines import open_engine
from appliance.engines import tensorrt as tensorrt_backend
from appliance.engines.base import BatchSpec
from appliance.engines.build import BuildError, BuildOptions, add_arguments, build_engine, main
from appliance.engines.errors import EngineError
from appliance.engines.files import file_sha256
from appliance.engines.manifest import DlaPlan, load_manifest
from appliance.engines.tensorrt import TensorRtEngine, choose_backend
from appliance.gpu_inflight import CudaSlot
from appliance.hotswap import validate
from appliance.pipeline import Pipeline, make_slots
from appliance.ring import FrameRing
from appliance.telemetry import Telemetry

import fake_tensorrt
from harness import fill as fill_ring
from onnx_models import affine_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16
SCALES = {"phase": (2.0, 1.0), "amplitude": (0.5, 0.0)}


@pytest.fixture(params=["8.5.2.2", "10.3.0.26"])
def gpu(request, monkeypatch):
    cudart = fake_tensorrt.install_cuda(monkeypatch)
    return SimpleNamespace(cudart=cudart, trt=fake_tensorrt.install_tensorrt(monkeypatch, cudart, request.param))


@pytest.fixture
def xavier(monkeypatch):
    """A fake Jetson AGX Xavier: an integrated sm72 GPU and two DLA cores, TensorRT 8.5."""
    cudart = fake_tensorrt.install_cuda(monkeypatch, name="Xavier", integrated=True, compute=(7, 2))
    return SimpleNamespace(cudart=cudart, trt=fake_tensorrt.install_tensorrt(monkeypatch, cudart, dla_cores=2))


@pytest.fixture
def board(tmp_path, monkeypatch):
    """This machine's device tree names it a Jetson AGX Xavier (as /proc/device-tree/model does, NUL-terminated)."""
    name = "NVIDIA Jetson AGX Xavier Developer Kit"
    model = tmp_path / "device-tree-model"
    model.write_bytes(name.encode() + b"\0")
    monkeypatch.setattr(tensorrt_backend, "DEVICE_TREE_MODEL", str(model))
    return name


@pytest.fixture(params=[False, True], ids=["discrete", "integrated"])
def any_gpu(request, monkeypatch):
    cudart = fake_tensorrt.install_cuda(monkeypatch, integrated=request.param)
    return SimpleNamespace(cudart=cudart, trt=fake_tensorrt.install_tensorrt(monkeypatch, cudart), integrated=request.param)


def affine_engine(path, trt, batch=-1, dtype="FLOAT", profiles=2, low=1, high=8, outputs=("phase", "amplitude"),
                  size=SIZE, **kw):
    """A fake engine: output k = scale_k * input + offset_k, input (batch, 1, size, size)."""
    frame = (1, size, size)
    tensors = [("input.1", "INPUT", (batch,) + frame, dtype)]
    tensors += [(name, "OUTPUT", (batch,) + frame, "FLOAT") for name in outputs]
    shapes = {"input.1": ((low,) + frame, (high,) + frame, (high,) + frame)}
    op = {"kind": "affine", "outputs": {n: list(SCALES.get(n, (3.0, -1.0))) for n in outputs}}
    return fake_tensorrt.write_engine(str(path), trt, tensors, [shapes] * profiles if batch == -1 else [], op, **kw)


def expected(frames, role):
    scale, offset = SCALES[role]
    return frames.astype(np.float32) * scale + offset


def fill(ring, count, seed=0):
    return fill_ring(ring, count, seed, high=100.0)


# -- loading an engine ------------------------------------------------------------------------
def test_dynamic_batch_engine_is_read_from_the_file_and_runs_in_chunks(gpu, tmp_path):
    engine = open_engine(affine_engine(tmp_path / "m.engine", gpu.trt), dynamic_batch=6)
    assert isinstance(engine, TensorRtEngine) and engine.runs_on_gpu
    assert engine.io.batch == BatchSpec(fixed=False, size=6)  # the pipeline's limit, inside the profile's 8
    assert engine.io.input.frame_shape == (1, SIZE, SIZE) and engine.io.image_shape == (SIZE, SIZE)
    assert engine.io.input.dtype == np.float32
    assert {r: s.name for r, s in engine.io.outputs.items()} == {"phase": "phase", "amplitude": "amplitude"}
    frames = np.random.default_rng(1).normal(size=(11, SIZE, SIZE)).astype(np.float32)
    results = engine.run(frames)
    for role in SCALES:
        np.testing.assert_allclose(results[role], expected(frames, role), rtol=1e-6)
    executions = engine._engine.executions
    assert [batch for batch, _ in executions] == [6, 6, 6, 5]  # a warm-up per context (one per profile), then 11
    engine.close()
    assert gpu.cudart.live_allocations() == (0, 0)


def test_profile_maximum_caps_the_batch(gpu, tmp_path):
    engine = open_engine(affine_engine(tmp_path / "m.engine", gpu.trt, high=4), dynamic_batch=8)
    assert engine.io.batch == BatchSpec(fixed=False, size=4)


def test_profile_must_start_at_batch_one(gpu, tmp_path):
    with pytest.raises(EngineError, match="profile 0 starts at batch 2; expected 1"):
        open_engine(affine_engine(tmp_path / "m.engine", gpu.trt, low=2))


def test_fixed_batch_engine_pads_a_short_batch_with_zeros(gpu, tmp_path):
    engine = open_engine(affine_engine(tmp_path / "m.engine", gpu.trt, batch=8))
    assert engine.io.batch == BatchSpec(fixed=True, size=8)
    frames = np.full((3, SIZE, SIZE), 5.0, np.float32)
    results = engine.run(frames)
    assert results["phase"].shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(results["phase"], 11.0)
    batch, seen = engine._engine.executions[-1]
    assert batch == 8 and (seen[:3] == 5).all() and not seen[3:].any()


def test_fp16_input_engine(gpu, tmp_path):
    engine = open_engine(affine_engine(tmp_path / "m.engine", gpu.trt, dtype="HALF"))
    assert engine.io.input.dtype == np.float16
    frames = np.random.default_rng(2).uniform(0, 10, (4, SIZE, SIZE)).astype(np.float16)
    np.testing.assert_allclose(engine.run(frames)["phase"], expected(frames, "phase"), rtol=1e-3)


def test_outputs_without_a_role_need_a_manifest_and_still_get_memory(gpu, tmp_path):
    path = affine_engine(tmp_path / "m.engine", gpu.trt, outputs=("94", "95"))
    with pytest.raises(EngineError, match="cannot tell which of the outputs"):
        open_engine(path)
    with open(path + ".yaml", "w") as handle:
        yaml.safe_dump({"outputs": {"phase": "95"}}, handle)
    engine = open_engine(path)
    assert list(engine.io.outputs) == ["phase"]
    frames = np.ones((2, SIZE, SIZE), np.float32)
    np.testing.assert_allclose(engine.run(frames)["phase"], 2.0)  # "95" is 3x - 1


@pytest.mark.parametrize(
    "damage, reason",
    [
        ({"version": "8.6.1.6"}, "Version tag does not match"),
        ({"compute": "7.2"}, "incompatible device, expecting compute 8.6 got compute 7.2"),
        ("truncate", "truncated"),
        ("garbage", "Magic tag does not match"),
    ],
)
def test_an_engine_that_cannot_load_is_rejected_with_tensorrts_reason(gpu, tmp_path, damage, reason):
    path = str(tmp_path / "m.engine")
    if isinstance(damage, dict):
        affine_engine(path, gpu.trt, **damage)
    else:
        affine_engine(path, gpu.trt)
        data = open(path, "rb").read()
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2] if damage == "truncate" else b"\x00" * len(data))
    with pytest.raises(EngineError) as raised:
        open_engine(path)
    message = str(raised.value)
    assert path in message and reason in message and "rebuild it from the ONNX" in message


def test_tensorrt_before_8_5_is_refused(monkeypatch, tmp_path):
    cudart = fake_tensorrt.install_cuda(monkeypatch)
    fake_tensorrt.install_tensorrt(monkeypatch, cudart, "8.4.1.5")
    (tmp_path / "m.engine").write_bytes(b"x")
    with pytest.raises(EngineError, match=r"TensorRT 8\.4\.1\.5 is too old: .* 8\.5 or newer \(JetPack 5\.1\+\)"):
        open_engine(str(tmp_path / "m.engine"))


def test_without_tensorrt_or_cuda_the_reason_is_given(monkeypatch, tmp_path):
    (tmp_path / "m.engine").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineError, match="python3-libnvinfer"):
        open_engine(str(tmp_path / "m.engine"))
    fake_tensorrt.install_tensorrt(monkeypatch, fake_tensorrt.install_cuda(monkeypatch))
    fake_tensorrt.remove_cuda(monkeypatch)
    with pytest.raises(EngineError, match="need a CUDA device: cuda-python is not installed"):
        open_engine(str(tmp_path / "m.engine"))


# -- one TensorRT per process, and engines built elsewhere ----------------------------------
def test_each_rejection_has_tensorrts_reason_though_tensorrt_keeps_only_the_first_logger(gpu, tmp_path):
    good = open_engine(affine_engine(tmp_path / "good.engine", gpu.trt))
    old = affine_engine(tmp_path / "old.engine", gpu.trt, version="8.6.1.6")
    with pytest.raises(EngineError, match="Version tag does not match"):
        open_engine(old)
    good.close()
    del good
    gc.collect()  # the first engine loaded is gone: the logger TensorRT kept must not have gone with it
    with pytest.raises(EngineError, match="Version tag does not match"):
        open_engine(old)


def test_plugins_are_registered_once_per_process_before_an_engine_with_plugin_layers_loads(gpu, tmp_path):
    with_plugin = affine_engine(tmp_path / "p.engine", gpu.trt, plugins=["ScatterND_TRT"])
    engines = [open_engine(with_plugin) for _ in range(2)]
    build(tmp_path, affine_model(str(tmp_path / "m.onnx"), size=SIZE))
    np.testing.assert_allclose(engines[1].run(np.ones((1, SIZE, SIZE), np.float32))["phase"], 3.0)
    assert gpu.trt.counters["init_libnvinfer_plugins"] == 1


@pytest.mark.parametrize("key, built_for, reason", [
    ("device_model", "NVIDIA Jetson Xavier NX Developer Kit",
     r"device NVIDIA Jetson Xavier NX Developer Kit \(here: NVIDIA Jetson AGX Xavier Developer Kit\)"),
    ("tensorrt", "8.6.1.6", r"TensorRT 8\.6\.1\.6 \(here: {version}\)"),
    ("compute_capability", "7.2", r"compute capability 7\.2 \(here: 8\.6\)"),
], ids=["board", "tensorrt", "compute"])
def test_an_engine_whose_manifest_says_it_was_built_elsewhere_is_refused_before_deserializing(
        gpu, tmp_path, board, key, built_for, reason):
    path = affine_engine(tmp_path / "m.engine", gpu.trt)  # TensorRT itself would load it: the sm is the same
    here = {"tensorrt": gpu.trt.__version__, "compute_capability": "8.6", "device_model": board}
    with open(path + ".yaml", "w") as handle:
        yaml.safe_dump({"build": here}, handle)
    open_engine(path).close()
    with open(path + ".yaml", "w") as handle:
        yaml.safe_dump({"build": dict(here, **{key: built_for})}, handle)
    deserialized = gpu.trt.counters["deserialize_cuda_engine"]
    with pytest.raises(EngineError, match=reason.format(version=gpu.trt.__version__.replace(".", r"\."))) as raised:
        open_engine(path)
    assert "rebuild it from the ONNX here" in str(raised.value)
    assert gpu.trt.counters["deserialize_cuda_engine"] == deserialized


# -- serving contexts -----------------------------------------------------------------------
@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
def test_serving_contexts_are_ready_at_load_so_a_first_batch_creates_and_allocates_nothing(any_gpu, tmp_path, fixed):
    path = affine_engine(tmp_path / "m.engine", any_gpu.trt, batch=8 if fixed else -1,
                         outputs=("phase", "amplitude", "94"))  # "94" has no role: it needs scratch memory
    engine = open_engine(path)
    ring = FrameRing(16, (SIZE, SIZE), np.float32, allocate=cuda.PinnedBuffer)
    slots = [CudaSlot(engine, ring) for _ in range(2)]
    data = fill(ring, 8)
    contexts = any_gpu.trt.counters["create_execution_context"]
    allocations = any_gpu.cudart.calls["cudaMalloc"]
    for slot in slots:  # each on its own stream, used for the first time
        slot.launch(engine, ring.take(4))
    for slot in slots:
        slot.wait()
    assert any_gpu.trt.counters["create_execution_context"] == contexts
    assert any_gpu.cudart.calls["cudaMalloc"] == allocations
    for index, slot in enumerate(slots):
        np.testing.assert_allclose(slot.outputs()["phase"], expected(data[4 * index : 4 * index + 4], "phase"))


def test_max_in_flight_counts_the_serving_contexts(gpu, tmp_path):
    dynamic = affine_engine(tmp_path / "d.engine", gpu.trt, profiles=3)
    assert open_engine(dynamic, in_flight=3).max_in_flight == 3
    assert open_engine(dynamic, in_flight=2).max_in_flight == 2  # the pipeline's in_flight, not every profile
    assert open_engine(dynamic, in_flight=5).max_in_flight == 3  # no more than its profiles
    fixed = affine_engine(tmp_path / "f.engine", gpu.trt, batch=8)
    assert open_engine(fixed).max_in_flight == tensorrt_backend.GPU_CONTEXTS
    engine = TensorRtEngine(fixed, file_sha256(fixed), None, 8, gpu_contexts=3)
    assert engine.max_in_flight == 3 and engine.devices == ["GPU"] * 3
    streams = [cuda.Stream() for _ in range(4)]
    device_in = cuda.DeviceBuffer(8 * SIZE * SIZE * 4)
    outputs = {role: cuda.DeviceBuffer(8 * SIZE * SIZE * 4) for role in SCALES}
    for stream in streams[:3]:
        engine.enqueue(device_in.ptr, {r: b.ptr for r, b in outputs.items()}, 8, stream.handle)
    with pytest.raises(EngineError, match=r"all 3 execution contexts \(GPU, GPU, GPU\) are in use: lower "
                                          r"pipeline.in_flight to 3"):
        engine.enqueue(device_in.ptr, {r: b.ptr for r, b in outputs.items()}, 8, streams[3].handle)


# -- backend choice ------------------------------------------------------------------------------
def test_auto_backend_prefers_tensorrt_only_where_it_can_run(monkeypatch):
    assert choose_backend("onnxruntime") == ("onnxruntime", "engine.backend is onnxruntime in the configuration")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    backend, why = choose_backend("auto")
    assert backend == "onnxruntime" and "TensorRT's Python module does not import" in why
    cudart = fake_tensorrt.install_cuda(monkeypatch, count=0)
    fake_tensorrt.install_tensorrt(monkeypatch, cudart)
    backend, why = choose_backend("auto")
    assert backend == "onnxruntime" and "TensorRT 8.5.2.2 is installed but CUDA is not usable" in why
    fake_tensorrt.install_tensorrt(monkeypatch, fake_tensorrt.install_cuda(monkeypatch, name="Xavier"))
    assert choose_backend("auto") == ("tensorrt", "auto: TensorRT 8.5.2.2 on Xavier (compute capability 8.6, discrete)")
    with pytest.raises(ValueError, match="expected one of auto, onnxruntime, tensorrt"):
        choose_backend("cuda")


def test_backend_tensorrt_insists_and_onnxruntime_refuses_engine_files(monkeypatch, tmp_path):
    cudart = fake_tensorrt.install_cuda(monkeypatch, count=0)
    fake_tensorrt.install_tensorrt(monkeypatch, cudart)
    with pytest.raises(EngineError, match="engine.backend is tensorrt, but TensorRT 8.5.2.2 is installed but CUDA"):
        choose_backend("tensorrt")
    trt = fake_tensorrt.install_tensorrt(monkeypatch, fake_tensorrt.install_cuda(monkeypatch, name="Xavier"))
    assert choose_backend("tensorrt")[1].startswith("engine.backend is tensorrt: TensorRT 8.5.2.2 on Xavier")
    engine_file = affine_engine(tmp_path / "m.engine", trt)
    assert validate(engine_file, EngineConfig(backend="tensorrt"), 8, None).backend == "tensorrt"
    with pytest.raises(EngineError, match="m.engine: a TensorRT engine, but engine.backend is onnxruntime"):
        validate(engine_file, EngineConfig(backend="onnxruntime"), 8, None)


# -- in-flight slots ---------------------------------------------------------------------------
@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
def test_slot_runs_a_batch_from_the_pinned_ring(any_gpu, tmp_path, fixed):
    engine = open_engine(affine_engine(tmp_path / "m.engine", any_gpu.trt, batch=8 if fixed else -1))
    ring = FrameRing(16, (SIZE, SIZE), np.float32, allocate=cuda.PinnedBuffer)
    assert (ring.memory.device_ptr is not None) == any_gpu.integrated
    slot = CudaSlot(engine, ring)
    data = fill(ring, 10)
    before = ring.frames.copy()
    ring.take(3)  # earlier frames: the batch under test starts mid-ring
    batch = ring.take(5)
    copies = any_gpu.cudart.calls["cudaMemcpyAsync"]
    slot.launch(engine, batch)
    assert not slot.done()  # queued on the slot's stream, not run
    slot.wait()
    assert slot.done()
    outputs = slot.outputs()
    for role in SCALES:
        assert outputs[role].shape == (5, SIZE, SIZE)
        np.testing.assert_allclose(outputs[role], expected(data[3:8], role), rtol=1e-6)
    run_batch, seen = engine._engine.executions[-1]
    assert run_batch == (8 if fixed else 5)
    np.testing.assert_array_equal(seen[:5, 0], data[3:8])
    assert not seen[5:].any()  # padding is zeros
    np.testing.assert_array_equal(ring.frames, before)  # the ring is read, never written
    h2d = 0 if any_gpu.integrated else 1  # integrated: read in place through the mapped pointer
    assert any_gpu.cudart.calls["cudaMemcpyAsync"] - copies == h2d + 2  # + one D2H per output
    slot.close()
    engine.close()
    ring.close()
    assert any_gpu.cudart.live_allocations() == (0, 0)


def test_zero_copy_batches_of_odd_sized_frames_reach_tensorrt_on_256_byte_boundaries(monkeypatch, tmp_path):
    cudart = fake_tensorrt.install_cuda(monkeypatch, integrated=True)
    trt = fake_tensorrt.install_tensorrt(monkeypatch, cudart)  # refuses misaligned tensor addresses, as TensorRT may
    engine = open_engine(affine_engine(tmp_path / "m.engine", trt, size=10))  # 400-byte frames
    ring = FrameRing(8, (10, 10), np.float32, allocate=cuda.PinnedBuffer)
    slot = CudaSlot(engine, ring)
    data = fill(ring, 8)
    for start in range(8):  # a batch of one from every slot: each its own zero-copy address
        batch = ring.take(1)
        slot.launch(engine, batch)
        slot.wait()
        np.testing.assert_allclose(slot.outputs()["phase"], expected(data[start : start + 1], "phase"), rtol=1e-6)
        ring.release(batch)
    slot.close()
    engine.close()
    ring.close()


def test_fp16_ring_feeds_an_fp16_engine(any_gpu, tmp_path):
    engine = open_engine(affine_engine(tmp_path / "m.engine", any_gpu.trt, dtype="HALF"))
    ring = FrameRing(8, (SIZE, SIZE), np.float16, allocate=cuda.PinnedBuffer)
    slot = CudaSlot(engine, ring)
    data = fill(ring, 4)
    slot.launch(engine, ring.take(8))
    slot.wait()
    np.testing.assert_allclose(slot.outputs()["phase"], expected(data, "phase"), rtol=1e-3)


def test_a_ring_of_another_dtype_is_refused(any_gpu, tmp_path):
    engine = open_engine(affine_engine(tmp_path / "m.engine", any_gpu.trt, dtype="HALF"))
    ring = FrameRing(8, (SIZE, SIZE), np.float32, allocate=cuda.PinnedBuffer)
    with pytest.raises(EngineError, match="takes float16 frames 16x16; the ring holds float32 frames 16x16"):
        CudaSlot(engine, ring)


def test_slots_overlap_on_their_own_streams_and_profiles(gpu, tmp_path):
    engine = open_engine(affine_engine(tmp_path / "m.engine", gpu.trt, profiles=2))
    ring = FrameRing(16, (SIZE, SIZE), np.float32, allocate=cuda.PinnedBuffer)
    slots = make_slots(engine, ring, 2)
    assert [type(s) for s in slots] == [CudaSlot, CudaSlot]
    data = fill(ring, 12)
    first, second = ring.take(8), ring.take(4)
    slots[0].launch(engine, first)
    slots[1].launch(engine, second)  # while the first is still queued
    assert not slots[0].done() and not slots[1].done()
    slots[1].wait()
    slots[0].wait()
    np.testing.assert_allclose(slots[0].outputs()["phase"], expected(data[:8], "phase"), rtol=1e-6)
    np.testing.assert_allclose(slots[1].outputs()["phase"], expected(data[8:], "phase"), rtol=1e-6)
    assert engine._engine.profiles_in_use == {0, 1}
    third = CudaSlot(engine, ring)
    fill(ring, 1)
    with pytest.raises(EngineError, match="all 2 optimization profiles are in use.*--profiles N"):
        third.launch(engine, ring.take(1))


def test_a_slot_reused_for_another_engine_takes_its_shapes(any_gpu, tmp_path):
    small = open_engine(affine_engine(tmp_path / "a.engine", any_gpu.trt, high=2))
    fixed = open_engine(affine_engine(tmp_path / "b.engine", any_gpu.trt, batch=4))
    ring = FrameRing(8, (SIZE, SIZE), np.float32, allocate=cuda.PinnedBuffer)
    slot = CudaSlot(small, ring)
    data = fill(ring, 3)
    with pytest.raises(EngineError, match="batch of 3 exceeds the engine's dynamic batch up to 2"):
        slot.launch(small, ring.take(3))
    ring2 = FrameRing(8, (SIZE, SIZE), np.float32, allocate=cuda.PinnedBuffer)
    slot2 = CudaSlot(small, ring2)
    data = fill(ring2, 3)
    slot2.launch(fixed, ring2.take(3))
    slot2.wait()
    np.testing.assert_allclose(slot2.outputs()["amplitude"], expected(data, "amplitude"), rtol=1e-6)


# -- building engines ---------------------------------------------------------------------------
def build(tmp_path, onnx, **options):
    return build_engine(BuildOptions(onnx=str(onnx), output=str(tmp_path / "out" / "m.engine"), **options), say=lambda _: None)


def test_fp16_build_writes_an_engine_that_loads_with_its_manifest(gpu, tmp_path):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE, scale=2.0, offset=1.0, amplitude_name="amp")
    with open(onnx + ".yaml", "w") as handle:
        yaml.safe_dump({"description": "test model", "pixel_size_m": 1e-8}, handle)
    path = build(tmp_path, onnx, max_batch=8, opt_batch=4, profiles=3)
    assert sorted(os.listdir(os.path.dirname(path))) == ["m.engine", "m.engine.yaml"]
    manifest = load_manifest(path)
    assert manifest.description == "test model" and manifest.pixel_size_m == 1e-8
    assert manifest.build["tensorrt"] == gpu.trt.__version__
    assert manifest.build["gpu"] == "Fake GPU" and manifest.build["compute_capability"] == "8.6"
    assert manifest.build["precision"] == "fp16"
    assert manifest.build["batch"] == "dynamic 1..8 (opt 4), 3 profile(s)"
    engine = open_engine(path, dynamic_batch=8)  # checks the manifest's sha256 too
    assert engine.io.batch == BatchSpec(False, 8)
    assert engine._engine.num_optimization_profiles == 3
    assert engine._engine.description["precision"] == ["FP16"]
    frames = np.random.default_rng(3).normal(size=(5, SIZE, SIZE)).astype(np.float32)
    results = engine.run(frames)
    np.testing.assert_allclose(results["phase"], frames * 2 + 1, rtol=1e-5)
    np.testing.assert_allclose(results["amplitude"], frames * 0.5, rtol=1e-5)


def test_a_build_takes_only_the_content_it_was_asked_for(gpu, tmp_path):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE)
    expected = file_sha256(onnx)
    affine_model(onnx, size=SIZE, scale=3.0)  # replaced after it was validated, before the build read it
    with pytest.raises(BuildError, match=r"m.onnx changed before it could be built \(sha256 [0-9a-f]{64}, expected "
                                         + expected):
        build(tmp_path, onnx, expect_sha256=expected)
    path = build(tmp_path, onnx, expect_sha256=file_sha256(onnx))
    assert load_manifest(path).build["source"] == "m.onnx sha256 " + file_sha256(onnx)


def test_fixed_batch_model_and_fp16_input(gpu, tmp_path):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE, batch=4)
    engine = open_engine(build(tmp_path, onnx, input_dtype="float16"))
    assert engine.io.batch == BatchSpec(True, 4)
    assert engine.io.input.dtype == np.float16


@pytest.mark.parametrize("suffix", [".npy", ".h5"])
def test_int8_is_calibrated_on_preprocessed_frames_and_cached(gpu, tmp_path, suffix):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE)
    raw = np.random.default_rng(4).integers(0, 1000, (40, 2 * SIZE + 4, 2 * SIZE + 4)).astype(np.uint16)
    raw[:, 2:-2, 2:-2] = 7  # the crop leaves a flat 7, so amax proves the preprocessing was applied
    frames = str(tmp_path / ("frames" + suffix))
    if suffix == ".npy":
        np.save(frames, raw)
    else:
        h5py = pytest.importorskip("h5py")
        with h5py.File(frames, "w") as handle:
            handle["/entry/data/data"] = raw
    path = build(tmp_path, onnx, precision="int8", calibration=frames, calibration_frames=32, crop=(2, 2, 2, 2), bin=2)
    log = gpu.trt.calibration_log
    assert log[-1] == {"amax": 7.0, "batches": 4, "batch_size": 8, "from_cache": False}
    manifest = load_manifest(path)
    assert manifest.build["int8_scales"] == "4 batches of frames" + suffix
    assert manifest.preprocess.crop == (2, 2, 2, 2) and manifest.preprocess.bin == 2
    assert os.path.isfile(path + ".calib")
    os.remove(path)
    build(tmp_path, onnx, precision="int8")  # no frames: the cache has the scales
    assert log[-1] == {"from_cache": True}
    assert load_manifest(path).build["int8_scales"] == "calibration cache {}.calib".format(path)


def test_int8_needs_frames_a_cache_or_qdq_nodes(gpu, tmp_path):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE)
    with pytest.raises(BuildError, match="INT8 needs scales: give --calibration frames"):
        build(tmp_path, onnx, precision="int8")
    qdq = _qdq_model(str(tmp_path / "q.onnx"))
    engine = open_engine(build(tmp_path, qdq, precision="int8"))
    assert engine._engine.description["quantized"] is True
    assert load_manifest(engine.path).build["int8_scales"] == "Q/DQ nodes in the model"


def test_an_int8_calibration_cache_serves_only_the_model_and_frames_it_was_made_from(gpu, tmp_path):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE)
    first, second = str(tmp_path / "first.npy"), str(tmp_path / "second.npy")
    np.save(first, np.full((16, SIZE, SIZE), 7, np.uint16))
    np.save(second, np.full((16, SIZE, SIZE), 9, np.uint16))
    log = gpu.trt.calibration_log
    build(tmp_path, onnx, precision="int8", calibration=first)
    assert log[-1]["amax"] == 7.0 and not log[-1]["from_cache"]
    build(tmp_path, onnx, precision="int8", calibration=first)
    assert log[-1] == {"from_cache": True}  # the same model and frames: the cache has their scales
    build(tmp_path, onnx, precision="int8", calibration=second)
    assert log[-1]["amax"] == 9.0 and not log[-1]["from_cache"]  # new frames are calibrated on
    build(tmp_path, onnx, precision="int8")
    assert log[-1] == {"from_cache": True}
    affine_model(onnx, size=SIZE, scale=3.0)  # retrained: other activations, other scales
    with pytest.raises(BuildError, match=r"the calibration cache .*m\.engine\.calib holds scales for model sha256 "
                                         r"[0-9a-f]{64}, not for .*m\.onnx \(sha256 [0-9a-f]{64}\): give "
                                         r"--calibration frames"):
        build(tmp_path, onnx, precision="int8")


def test_int8_calibration_feeds_the_frames_in_the_engines_input_dtype(gpu, tmp_path):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE)
    raw = np.random.default_rng(5).integers(0, 1000, (16, SIZE, SIZE)).astype(np.uint16)
    np.save(str(tmp_path / "f.npy"), raw)
    build(tmp_path, onnx, precision="int8", input_dtype="float16", calibration=str(tmp_path / "f.npy"))
    assert gpu.trt.calibration_log[-1]["amax"] == float(raw.max())


def test_a_failure_inside_calibration_fails_the_build_though_tensorrt_swallows_it(gpu, tmp_path, monkeypatch):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE)
    np.save(str(tmp_path / "f.npy"), np.ones((32, SIZE, SIZE), np.uint16))
    copy, copies = cuda.copy_host_to_device, itertools.count()

    def second_copy_fails(*args):
        if next(copies) == 1:
            raise cuda.CudaError("cudaMemcpyAsync(host->device, 8192 bytes): cudaErrorIllegalAddress (injected)")
        return copy(*args)

    monkeypatch.setattr(cuda, "copy_host_to_device", second_copy_fails)
    with pytest.raises(BuildError, match=r"INT8 calibration failed reading batch 2 of .*f\.npy: CudaError: "
                                         r"cudaMemcpyAsync.*\(injected\); no engine was written"):
        build(tmp_path, onnx, precision="int8", calibration=str(tmp_path / "f.npy"))
    assert not os.path.exists(str(tmp_path / "out" / "m.engine"))


def test_calibration_frames_must_preprocess_to_the_model_input(gpu, tmp_path):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE)
    np.save(str(tmp_path / "f.npy"), np.zeros((16, 20, 20), np.uint16))
    with pytest.raises(BuildError, match=r"frames 20x20 preprocess \(crop \[0, 0, 0, 0\], bin 1\) to 20x20, but the model takes 16x16"):
        build(tmp_path, onnx, precision="int8", calibration=str(tmp_path / "f.npy"))


def test_golden_files_stay_reachable_from_the_engine(gpu, tmp_path):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE)
    with open(onnx + ".yaml", "w") as handle:
        yaml.safe_dump({"golden": {"input": "g_in.npy", "phase": "g_phase.npy"}}, handle)
    manifest = load_manifest(build(tmp_path, onnx))
    assert manifest.golden.input == os.path.join("..", "g_in.npy")
    assert manifest.golden.phase == os.path.join("..", "g_phase.npy")


def test_command_line(gpu, tmp_path, capsys):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args([onnx, "--max-batch", "4"])) == 0
    assert os.path.isfile(str(tmp_path / "m.engine")) and "wrote" in capsys.readouterr().out
    assert main(parser.parse_args([onnx, "--max-batch", "4", "--opt-batch", "5"])) == 1
    assert "need 1 <= opt (5) <= max (4)" in capsys.readouterr().err


def test_a_tensorrt_10_build_reports_its_phases_and_steps(monkeypatch, tmp_path):
    trt = fake_tensorrt.install_tensorrt(monkeypatch, fake_tensorrt.install_cuda(monkeypatch), "10.3.0.26")
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE)
    said = []
    build_engine(BuildOptions(onnx=onnx, output=str(tmp_path / "m.engine")), say=said.append)
    steps = [line for line in said if line.startswith("Building engine")]
    assert steps == ["Building engine: 2 steps", "Building engine: step 1 of 2 done", "Building engine: step 2 of 2 done"]
    assert not any("Tactic selection" in line for line in said)  # nested phases: too many lines
    assert trt.__version__ == "10.3.0.26"


def test_a_tensorrt_8_5_build_says_it_is_still_going_until_it_ends(monkeypatch, tmp_path):
    fake_tensorrt.install_tensorrt(monkeypatch, fake_tensorrt.install_cuda(monkeypatch), "8.5.2.2")
    monkeypatch.setattr(build_module, "STILL_BUILDING_EVERY_S", 0.01)
    gate = tmp_path / "let-the-build-finish"
    monkeypatch.setenv(fake_tensorrt.BUILD_GATE_VARIABLE, str(gate))
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE)
    said = queue.Queue()
    builder = threading.Thread(target=build_engine, args=(BuildOptions(onnx=onnx, output=str(tmp_path / "m.engine")),),
                               kwargs={"say": said.put})
    builder.start()
    while not said.get(timeout=60).startswith("still building ("):  # the build is held at the gate meanwhile
        pass
    gate.touch()
    builder.join(60)
    assert not builder.is_alive() and os.path.exists(tmp_path / "m.engine")


def test_build_script_is_a_thin_wrapper():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_engine.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--calibration" in result.stdout and "--profiles" in result.stdout


# -- a Jetson's DLA cores -------------------------------------------------------------------
def test_build_engine_with_a_dla_core_writes_the_dla_plan_beside_the_gpu_engine(xavier, tmp_path, board):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE, batch=8, scale=2.0, offset=1.0)
    path = build(tmp_path, onnx, dla_core=1, gpu_fallback=True)
    assert sorted(os.listdir(os.path.dirname(path))) == ["m.engine", "m.engine.dla", "m.engine.yaml"]
    manifest = load_manifest(path)
    assert manifest.dla == DlaPlan("m.engine.dla", file_sha256(path + ".dla"), core=1, gpu_fallback=True)
    assert manifest.build["device_model"] == board and manifest.build["compute_capability"] == "7.2"
    engine = TensorRtEngine(path, file_sha256(path), manifest, 8, dla_cores=(1,))
    plan = engine._dla_engines[1]
    assert plan.dla_core == 1 and plan.description["dla_core"] == 1 and plan.description["gpu_fallback"] is True
    assert plan.description["precision"] == ["FP16", "GPU_FALLBACK"]
    assert "dla_core" not in engine._engine.description  # the engine itself is the GPU's


def test_a_fixed_batch_model_serves_on_the_gpu_and_both_dla_cores_at_once(xavier, tmp_path):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE, batch=8, scale=2.0, offset=1.0)
    path = build(tmp_path, onnx, dla_core=0)
    engine = TensorRtEngine(path, file_sha256(path), load_manifest(path), 8, dla_cores=(0, 1))
    assert engine.max_in_flight == 4 and engine.devices == ["GPU", "GPU", "DLA 0", "DLA 1"]
    assert {core: plan.dla_core for core, plan in engine._dla_engines.items()} == {0: 0, 1: 1}
    assert engine.describe().endswith("; on GPU, GPU, DLA 0, DLA 1")
    ring = FrameRing(32, (SIZE, SIZE), np.float32, allocate=cuda.PinnedBuffer)
    slots = make_slots(engine, ring, 4)
    data = fill(ring, 32)
    for slot in slots:
        slot.launch(engine, ring.take(8))
    for slot in slots:
        slot.wait()
    for index, slot in enumerate(slots):
        np.testing.assert_allclose(slot.outputs()["phase"], data[8 * index : 8 * index + 8] * 2 + 1, rtol=1e-6)
    plans = [engine._engine] + [engine._dla_engines[core] for core in (0, 1)]
    assert [len(plan.executions) for plan in plans] == [2 + 2, 1 + 1, 1 + 1]  # warm-ups at load, then a batch each


def test_engine_dla_cores_in_the_config_give_the_pipeline_a_slot_per_context(xavier, tmp_path, caplog):
    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE, batch=8, scale=2.0, offset=1.0)
    path = build(tmp_path, onnx, dla_core=0)
    engine = validate(path, EngineConfig(directory=str(tmp_path), dla_cores=(0, 1)), 8, None, in_flight=2)
    assert engine.devices == ["GPU", "GPU", "DLA 0", "DLA 1"]
    ring = FrameRing(64, (SIZE, SIZE), np.float32, allocate=cuda.PinnedBuffer)
    published = {}
    done = threading.Event()

    def sink(meta, images):
        published[meta.unique_id] = images["phase"].copy()
        if len(published) == 64:
            done.set()

    caplog.set_level(logging.INFO)
    pipeline = Pipeline(PipelineConfig(max_batch=8, in_flight=2), ring, engine, sink, Telemetry(100))
    assert "m.engine runs 4 batches at once (pipeline.in_flight 2 and its DLA cores)" in caplog.text
    slots = make_slots(engine, ring, 2)
    assert len(slots) == 4
    for slot in slots:
        slot.close()
    pipeline.start()
    data = fill(ring, 64)
    assert done.wait(60) and pipeline.stop(10)
    for index, image in enumerate(data):
        np.testing.assert_allclose(published[index], image * 2 + 1, rtol=1e-6)


def test_dla_cores_the_device_lacks_and_a_changed_dla_plan_are_refused_with_the_reason(xavier, tmp_path):
    path = build(tmp_path, affine_model(str(tmp_path / "m.onnx"), size=SIZE, batch=8), dla_core=0)
    manifest = load_manifest(path)
    with pytest.raises(EngineError, match=r"engine.dla_cores has DLA core 2, but this device has 2 DLA core\(s\)"):
        TensorRtEngine(path, file_sha256(path), manifest, 8, dla_cores=(0, 2))
    with open(path + ".dla", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(EngineError, match=r"its DLA plan .*m\.engine\.dla has sha256 [0-9a-f]{64} but the manifest "
                                          r"says " + manifest.dla.sha256):
        TensorRtEngine(path, file_sha256(path), manifest, 8, dla_cores=(0,))
    assert xavier.cudart.live_allocations() == (0, 0)


def test_an_engine_without_a_dla_plan_serves_on_the_gpu_alone_and_says_so(xavier, tmp_path, caplog):
    path = build(tmp_path, affine_model(str(tmp_path / "m.onnx"), size=SIZE, batch=8))
    with caplog.at_level(logging.WARNING):
        engine = TensorRtEngine(path, file_sha256(path), load_manifest(path), 8, dla_cores=(0, 1))
    assert engine.devices == ["GPU", "GPU"]
    assert "m.engine has no DLA plan (build it with build-engine --dla-core N)" in caplog.text


@pytest.mark.parametrize("batch, options, message", [
    ("batch", {"dla_core": 0}, "dynamic batch axis; a DLA core runs a fixed batch only"),
    (8, {"dla_core": 2}, r"--dla-core 2: this device has 2 DLA core\(s\) \(0\.\.1\)"),
    (8, {"dla_core": 0, "precision": "fp32"}, "precision fp32 on a DLA core; the DLA runs fp16 or int8"),
    (8, {"gpu_fallback": True}, "--gpu-fallback without --dla-core"),
], ids=["dynamic", "no-such-core", "fp32", "fallback-alone"])
def test_dla_builds_that_cannot_work_are_refused_before_building(xavier, tmp_path, batch, options, message):
    with pytest.raises(BuildError, match=message):
        build(tmp_path, affine_model(str(tmp_path / "m.onnx"), size=SIZE, batch=batch), **options)


def test_layers_the_dla_cannot_run_need_gpu_fallback(xavier, tmp_path):
    from onnx import TensorProto

    onnx = affine_model(str(tmp_path / "m.onnx"), size=SIZE, batch=8, input_type=TensorProto.FLOAT16)  # a Cast
    with pytest.raises(BuildError, match="is not supported on DLA and GPU fallback is not enabled"):
        build(tmp_path, onnx, dla_core=0)
    assert load_manifest(build(tmp_path, onnx, dla_core=0, gpu_fallback=True)).dla.gpu_fallback


def _qdq_model(path):
    import onnx
    from onnx import TensorProto, helper

    shape = ["batch", 1, SIZE, SIZE]
    nodes = [
        helper.make_node("QuantizeLinear", ["input.1", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["94"]),
    ]
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("94", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path

