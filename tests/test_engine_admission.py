"""What the engines directory may hold without harm: odd files, bad manifests, files that cannot serve.

An engine manager over a real directory, with real ONNX models on ONNX Runtime,
real FIFOs, symlinks and sparse files, and inotify where the machine has it.
"""
from __future__ import annotations

import os
import queue
import re
import threading
import time
from typing import Any, Callable, Dict, Optional

import numpy as np
import pytest
from onnx import TensorProto, helper

from appliance import hotswap
from appliance.config import EngineConfig
from appliance.engines import open_engine
from appliance.engines.base import Engine
from appliance.engines.errors import EngineError
from appliance.engines.manifest import PHASE, GoldenPair, Manifest, manifest_path, write_manifest
from appliance.hotswap import EngineManager, StreamSpec

from onnx_models import _save, _value, affine_model

SIZE = 16
WAIT_S = 60.0  # only a guard against a hang: every wait ends on the state it waits for


def model(path, scale: float = 1.0, age_s: float = 0.0) -> str:
    """An affine model file; ``age_s`` back-dates it (the newest file is tried first)."""
    affine_model(str(path), size=SIZE, scale=scale)
    return back_date(path, age_s)


def back_date(path, age_s: float) -> str:
    stamp = time.time_ns() - int(age_s * 1e9)
    os.utime(str(path), ns=(stamp, stamp), follow_symlinks=False)
    return str(path)


class Directory:
    """An engines directory and one manager over it; the engines it serves arrive on ``served``."""

    def __init__(self, path, **config: Any) -> None:
        self.path = path
        self.path.mkdir(exist_ok=True)
        self.served: "queue.Queue[Engine]" = queue.Queue()
        self.config = EngineConfig(**dict({"directory": str(path), "settle_s": 0.05}, **config))
        self.manager = EngineManager(self.config, 8, self.served.put)

    def initial(self) -> Optional[Engine]:
        """select_initial(), failing (instead of hanging the test) if it does not return."""
        return within(self.manager.select_initial)

    def verdict(self, name: str) -> Dict[str, Any]:
        """The latest verdict on ``name``, once there is one."""
        def found() -> Optional[Dict[str, Any]]:
            return next((v for v in reversed(self.manager.status()["engine_verdicts"]) if v["file"] == name), None)

        return wait_for(found, "a verdict on " + name)

    def rejection(self, name: str) -> str:
        """The reason of the latest rejection of ``name``, once there is one."""
        def found() -> Optional[str]:
            verdicts = self.manager.status()["engine_verdicts"]
            return next((v["reason"] for v in reversed(verdicts) if v["file"] == name and not v["accepted"]), None)

        return wait_for(found, "rejection of " + name)

    def next_served(self) -> Engine:
        return self.served.get(timeout=WAIT_S)


def within(call: Callable[[], Any]) -> Any:
    """``call()``'s result; fails the test if it has not returned within WAIT_S (it is left blocked)."""
    results: "queue.Queue[Any]" = queue.Queue()
    threading.Thread(target=lambda: results.put(call()), daemon=True).start()
    try:
        return results.get(timeout=WAIT_S)
    except queue.Empty:
        pytest.fail("{} did not return: it blocked or read without end".format(call.__name__))


def wait_for(probe: Callable[[], Any], what: str) -> Any:
    """Poll ``probe`` (the manager's status has no event to await) until it gives something."""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, "no " + what
        time.sleep(0.02)


@pytest.fixture
def directory(tmp_path):
    made = []

    def make(**config: Any) -> Directory:
        made.append(Directory(tmp_path / "engines", **config))
        return made[-1]

    yield make
    for each in made:
        each.manager.stop()


def put_fifo(path) -> None:
    os.mkfifo(str(path))


def put_device_link(path) -> None:
    os.symlink("/dev/zero", str(path))


def put_sparse_6gib(path) -> None:
    with open(str(path), "wb") as handle:
        handle.truncate(6 << 30)  # a hole: no data is written


@pytest.mark.parametrize("put, reason", [
    (put_fifo, "a FIFO, not a regular file"),
    (put_device_link, "a character device, not a regular file"),
    (put_sparse_6gib, "6442450944 bytes, more than engine.max_file_mb (2048 MiB)"),
], ids=["fifo", "link-to-dev-zero", "sparse-6GiB"])
def test_what_cannot_be_read_once_is_refused_unread_and_the_valid_model_serves(directory, put, reason):
    engines = directory()
    model(engines.path / "good.onnx", age_s=60)
    put(engines.path / "bad.onnx")  # the newest: judged first
    engine = engines.initial()
    assert engine is not None and engine.name == "good.onnx"
    verdict = engines.verdict("bad.onnx")
    assert not verdict["accepted"] and reason in verdict["reason"], verdict
    assert verdict["sha256"] == "", "the file was read (hashed) before it was refused"


