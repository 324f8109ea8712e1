"""ONNX models deployed on a TensorRT device: served at once, then replaced by the engine built from them.

TensorRT and CUDA are the FAKES of ``tests/fake_tensorrt``, in this process and
in every child (the background build, the appliance process): see
``fake_tensorrt.child_environment``. The build itself is a real child process
running ``appliance.engines.build``; its engine runs the ONNX model.
"""
from __future__ import annotations

import itertools
import os
import queue
import re
import shutil
import sys
import time
from typing import Callable, Dict

import numpy as np
import pytest

from appliance.config import EngineConfig
from appliance.engines import tensorrt as tensorrt_backend
from appliance.engines.autobuild import BuildSettings, EngineBuilds
from appliance.engines.base import Engine, run_padded
from appliance.engines.files import file_sha256
from appliance.engines.manifest import PHASE
from appliance.hotswap import EngineManager, StreamSpec
from appliance.sim.detector import DetectorProcess

import fake_tensorrt
from harness import ApplianceProcess, Collector, write_config
from onnx_models import affine_model

SIZE = 16
BUILD_TIMEOUT_S = 60.0
# Not the service's 19: at 19 a build on a machine kept busy by other work gets ~1 % of a core
# and would outlast any timeout; the tests check that the configured niceness is applied.
BUILD_NICENESS = 3
_names = itertools.count()


@pytest.fixture
def trt_device(monkeypatch):
    """This process and its children on the fake TensorRT 8.5 and a fake discrete GPU."""
    trt = fake_tensorrt.install_tensorrt(monkeypatch, fake_tensorrt.install_cuda(monkeypatch))
    for name, value in fake_tensorrt.child_environment(os.environ).items():
        monkeypatch.setenv(name, value)
    return trt


class Directory:
    """An engines directory with one manager over it; the engines it serves arrive on ``served``."""

    def __init__(self, tmp_path, trt, precision: str = "fp16", keep: int = 4) -> None:
        self.keep = keep
        self.engines = tmp_path / "engines"
        self.engines.mkdir(exist_ok=True)
        self.cache = str(tmp_path / "cache")
        self.settings = BuildSettings(precision, 8, 2, trt.__version__, "Fake GPU sm86")
        self.served: "queue.Queue[Engine]" = queue.Queue()
        self.manager = self.new_manager()

    def new_manager(self) -> EngineManager:
        config = EngineConfig(directory=str(self.engines), settle_s=0.1)
        builds = EngineBuilds(self.cache, self.settings, self.keep, niceness=BUILD_NICENESS)
        return EngineManager(config, 8, self.served.put, builds=builds)

    def next_served(self) -> Engine:
        return self.served.get(timeout=BUILD_TIMEOUT_S)

    def wait_status(self, done: Callable[[Dict[str, object]], bool]) -> Dict[str, object]:
        """Poll the manager's status (it has no event for a build's end) until ``done``."""
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        while not done(self.manager.status()):
            assert time.monotonic() < deadline, self.manager.status()
            time.sleep(0.05)
        return self.manager.status()


def niceness(pid: int) -> int:
    with open("/proc/{}/stat".format(pid)) as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[16])


def read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def builds_log(cache: str) -> str:
    """The log of the one build in ``cache``."""
    (name,) = [n for n in os.listdir(cache) if n.endswith(".engine.log")]
    return os.path.join(cache, name)


def phase_of(engine: Engine, frames: np.ndarray) -> np.ndarray:
    return run_padded(engine, frames.reshape((-1,) + engine.io.image_shape))[PHASE]


