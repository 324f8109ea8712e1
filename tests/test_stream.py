"""End to end over real PVA on loopback: detector stand-in -> appliance process -> collector."""
from __future__ import annotations

import numpy as np
import onnxruntime
import pytest

from harness import Collector, write_config
from onnx_models import affine_model, conv_model


def serve(tmp_path, names, launch, model: str, **sections):
    """An appliance serving ``model`` on this test's detector, and a collector on its phase PV."""
    config = write_config(str(tmp_path / "config.yaml"), names["detector"], names["prefix"], engine_path=model, **sections)
    app = launch(config, names["prefix"])
    return app, Collector(names["prefix"] + ":Phase")


def frames(count: int, size: int = 128, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, (count, size, size)).astype(np.uint16)


def test_every_frame_is_published_once_in_order_with_its_metadata(tmp_path, names, detector, launch):
    model = conv_model(str(tmp_path / "conv.onnx"))
    app, collector = serve(tmp_path, names, launch, model, pipeline={"max_batch": 8, "max_wait_ms": 5})
    data = frames(300)
    sent = {}
    for index, image in enumerate(data):
        sent[index + 1] = detector.send(image, index + 1, position=(index * 1e-7, -index * 2e-7))
    received = collector.wait_for(300, timeout=30)
    status = app.wait_counts(published=300)
    assert app.stop() == 0, app.output

    assert [r.unique_id for r in received] == list(range(1, 301))
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input.1": data.astype(np.float32)[:, None]})[0][:, 0]
    for item in received:
        index = item.unique_id - 1
        assert item.image.dtype == np.float32
        np.testing.assert_allclose(item.image, expected[index], rtol=1e-5, atol=1e-5)
        stamp = sent[item.unique_id]
        assert item.meta.timestamp[:2] == stamp[:2]
        assert item.meta.data_timestamp[:2] == stamp[:2]
        assert item.attribute("SampleX") == pytest.approx(index * 1e-7)
        assert item.attribute("SampleY") == pytest.approx(-index * 2e-7)
    assert status["received"] == 300 and status["published"] == 300
    assert status["dropped_total"] == 0 and status["missing_upstream"] == 0
    assert status["engine_name"] == "conv.onnx" and len(status["engine_sha256"]) == 64


def test_fixed_batch_model_publishes_a_short_scan_without_padding(tmp_path, names, detector, launch):
    model = affine_model(str(tmp_path / "fixed8.onnx"), batch=8, scale=2.0)
    app, collector = serve(tmp_path, names, launch, model, pipeline={"max_batch": 8, "max_wait_ms": 20})
    data = frames(13)
    for index, image in enumerate(data):
        detector.send(image, index + 1)
    received = collector.wait_for(13, timeout=10)
    assert [r.unique_id for r in received] == list(range(1, 14))
    for item in received:
        np.testing.assert_allclose(item.image, 2.0 * data[item.unique_id - 1])
    status = app.wait_counts(published=13)
    assert app.stop() == 0, app.output
    assert status["published"] == 13 and status["dropped_total"] == 0