def test_a_fifo_as_a_manifest_rejects_its_engine_without_blocking(directory):
    engines = directory()
    model(engines.path / "good.onnx", age_s=60)
    model(engines.path / "new.onnx")
    put_fifo(manifest_path(str(engines.path / "new.onnx")))
    assert engines.initial().name == "good.onnx"
    assert "new.onnx.yaml: a FIFO, not a regular file" in engines.verdict("new.onnx")["reason"]


def test_a_symlink_to_a_model_file_is_followed(directory, tmp_path):
    engines = directory()
    target = model(tmp_path / "kept-elsewhere.onnx", scale=2.0)
    os.symlink(target, str(engines.path / "linked.onnx"))
    engine = engines.initial()
    assert engine is not None and engine.name == "linked.onnx"


def golden_pair(engines: Directory, frames: np.ndarray, phase: np.ndarray) -> Manifest:
    np.save(str(engines.path / "golden_in.npy"), frames)
    np.save(str(engines.path / "golden_out.npy"), phase)
    return Manifest(golden=GoldenPair("golden_in.npy", "golden_out.npy"))


def not_utf8(engines: Directory, path: str) -> str:
    with open(manifest_path(path), "wb") as handle:
        handle.write(b"description: caf\xe9\n")
    return "manifest is not UTF-8 text: byte 0xe9 at offset 16"


def golden_input_of_another_size(engines: Directory, path: str) -> str:
    frames = np.ones((2, SIZE + 1, SIZE), np.float32)
    write_manifest(path, golden_pair(engines, frames, frames))
    return "golden input is float32 [2, 17, 16]; expected one or more 16x16 frames of numbers"


def golden_output_of_another_size(engines: Directory, path: str) -> str:
    frames = np.ones((2, SIZE, SIZE), np.float32)
    write_manifest(path, golden_pair(engines, frames, frames[:1]))
    return "golden phase is float32 [1, 16, 16]; the model gives float32 [2, 16, 16] for the 2 golden frames"


BAD_MANIFESTS = pytest.mark.parametrize(
    "spoil", [not_utf8, golden_input_of_another_size, golden_output_of_another_size],
    ids=["not-utf8", "golden-input-size", "golden-output-size"],
)


@BAD_MANIFESTS
def test_at_start_a_bad_manifest_rejects_its_model_and_the_newest_valid_one_serves(directory, spoil):
    engines = directory()
    model(engines.path / "older.onnx", age_s=60)
    newest = model(engines.path / "newest.onnx", scale=2.0)
    reason = spoil(engines, newest)
    engine = engines.initial()
    assert engine is not None and engine.name == "older.onnx"
    verdict = engines.verdict("newest.onnx")
    assert not verdict["accepted"] and reason in verdict["reason"], verdict


@BAD_MANIFESTS
def test_while_running_a_bad_manifest_rejects_its_model_and_later_models_are_still_judged(directory, spoil):
    engines = directory()
    model(engines.path / "first.onnx", age_s=60)
    assert engines.initial().name == "first.onnx"
    engines.manager.start()
    spoiled = str(engines.path / "spoiled.onnx")
    reason = spoil(engines, spoiled)  # the manifest first, then the model renamed into place
    os.rename(model(engines.path / ".spoiled.onnx", scale=2.0), spoiled)
    assert reason in engines.verdict("spoiled.onnx")["reason"]
    model(engines.path / "later.onnx", scale=3.0)
    assert engines.next_served().name == "later.onnx"
    assert engines.manager.status()["engine_manager"] == "running"


def test_status_says_when_the_manager_thread_died(directory):
    engines = directory()
    model(engines.path / "first.onnx", age_s=60)

    def broken_swap(engine: Engine) -> None:  # the caller's swap failing: a way left to end the thread
        raise RuntimeError("swap failed")

    manager = EngineManager(engines.config, 8, broken_swap)
    assert manager.status()["engine_manager"] == "not started"
    manager.start()
    try:
        state = wait_for(lambda: manager.status()["engine_manager"] != "running" and
                         manager.status()["engine_manager"], "end of the manager thread")
    finally:
        manager.stop()
    assert state == "died: RuntimeError: swap failed"
    assert manager.status()["engine_manager"] == state


