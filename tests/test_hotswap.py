"""Hot swap under a live stream: files land in the engines directory as scp would leave them."""
from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
from typing import Iterator, List, Tuple

import numpy as np
import pytest

from appliance.engines.manifest import GoldenPair, Manifest, write_manifest
from appliance.sim.detector import DetectorProcess

from harness import ApplianceProcess, Collector, Received, write_config
from onnx_models import affine_model

SIZE = 32
RATE_HZ = 250.0
_names = itertools.count()


def frame(unique_id: int) -> np.ndarray:
    return np.random.default_rng(unique_id).integers(1, 1000, (SIZE, SIZE)).astype(np.uint16)


class Stream:
    """Frames with ids 1, 2, ... at RATE_HZ from a background thread until stopped."""

    def __init__(self, detector: DetectorProcess) -> None:
        self._detector = detector
        self._stop = threading.Event()
        self.last_id = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _frames(self) -> Iterator[Tuple[np.ndarray, None]]:
        for unique_id in itertools.count(1):
            if self._stop.is_set():
                return
            self.last_id = unique_id
            yield frame(unique_id), None

    def _run(self) -> None:
        self._detector.stream(self._frames(), RATE_HZ)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.last_id


def scale_of(item: Received) -> float:
    """Which affine model produced this output (they differ only in their scale)."""
    source = frame(item.unique_id).astype(np.float32)
    scale = float(item.image[0, 0] / source[0, 0])
    np.testing.assert_array_equal(item.image, np.float32(scale) * source)
    return scale