def test_onnx_serves_at_once_then_its_built_engine_and_the_cache_survives_a_restart(trt_device, tmp_path, monkeypatch):
    setup = Directory(tmp_path, trt_device)
    affine_model(str(setup.engines / "m.onnx"), size=SIZE, scale=2.0, offset=1.0)
    frames = np.random.default_rng(0).uniform(0, 100, (3, 1, SIZE, SIZE)).astype(np.float32)

    gate = tmp_path / "let-the-build-finish"
    monkeypatch.setenv(fake_tensorrt.BUILD_GATE_VARIABLE, str(gate))

    first = setup.manager.select_initial()
    assert first is not None and first.backend == "onnxruntime" and first.name == "m.onnx"
    building = re.match(r"building m\.onnx \(fp16, pid (\d+)\) for \d+ s$", setup.manager.status()["engine_build"])
    assert building, setup.manager.status()
    log_path = builds_log(setup.cache)
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while "this takes a while" not in read(log_path):  # the build's log is the only sign of its progress
        assert time.monotonic() < deadline, read(log_path)
        time.sleep(0.05)
    pid = int(building.group(1))
    assert niceness(pid) == niceness(os.getpid()) + BUILD_NICENESS
    with open("/proc/{}/oom_score_adj".format(pid)) as handle:
        assert handle.read().strip() == "1000"  # short of memory, the kernel kills the build, not the service
    gate.touch()
    setup.manager.start()
    try:
        built = setup.next_served()
        assert built.backend == "tensorrt" and os.path.dirname(built.path) == setup.cache
        assert built.name.startswith("m-") and built.name.endswith("-fp16-b8x2-trt8.5.2.2-Fake_GPU_sm86.engine")
        np.testing.assert_allclose(phase_of(built, frames), phase_of(first, frames), rtol=1e-6)
        status = setup.wait_status(lambda s: s["engine_build"] == "idle")  # the engine is whole before its child exits
        assert status["engine_builds"] == 1 and status["engine_build"] == "idle"
        verdict = status["engine_verdicts"][-1]
        assert verdict["accepted"] and verdict["file"] == built.name and verdict["sha256"] == file_sha256(built.path)
    finally:
        setup.manager.stop()

    again = setup.new_manager().select_initial()  # a restart: the cached engine serves at once
    assert again is not None and again.path == built.path
    assert setup.manager.status()["engine_builds"] == 1


def test_a_failing_built_engine_gives_way_to_its_onnx_model_and_is_not_rebuilt(trt_device, tmp_path):
    setup = Directory(tmp_path, trt_device)
    affine_model(str(setup.engines / "m.onnx"), size=SIZE, scale=-1.0)
    setup.manager.select_initial()
    setup.manager.start()
    try:
        built = setup.next_served()
        assert built.backend == "tensorrt"
        setup.wait_status(lambda s: s["engine_build"] == "idle")
        setup.manager.report_fault(built, "3 failed batches in a row")
        fallback = setup.next_served()
        assert fallback.backend == "onnxruntime" and fallback.name == "m.onnx"
        status = setup.manager.status()
        rejected = [v for v in status["engine_verdicts"] if not v["accepted"]]
        reason = "failed at run time: 3 failed batches in a row"
        assert [(v["file"], v["reason"]) for v in rejected] == [(built.name, reason)]
        assert status["engine_build"] == "idle" and status["engine_builds"] == 1
        assert not os.path.exists(built.path)  # removed: a restart builds it afresh
    finally:
        setup.manager.stop()


def test_a_failed_build_is_reported_kept_out_of_the_way_and_retried_on_rescan(trt_device, tmp_path):
    setup = Directory(tmp_path, trt_device, precision="int8")  # no Q/DQ nodes and no frames: cannot be built
    affine_model(str(setup.engines / "m.onnx"), size=SIZE)
    serving = setup.manager.select_initial()
    assert serving is not None and serving.backend == "onnxruntime"
    setup.manager.start()
    try:
        status = setup.wait_status(lambda s: s["engine_build_failures"] == 1)
        assert "m.onnx: engine build failed (exit 1)" in status["engine_build_last"]
        assert "INT8 needs scales" in status["engine_build_last"]
        assert status["engine_build"] == "idle" and setup.served.empty()
        setup.manager.rescan()
        status = setup.wait_status(lambda s: s["engine_build_failures"] == 2)
        assert status["engine_builds"] == 0 and setup.served.empty()
    finally:
        setup.manager.stop()