def test_a_bad_manifest_beside_the_serving_model_keeps_it_serving(directory):
    engines = directory()
    model(engines.path / "older.onnx", age_s=120)
    serving = model(engines.path / "serving.onnx", scale=2.0, age_s=60)
    assert engines.initial().name == "serving.onnx"
    engines.manager.start()
    (engines.path / "junk1.onnx").write_bytes(b"not a model, 1")
    engines.rejection("junk1.onnx")  # the directory is watched
    with open(manifest_path(serving), "w") as handle:
        handle.write("outputs: {phase: no_such_tensor}\n")
        handle.flush()
        wait_for(lambda: "serving.onnx" in engines.manager.status()["engine_pending"], "the manifest write noticed")
        (engines.path / "junk2.onnx").write_bytes(b"not a model, 2")
        engines.rejection("junk2.onnx")  # judged while the serving file's manifest is being written
    assert "manifest names output(s) ['no_such_tensor']" in engines.rejection("serving.onnx")
    (engines.path / "junk3.onnx").write_bytes(b"not a model, 3")
    engines.rejection("junk3.onnx")  # judged after (so once) the manifest was
    assert engines.served.empty(), "swapped to {}".format(engines.served.get().name)
    assert engines.manager.active_path == serving


def test_links_directories_and_fifos_are_judged_at_once_and_the_manager_sleeps_again(directory, tmp_path):
    engines = directory()
    engines.manager.start()
    model(engines.path / "first.onnx")
    assert engines.next_served().name == "first.onnx"  # the directory is watched
    os.mkdir(str(engines.path / "incoming"))
    os.symlink(model(tmp_path / "elsewhere.onnx", scale=2.0), str(engines.path / "linked.onnx"))
    assert engines.next_served().name == "linked.onnx"
    put_fifo(engines.path / "pipe.onnx")  # newer than the serving link: judged
    assert "a FIFO, not a regular file" in engines.rejection("pipe.onnx")
    wait_for(lambda: engines.manager.status()["engine_pending"] == [], "end of the pending names")
    assert engines.manager._timeout() == hotswap._POLL_S


def test_a_file_held_open_for_writing_does_not_keep_the_manager_awake(directory):
    engines = directory()
    engines.manager.start()
    model(engines.path / "first.onnx")
    assert engines.next_served().name == "first.onnx"  # the directory is watched
    with open(str(engines.path / "slow.onnx"), "wb") as handle:
        handle.write(b"the first part of a model")
        handle.flush()
        wait_for(lambda: engines.manager.status()["engine_pending"] == ["slow.onnx"], "only the write pending")
        assert engines.manager._timeout() == hotswap._POLL_S  # its close will wake the manager


def nan_model(path) -> str:
    """phase = sqrt(-|x| - 1): NaN for every input, zeros included."""
    shape = ["batch", 1, SIZE, SIZE]
    nodes = [
        helper.make_node("Abs", ["input.1"], ["a"]),
        helper.make_node("Neg", ["a"], ["n"]),
        helper.make_node("Sub", ["n", "one"], ["m"]),
        helper.make_node("Sqrt", ["m"], ["94"]),
    ]
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(nodes, "nan", [_value("input.1", shape)], [_value("94", shape)], [one])
    return _save(graph, str(path))


def test_a_model_whose_outputs_are_not_finite_is_refused_before_it_serves(directory):
    engines = directory()
    model(engines.path / "good.onnx", age_s=60)
    nan_model(engines.path / "nan.onnx")
    assert engines.initial().name == "good.onnx"
    assert "warm-up output phase is not finite: 256 of 256 values NaN or Inf" in engines.rejection("nan.onnx")


def test_a_model_slower_than_the_stream_is_refused_naming_both_rates(directory):
    engines = directory()
    model(engines.path / "model.onnx")
    engines.manager.stream = StreamSpec((SIZE, SIZE), np.dtype(np.float32), lambda: 1e9)  # no model is that fast
    assert engines.initial() is None
    reason = engines.rejection("model.onnx")
    assert re.search(r"too slow for the stream: [0-9.e+]+ frames/s \(fastest of 3 full batches of 8\); "
                     r"the stream brings 1e\+09 frames/s", reason), reason


def test_while_the_stream_rate_is_not_known_the_measured_rate_is_reported(directory):
    engines = directory()
    model(engines.path / "model.onnx")
    engines.manager.stream = StreamSpec((SIZE, SIZE), np.dtype(np.float32), lambda: 0.0)
    engine = engines.initial()
    assert engine is not None and engine.frames_per_s > 0
    assert engines.verdict("model.onnx")["reason"].endswith("; {:.4g} frames/s".format(engine.frames_per_s))