def test_bad_frames_are_counted_by_reason_and_the_stream_goes_on(tmp_path, names, detector, launch):
    model = affine_model(str(tmp_path / "identity.onnx"), size=32)
    app, collector = serve(tmp_path, names, launch, model, pipeline={"max_wait_ms": 1})
    good = frames(8, size=32)
    floats = good[0].astype(np.float32)
    floats[3, 4] = np.nan
    bad = [
        (2, "", good[0], 32, 32),  # empty union
        (3, "ubyteValue", np.zeros(10, np.uint8), 32, 32, "zstd", 6, 2048),  # unknown codec
        (4, "ubyteValue", np.arange(100, dtype=np.uint8), 32, 32, "lz4", 6, 2048),  # corrupt
        (5, "ushortValue", good[0].ravel()[:1000], 32, 32),  # size mismatch
        (6, "doubleValue", good[0].ravel().astype(np.float64), 32, 32),  # dtype not accepted
        (7, "floatValue", floats.ravel(), 32, 32),  # NaN
        (8, "ushortValue", frames(1, size=16)[0].ravel(), 16, 16),  # shape the engine cannot take
    ]
    detector.send(good[0], 1)
    for raw in bad:
        detector.send_raw(*raw)
    for index in range(9, 13):
        detector.send(good[index - 8], index)
    received = collector.wait_for(5, timeout=10)
    status = app.wait_counts(received=12)
    assert app.stop() == 0, app.output
    assert [r.unique_id for r in received] == [1, 9, 10, 11, 12]
    dropped = {k: v for k, v in json_status(status)["dropped"].items() if v}
    assert dropped == {"empty": 1, "codec": 1, "corrupt": 1, "size": 1, "dtype": 1, "nonfinite": 1, "shape": 1}
    assert status["missing_upstream"] == 0
    for reason_text in ("value union is empty", "unknown codec 'zstd'", "does not decode", "dimension says 32x32",
                        "pixel type float64", "NaN or Inf", "the engine takes 32x32"):
        assert reason_text in app.output, reason_text


def json_status(status):
    import json

    return json.loads(status["json"])


@pytest.mark.parametrize("codec", ["lz4", "bslz4", "blosc"])
def test_compressed_frames_give_the_same_phase_as_uncompressed(tmp_path, names, detector, launch, codec):
    model = conv_model(str(tmp_path / "conv.onnx"), size=64)
    app, collector = serve(tmp_path, names, launch, model)
    data = frames(10, size=64)
    for index, image in enumerate(data):
        detector.send(image, index + 1)
    for index, image in enumerate(data):
        detector.send(image, index + 11, codec=codec)
    received = collector.wait_for(20, timeout=10)
    assert app.stop() == 0, app.output
    assert [r.unique_id for r in received] == list(range(1, 21))
    for plain, compressed in zip(received[:10], received[10:]):
        np.testing.assert_array_equal(plain.image, compressed.image)


def test_gaps_count_as_upstream_losses_and_restarts_as_new_acquisitions(tmp_path, names, detector, launch):
    model = affine_model(str(tmp_path / "identity.onnx"), size=16)
    app, collector = serve(tmp_path, names, launch, model)
    image = frames(1, size=16)[0]
    for unique_id in [1, 2, 5, 6, 10, 1, 2, 3]:  # 5 lost upstream, then the IOC restarts
        detector.send(image, unique_id)
    collector.wait_for(8, timeout=10)
    status = app.wait_counts(published=8)
    assert app.stop() == 0, app.output
    assert status["missing_upstream"] == 5
    assert status["acquisitions"] == 2


def test_p4p_reads_phase_as_a_well_formed_ntndarray(tmp_path, names, detector, launch, appliance_ports):
    p4p_client = pytest.importorskip("p4p.client.thread", reason="p4p is the independent PVA implementation")
    model = affine_model(str(tmp_path / "negate.onnx"), size=24, scale=-1.0)
    app, collector = serve(tmp_path, names, launch, model)
    image = frames(1, size=24)[0]
    detector.send(image, 42, position=(1.5e-6, 2.5e-6))
    collector.wait_for(1, timeout=10)
    context = p4p_client.Context("pva", useenv=False, conf={
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_ADDR_LIST": "127.0.0.1:{}".format(appliance_ports["udp"]),
    })
    try:
        value = context.get(names["prefix"] + ":Phase", timeout=5.0)
    finally:
        context.close()
    assert app.stop() == 0, app.output
    np.testing.assert_array_equal(np.asarray(value), -image.astype(np.float32))
    raw = value.raw
    assert raw.uniqueId == 42
    assert [d.size for d in raw.dimension] == [24, 24]
    attributes = {a.name: a.value for a in raw.attribute}
    assert attributes["SampleX"] == pytest.approx(1.5e-6) and attributes["SampleY"] == pytest.approx(2.5e-6)
