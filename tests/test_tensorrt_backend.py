"""The TensorRT backend, the CUDA in-flight slots and the engine builder, on the FAKE TensorRT.

``tests/fake_tensorrt`` stands in for TensorRT (8.5 and 10.x APIs) and for
cuda-python on machines without a GPU: work is queued on fake streams and only
runs when an event is waited on, device memory is not host-addressable, and
engines only load on the version and GPU that built them.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

import fake_tensorrt
from appliance import cuda
from appliance.config import EngineConfig
from appliance.engines import open_engine
from appliance.engines.base import BatchSpec, EngineError, file_sha256
from appliance.engines.build import BuildError, BuildOptions, add_arguments, build_engine, main
from appliance.engines.manifest import load_manifest
from appliance.engines.tensorrt import TensorRtEngine, choose_backend
from appliance.hotswap import validate
from appliance.gpu_inflight import CudaSlot
from appliance.inflight import make_slots
from appliance.ring import FrameRing
from onnx_models import affine_model
from harness import fill as fill_ring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16
SCALES = {"phase": (2.0, 1.0), "amplitude": (0.5, 0.0)}


@pytest.fixture(params=["8.5.2.2", "10.3.0.26"])
def gpu(request, monkeypatch):
    cudart = fake_tensorrt.install_cuda(monkeypatch)
    return SimpleNamespace(cudart=cudart, trt=fake_tensorrt.install_tensorrt(monkeypatch, cudart, request.param))


@pytest.fixture(params=[False, True], ids=["discrete", "integrated"])
def any_gpu(request, monkeypatch):
    cudart = fake_tensorrt.install_cuda(monkeypatch, integrated=request.param)
    return SimpleNamespace(cudart=cudart, trt=fake_tensorrt.install_tensorrt(monkeypatch, cudart), integrated=request.param)


def affine_engine(path, trt, batch=-1, dtype="FLOAT", profiles=2, low=1, high=8, outputs=("phase", "amplitude"), **kw):
    """A fake engine: output k = scale_k * input + offset_k, input (batch, 1, SIZE, SIZE)."""
    frame = (1, SIZE, SIZE)
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
    assert [batch for batch, _ in executions] == [6, 5]
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


def test_build_script_is_a_thin_wrapper():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_engine.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--calibration" in result.stdout and "--profiles" in result.stdout


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