def test_outputs_of_a_type_ntndarray_cannot_carry_are_refused(tmp_path):
    engine = open_engine(model(tmp_path / "model.onnx"))
    hotswap.check_outputs(engine, {PHASE: np.zeros((1, SIZE, SIZE), np.float16)}, "warm-up")  # published as float32
    with pytest.raises(EngineError, match=r"warm-up output phase cannot be published: no NTNDArray value field "
                                          r"for dtype complex64"):
        hotswap.check_outputs(engine, {PHASE: np.zeros((1, SIZE, SIZE), np.complex64)}, "warm-up")


def external_scale_model(path, location: str, in_constant: bool = False) -> str:
    """phase = scale * x with ``scale`` stored in the file ``location`` (relative to the model, as ONNX has it).

    Written as bytes, not with onnx.save, which refuses such locations itself:
    a deployed file need not have been made with onnx.
    """
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.0])
    del scale.float_data[:]
    scale.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        scale.external_data.add(key=key, value=value)
    shape = ["batch", 1, SIZE, SIZE]
    nodes = [helper.make_node("Mul", ["input.1", "scale"], ["94"])]
    initializers = [scale]
    if in_constant:  # the tensor as a Constant node's attribute, where initializers are not looked for
        nodes.insert(0, helper.make_node("Constant", [], ["scale"], value=scale))
        initializers = []
    graph = helper.make_graph(nodes, "external", [_value("input.1", shape)], [_value("94", shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    with open(str(path), "wb") as handle:
        handle.write(model.SerializeToString())
    return str(path)


@pytest.fixture
def external(tmp_path):
    """An engines directory, a weights file in it and a secret beside it (outside)."""
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "weights.bin").write_bytes(np.float32(3.0).tobytes())
    (tmp_path / "secret.bin").write_bytes(np.float32(7.0).tobytes())
    os.symlink("../secret.bin", str(engines / "link.bin"))
    return engines


@pytest.mark.parametrize("location, in_constant, reason", [
    ("../secret.bin", False, "external data location '../secret.bin' leaves the model's directory"),
    ("sub/../../secret.bin", False, "external data location 'sub/../../secret.bin' leaves the model's directory"),
    ("../secret.bin", True, "external data location '../secret.bin' leaves the model's directory"),
    ("link.bin", False, "external data location 'link.bin' leads out of the model's directory (to "),
    ("missing.bin", False, "external data location 'missing.bin': No such file or directory"),
], ids=["dotdot", "dotdot-inside", "constant-node", "symlink-out", "missing"])
def test_external_data_outside_the_model_directory_is_refused_before_the_backend_opens_it(
        external, location, in_constant, reason):
    path = external_scale_model(external / "model.onnx", location, in_constant)
    with pytest.raises(EngineError) as error:
        open_engine(path)
    assert reason in str(error.value)


def test_an_absolute_external_data_path_is_refused(external):
    secret = str(external.parent / "secret.bin")
    path = external_scale_model(external / "model.onnx", secret)
    with pytest.raises(EngineError, match="external data location '{}' is not a path relative to the model's "
                                          "directory".format(re.escape(secret))):
        open_engine(path)


def test_external_data_inside_the_model_directory_is_used(external):
    engine = open_engine(external_scale_model(external / "model.onnx", "weights.bin"))
    frames = np.ones((2, SIZE, SIZE), np.float32)
    np.testing.assert_array_equal(engine.run(frames)[PHASE], 3.0 * frames)


def test_a_rescan_in_the_middle_of_a_copy_waits_for_the_copy_to_end(directory, tmp_path):
    # systemctl reload while scp writes: the rescan forgets which files were being written, and a file
    # changed within settle_s must still wait (on the old code it was judged half-written and rejected).
    engines = directory(settle_s=3.0)
    model(engines.path / "first.onnx", age_s=60)
    assert engines.initial().name == "first.onnx"
    engines.manager.start()
    with open(model(tmp_path / "second.onnx", scale=2.0), "rb") as source:
        data = source.read()
    with open(str(engines.path / "second.onnx"), "wb") as copy:
        copy.write(data[: len(data) // 2])
        copy.flush()
        engines.manager.rescan()
        wait_for(lambda: not engines.manager._rescan_requested, "the rescan taken")  # no public event for it
        served_while_copying = [v["file"] for v in engines.manager.status()["engine_verdicts"]]
        copy.write(data[len(data) // 2 :])
    assert engines.next_served().name == "second.onnx"
    verdicts = [v for v in engines.manager.status()["engine_verdicts"] if v["file"] == "second.onnx"]
    assert [v["accepted"] for v in verdicts] == [True], verdicts
    assert "second.onnx" not in served_while_copying