def write_slowly(path: str, data: bytes, chunks: int, pause_s: float) -> float:
    """Write like a slow scp: one open file, chunks with pauses; returns the time of the close."""
    step = len(data) // chunks + 1
    with open(path, "wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start : start + step])
            handle.flush()
            time.sleep(pause_s)
    return time.time()


def install(path: str, data: bytes) -> float:
    with open(path, "wb") as handle:
        handle.write(data)
    return time.time()


@pytest.fixture
def setup(tmp_path, appliance_env):
    n = next(_names)
    detector_pv, prefix = "HS{}:det:Image".format(n), "HS{}:pn".format(n)
    engines = tmp_path / "engines"
    engines.mkdir()
    models = tmp_path / "models"
    models.mkdir()
    affine_model(str(engines / "identity.onnx"), size=SIZE)
    config = write_config(str(tmp_path / "config.yaml"), detector_pv, prefix, engine_dir=str(engines),
                          pipeline={"max_batch": 8, "max_wait_ms": 2})
    detector = DetectorProcess(detector_pv)
    app = ApplianceProcess(config, appliance_env, prefix)
    app.wait_ready()
    collector = Collector(prefix + ":Phase")
    yield {"engines": engines, "models": models, "detector": detector, "app": app, "collector": collector}
    app.stop()
    detector.close()


def model_bytes(models, name: str, **kwargs) -> bytes:
    path = affine_model(str(models / name), size=kwargs.pop("size", SIZE), **kwargs)
    with open(path, "rb") as handle:
        return handle.read()


def test_a_sequence_of_good_and_bad_files_swaps_without_losing_a_frame(setup):
    engines, models, app, collector = setup["engines"], setup["models"], setup["app"], setup["collector"]
    stream = Stream(setup["detector"])
    activations: List[Tuple[float, float]] = []  # (scale, time of the file's last write)

    def deploy_good(name: str, data: bytes, scale: float) -> None:
        closed = install(str(engines / name), data)
        assert app.wait_verdict(name)["accepted"], app.details()["engine_verdicts"]
        activations.append((scale, closed))

    def expect_rejected(name: str, reason: str) -> None:
        verdict = app.wait_verdict(name)
        assert not verdict["accepted"] and reason in verdict["reason"], verdict

    deploy_good("negate.onnx", model_bytes(models, "n.onnx", scale=-1.0), -1.0)

    good = model_bytes(models, "t.onnx", scale=-1.0)
    install(str(engines / "truncated.onnx"), good[: len(good) // 2])
    expect_rejected("truncated.onnx", "not a loadable ONNX model")
    install(str(engines / "random.onnx"), np.random.default_rng(0).bytes(5000))
    expect_rejected("random.onnx", "not a loadable ONNX model")
    install(str(engines / "empty.onnx"), b"")
    expect_rejected("empty.onnx", "empty file")
    install(str(engines / "wrong.onnx"), model_bytes(models, "w.onnx", size=64))
    expect_rejected("wrong.onnx", "takes float32 64x64 frames; the stream delivers float32 32x32")

    golden_in = np.stack([frame(1), frame(2)]).astype(np.float32)
    np.save(engines / "golden_in.npy", golden_in)
    np.save(engines / "golden_out.npy", golden_in)  # what the identity would give
    write_manifest(str(engines / "nine.onnx"), Manifest(golden=GoldenPair("golden_in.npy", "golden_out.npy")))
    install(str(engines / "nine.onnx"), model_bytes(models, "9.onnx", scale=9.0))
    expect_rejected("nine.onnx", "golden check failed")

    closed = write_slowly(str(engines / "slow.onnx"), model_bytes(models, "s.onnx", scale=3.0), chunks=4, pause_s=0.8)
    assert app.wait_verdict("slow.onnx")["accepted"]
    activations.append((3.0, closed))

    install(str(engines / "fast.onnx.part"), model_bytes(models, "f.onnx", scale=5.0))
    time.sleep(1.5)  # longer than the settle time: a .part file must still be left alone
    assert "fast.onnx.part" not in [v["file"] for v in app.details()["engine_verdicts"]]
    os.rename(engines / "fast.onnx.part", engines / "fast.onnx")
    activations.append((5.0, time.time()))
    assert app.wait_verdict("fast.onnx")["accepted"]

    np.save(engines / "golden_out7.npy", 7.0 * golden_in)
    write_manifest(str(engines / "seven.onnx"), Manifest(golden=GoldenPair("golden_in.npy", "golden_out7.npy")))
    deploy_good("seven.onnx", model_bytes(models, "7.onnx", scale=7.0), 7.0)

    os.remove(engines / "seven.onnx")  # the active file: the next newest valid one serves again
    removed = time.time()
    activations.append((5.0, removed))
    restored = collector.wait_until(
        lambda items: bool(items) and items[-1].arrived > removed and scale_of(items[-1]) == 5.0, timeout=120)
    assert scale_of(restored[-1]) == 5.0, "fast.onnx did not serve again after the active seven.onnx was removed"
    last = stream.stop()

    received = collector.wait_for(last, timeout=20)
    status = app.wait_counts(published=last)
    assert [r.unique_id for r in received] == list(range(1, last + 1)), "frames lost or duplicated"
    assert status["dropped_total"] == 0 and status["missing_upstream"] == 0

    scales = [scale_of(item) for item in received]
    runs = [scale for scale, _ in itertools.groupby(scales)]
    assert runs == [1.0] + [scale for scale, _ in activations]
    for scale, written in activations:  # how soon is bench_hotswap's to measure; a test asserts the order only
        assert any(s == scale and item.arrived > written - 0.001 for item, s in zip(received, scales)), \
            "no frame served by the {} model after its file was written".format(scale)


def test_the_service_keeps_serving_whatever_the_directory_does(setup):
    engines, app, collector = setup["engines"], setup["app"], setup["collector"]
    stream = Stream(setup["detector"])
    rng = np.random.default_rng(1)
    for index in range(1000):
        suffix = ".onnx" if index % 2 else ".txt"
        (engines / "junk{:04d}{}".format(index, suffix)).write_bytes(rng.bytes(64))
    deadline = time.monotonic() + 120
    while app.details()["engine_rejections"] < 500 and time.monotonic() < deadline:
        time.sleep(0.2)  # P:Status has no event to await
    assert app.details()["engine_rejections"] == 500
    vanishing = engines / "vanish.onnx"
    vanishing.write_bytes(b"x" * 100)
    vanishing.unlink()  # gone before it settles
    shutil.rmtree(engines)  # and then the whole directory
    time.sleep(1.5)
    last = stream.stop()
    received = collector.wait_for(last, timeout=20)
    status = app.wait_counts(published=last)
    assert [r.unique_id for r in received] == list(range(1, last + 1))
    assert status["dropped_total"] == 0 and status["engine_name"] == "identity.onnx"
    rejected = [v for v in app.details()["engine_verdicts"] if not v["accepted"]]
    assert rejected and all("not a loadable ONNX model" in v["reason"] for v in rejected)
    assert "cannot" in app.details()["engine_directory_error"] or app.process.poll() is None


def test_an_amplitude_output_arriving_with_a_later_engine_gets_its_pv(setup):
    engines, models, app = setup["engines"], setup["models"], setup["app"]
    install(str(engines / "both.onnx"), model_bytes(models, "b.onnx", scale=2.0, amplitude_name="amp"))
    assert app.wait_verdict("both.onnx")["accepted"]
    amplitude = Collector(app.prefix + ":Amplitude")  # raises unless the PV now exists
    stream = Stream(setup["detector"])
    first = amplitude.wait_for(50, timeout=20)[0].unique_id  # the swap lands between batches
    last = stream.stop()
    received = amplitude.wait_for(last - first + 1, timeout=20)
    assert [r.unique_id for r in received] == list(range(first, last + 1))
    for item in received:
        np.testing.assert_array_equal(item.image, np.float32(0.5) * frame(item.unique_id).astype(np.float32))
