"""End to end over real PVA on loopback: detector stand-in -> appliance process -> collector."""
from __future__ import annotations

import itertools
import os
from typing import Dict, Iterator

import numpy as np
import onnxruntime
import pytest

from appliance.sim.detector import DetectorServer
from harness import ApplianceProcess, Collector, write_config
from onnx_models import affine_model, conv_model

_names = itertools.count()


@pytest.fixture
def names() -> Dict[str, str]:
    n = next(_names)
    return {"detector": "TEST{}:det:Image".format(n), "prefix": "TEST{}:pn".format(n)}


@pytest.fixture
def detector(names: Dict[str, str]) -> Iterator[DetectorServer]:
    server = DetectorServer(names["detector"])
    yield server
    server.close()


def frames(count: int, size: int = 128, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, (count, size, size)).astype(np.uint16)


def test_every_frame_is_published_once_in_order_with_its_metadata(tmp_path, names, detector, appliance_env):
    model = conv_model(str(tmp_path / "conv.onnx"))
    config = write_config(str(tmp_path / "config.yaml"), names["detector"], names["prefix"], engine_path=model,
                          pipeline={"max_batch": 8, "max_wait_ms": 5})
    app = ApplianceProcess(config, appliance_env, names["prefix"])
    app.wait_ready()
    collector = Collector(names["prefix"] + ":Phase")
    data = frames(300)
    sent = {}
    for index, image in enumerate(data):
        sent[index + 1] = detector.send(image, index + 1, position=(index * 1e-7, -index * 2e-7))
    received = collector.wait_for(300, timeout=30)
    status = app.status()
    assert app.stop() == 0, app.output

    assert [r.unique_id for r in received] == list(range(1, 301))
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input.1": data.astype(np.float32)[:, None]})[0][:, 0]
    for item in received:
        index = item.unique_id - 1
        assert item.image.dtype == np.float32
        np.testing.assert_allclose(item.image, expected[index], rtol=1e-5, atol=1e-5)
        stamp = sent[item.unique_id]
        assert (item.timestamp["secondsPastEpoch"], item.timestamp["nanoseconds"]) == stamp[:2]
        assert (item.data_timestamp["secondsPastEpoch"], item.data_timestamp["nanoseconds"]) == stamp[:2]
        assert item.attributes["SampleX"] == pytest.approx(index * 1e-7)
        assert item.attributes["SampleY"] == pytest.approx(-index * 2e-7)
    assert status["received"] == 300 and status["published"] == 300
    assert status["dropped_total"] == 0 and status["missing_upstream"] == 0
    assert status["engine_name"] == "conv.onnx" and len(status["engine_sha256"]) == 64


def test_fixed_batch_model_publishes_a_short_scan_without_padding(tmp_path, names, detector, appliance_env):
    model = affine_model(str(tmp_path / "fixed8.onnx"), batch=8, scale=2.0)
    config = write_config(str(tmp_path / "config.yaml"), names["detector"], names["prefix"], engine_path=model,
                          pipeline={"max_batch": 8, "max_wait_ms": 20})
    app = ApplianceProcess(config, appliance_env, names["prefix"])
    app.wait_ready()
    collector = Collector(names["prefix"] + ":Phase")
    data = frames(13)
    for index, image in enumerate(data):
        detector.send(image, index + 1)
    received = collector.wait_for(13, timeout=10)
    assert [r.unique_id for r in received] == list(range(1, 14))
    for item in received:
        np.testing.assert_allclose(item.image, 2.0 * data[item.unique_id - 1])
    status = app.status()
    assert app.stop() == 0, app.output
    assert status["published"] == 13 and status["batches"] == 2 if "batches" in status else True