def test_an_onnx_model_that_onnx_runtime_rejects_is_not_built(trt_device, tmp_path):
    setup = Directory(tmp_path, trt_device)
    affine_model(str(setup.engines / "m.onnx"), size=SIZE)
    assert setup.manager.select_initial().name == "m.onnx"
    setup.manager.stream = StreamSpec((SIZE, SIZE), np.dtype(np.float32))  # as the appliance's ring fixes it
    affine_model(str(setup.engines / "wrong.onnx"), size=2 * SIZE)  # newer, and the wrong input size
    setup.manager.start()
    try:
        assert setup.next_served().backend == "tensorrt"  # m.onnx's engine: wrong.onnx was rejected first
        status = setup.wait_status(lambda s: s["engine_build"] == "idle")
        rejected = [v for v in status["engine_verdicts"] if not v["accepted"]]
        assert [v["file"] for v in rejected] == ["wrong.onnx"]
        assert "a different input needs a restart" in rejected[0]["reason"]
        assert status["engine_builds"] == 1 and status["engine_build"] == "idle"
        assert [n for n in os.listdir(setup.cache) if n.startswith("wrong")] == []
    finally:
        setup.manager.stop()


def test_without_onnx_runtime_the_model_is_built_and_then_served(trt_device, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # a Jetson without it; the fake GPU keeps its own
    setup = Directory(tmp_path, trt_device)
    affine_model(str(setup.engines / "m.onnx"), size=SIZE, scale=2.0)
    assert setup.manager.select_initial() is None
    assert "m.onnx: onnxruntime is not installed" in setup.manager.status()["last_rejection"]
    setup.manager.start()
    try:
        built = setup.next_served()
        assert built.backend == "tensorrt" and built.name.startswith("m-")
        frames = np.ones((2, 1, SIZE, SIZE), np.float32)
        np.testing.assert_array_equal(phase_of(built, frames), 2 * frames.reshape(2, SIZE, SIZE))
    finally:
        setup.manager.stop()


def test_a_cache_that_cannot_be_used_costs_the_builds_not_the_service(trt_device, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        EngineBuilds(str(tmp_path / "file" / "cache"), BuildSettings("fp16", 8, 2, "8.5.2.2", "Fake GPU sm86"))
    setup = Directory(tmp_path, trt_device)
    shutil.rmtree(setup.cache)  # gone after start-up (a full disk, an operator's rm -r)
    affine_model(str(setup.engines / "m.onnx"), size=SIZE)
    serving = setup.manager.select_initial()
    assert serving is not None and serving.backend == "onnxruntime"
    status = setup.manager.status()
    assert status["engine_build_failures"] == 1 and "cannot start the engine build" in status["engine_build_last"]
    setup.manager.start()
    try:
        affine_model(str(setup.engines / "n.onnx"), size=SIZE, scale=2.0)  # the manager still swaps
        assert setup.next_served().name == "n.onnx"
    finally:
        setup.manager.stop()


def test_the_cache_keeps_the_newest_engines_and_drops_what_a_killed_build_left(trt_device, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    leftovers = [cache / "old-0123-fp16.engine.part", cache / "old-0123-fp16.engine.part.yaml"]
    for path in leftovers:
        path.write_bytes(b"half")
    setup = Directory(tmp_path, trt_device, keep=2)
    assert not any(path.exists() for path in leftovers)
    setup.manager.start()
    try:
        for index, name in enumerate(("a", "b", "c")):
            model = affine_model(str(tmp_path / (name + ".onnx")), size=SIZE, scale=float(index + 1))
            os.replace(model, setup.engines / (name + ".onnx"))  # whole, as scripts/deploy-engine.sh does
            assert setup.next_served().name == name + ".onnx"
            assert setup.next_served().name.startswith(name + "-")
    finally:
        setup.manager.stop()
    engines = sorted(p for p in os.listdir(setup.cache) if p.endswith(".engine"))
    assert [name[0] for name in engines] == ["b", "c"]
    assert sorted(os.listdir(setup.cache)) == sorted(e + suffix for e in engines for suffix in ("", ".yaml", ".log"))


def test_each_jetson_board_gets_its_own_engines_though_boards_share_a_gpu_model(tmp_path, monkeypatch):
    model = tmp_path / "device-tree-model"
    monkeypatch.setattr(tensorrt_backend, "DEVICE_TREE_MODEL", str(model))
    engines = {}
    for board in ("NVIDIA Jetson AGX Xavier Developer Kit", "NVIDIA Jetson Xavier NX Developer Kit"):
        model.write_bytes(board.encode() + b"\0")
        builds = EngineBuilds(str(tmp_path / "cache"), BuildSettings("fp16", 8, 2, "8.5.2.2", "Xavier sm72"))
        engines[board] = os.path.basename(builds.engine_path("/engines/m.onnx", "0123456789abcdef"))
    assert engines == {
        "NVIDIA Jetson AGX Xavier Developer Kit":
            "m-0123456789abcdef-fp16-b8x2-trt8.5.2.2-Xavier_sm72-NVIDIA_Jetson_AGX_Xavier_Developer_Kit.engine",
        "NVIDIA Jetson Xavier NX Developer Kit":
            "m-0123456789abcdef-fp16-b8x2-trt8.5.2.2-Xavier_sm72-NVIDIA_Jetson_Xavier_NX_Developer_Kit.engine",
    }


def test_the_appliance_streams_on_through_the_swap_to_the_built_engine(trt_device, tmp_path, appliance_env):
    n = next(_names)
    detector_pv, prefix = "AB{}:det:Image".format(n), "AB{}:pn".format(n)
    engines = tmp_path / "engines"
    engines.mkdir()
    affine_model(str(engines / "m.onnx"), size=SIZE, scale=3.0)
    config = write_config(str(tmp_path / "config.yaml"), detector_pv, prefix, engine_dir=str(engines),
                          engine={"build_cache": str(tmp_path / "cache"), "settle_s": 0.1,
                                  "build_niceness": BUILD_NICENESS},
                          pipeline={"max_batch": 8, "max_wait_ms": 2})
    detector = DetectorProcess(detector_pv)
    gate = tmp_path / "let-the-build-finish"
    env = fake_tensorrt.child_environment(appliance_env)
    env[fake_tensorrt.BUILD_GATE_VARIABLE] = str(gate)
    app = ApplianceProcess(config, env, prefix)
    try:
        assert app.wait_ready()["engine_backend"] == "onnxruntime"
        details = app.details()
        assert details["backend_choice"] == "auto: TensorRT 8.5.2.2 on Fake GPU (compute capability 8.6, discrete)"
        assert details["ring_memory"] == "pinned"  # for the engine to come, though ONNX Runtime serves first
        collector = Collector(prefix + ":Phase")
        rng = np.random.default_rng(1)
        frames = [rng.integers(1, 1000, (SIZE, SIZE)).astype(np.uint16) for _ in range(4000)]

        on_onnx_runtime = []

        def frames_before_during_and_after_the_build():
            for index, image in enumerate(frames):
                yield image, None
                if index % 100 == 99:
                    status = app.details()
                    if not gate.exists():
                        on_onnx_runtime.append((status["engine_backend"], status["published"], status["summary"]))
                        gate.touch()
                    elif status["engine_backend"] == "tensorrt":
                        break
            yield from ((image, None) for image in frames[index + 1 : index + 201])

        sent = detector.stream(frames_before_during_and_after_the_build(), rate_hz=200.0) - 1
        backend, published, summary = on_onnx_runtime[0]
        assert backend == "onnxruntime" and published > 0
        assert re.search(r"engine m\.onnx; building m\.onnx \(fp16, pid \d+\) for \d+ s$", summary), summary
        received = collector.wait_for(sent, timeout=20)
        status = app.wait_counts(published=sent)
        assert status["engine_backend"] == "tensorrt", app.finish()
        assert [r.unique_id for r in received] == list(range(1, sent + 1))
        assert status["dropped_total"] == 0 and status["missing_upstream"] == 0
        for item in received:
            np.testing.assert_array_equal(item.image, np.float32(3.0) * frames[item.unique_id - 1])
    finally:
        app.stop()
        detector.close()
