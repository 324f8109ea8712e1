"""preprocess.mask: bad pixels left out of their bin's mean, checked in the config with precise errors."""
from __future__ import annotations

import numpy as np
import pytest

from appliance.config import parse_config
from appliance.ntndarray import FrameError
from appliance.preprocess import Preprocessor, frame_mask
from appliance.schema import SchemaError


def run(pre: Preprocessor, image: np.ndarray, dtype=np.float32) -> np.ndarray:
    out = np.full(pre.output_shape, -1.0, dtype=dtype)
    pre(image, out)
    return out


def test_masked_pixels_are_left_out_of_the_bin_mean():
    image = np.full((8, 8), 10, dtype=np.uint16)
    image[1, 1] = 65535  # hot
    image[5, 6] = 0  # dead
    mask = frame_mask([[1, 1], [5, 6]], (8, 8))
    out = run(Preprocessor((8, 8), (0, 0, 0, 0), 4, mask), image)
    np.testing.assert_allclose(out, 10.0, rtol=1e-6)
    unmasked = run(Preprocessor((8, 8), (0, 0, 0, 0), 4), image)
    assert unmasked[0, 0] > 4000 and unmasked[1, 1] < 10  # what the mask prevents


def test_a_bin_wholly_inside_a_gap_gets_the_fill_and_bin_1_fills_every_masked_pixel():
    image = np.arange(64, dtype=np.uint16).reshape(8, 8)
    gap = frame_mask([[0, 1, 0, 1]], (8, 8))  # rows 0..1, cols 0..1: one whole 2x2 bin
    out = run(Preprocessor((8, 8), (0, 0, 0, 0), 2, gap, fill=7.0), image)
    assert out[0, 0] == 7.0
    np.testing.assert_array_equal(out[1:], image.reshape(4, 2, 4, 2).mean(axis=(1, 3))[1:])
    single = run(Preprocessor((8, 8), (0, 0, 0, 0), 1, gap, fill=3.0), image, np.float16)
    assert (single[:2, :2] == 3.0).all() and single[2, 2] == image[2, 2]


def test_the_mask_is_in_raw_frame_coordinates_before_the_crop():
    image = np.full((10, 10), 5, dtype=np.uint16)
    image[2, 3] = 1000
    mask = frame_mask([[2, 3]], (10, 10))
    out = run(Preprocessor((10, 10), (2, 0, 2, 0), 4, mask), image)  # [2, 3] is cropped pixel [0, 1]
    np.testing.assert_allclose(out, 5.0, rtol=1e-6)


def test_a_mask_file_must_fit_the_frame(tmp_path):
    path = tmp_path / "mask.npy"
    np.save(path, np.eye(4, dtype=np.uint8))
    config = parse_config("preprocess: {{mask: {}}}".format(path), str(tmp_path / "c.yaml"))
    from appliance.preprocess import load_mask_file

    loaded = load_mask_file(config.preprocess.mask)
    assert frame_mask(config.preprocess.mask, (4, 4), loaded).sum() == 4
    with pytest.raises(FrameError, match=r"frame 8x8 but preprocess.mask .*mask.npy is 4x4"):
        frame_mask(config.preprocess.mask, (8, 8), loaded)
    with pytest.raises(FrameError, match=r"entry \[3, 9\] reaches row 3, column 9"):
        frame_mask([[3, 9]], (8, 8))


def test_a_relative_mask_file_is_found_next_to_the_config(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 4), bool))
    assert parse_config("preprocess: {mask: bad.npy}", str(tmp_path / "c.yaml")).preprocess.mask == str(tmp_path / "bad.npy")


@pytest.mark.parametrize("text, message", [
    ("preprocess: {mask: [[1, 2, 3]]}", r"preprocess.mask: got \[\[1, 2, 3\]\].*a list of 2 items .* or a list of 4 items"),
    ("preprocess: {mask: [[5, 2, 0, 1]]}", r"preprocess.mask: got .*first <= last"),
    ("preprocess: {mask: [[-1, 2]]}", r"preprocess.mask: got .*0..65535"),
    ("preprocess: {mask: bad.txt}", r"preprocess.mask: got 'bad.txt'.*a .npy file"),
    ("preprocess: {mask_fill: -1}", r"preprocess.mask_fill: got -1.*0..1e9"),
])
def test_bad_mask_settings_are_refused_with_where_and_what(text, message):
    with pytest.raises(SchemaError, match=message):
        parse_config(text, "site.yaml")


def test_a_mask_file_that_is_missing_or_wrong_is_refused_at_load(tmp_path):
    with pytest.raises(SchemaError, match=r"preprocess.mask: .*missing.npy: cannot be read"):
        parse_config("preprocess: {mask: missing.npy}", str(tmp_path / "c.yaml"))
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), bool))
    with pytest.raises(SchemaError, match=r"cube.npy: holds shape \(2, 2, 2\); expected a 2-D array"):
        parse_config("preprocess: {mask: cube.npy}", str(tmp_path / "c.yaml"))
    np.save(tmp_path / "float.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(SchemaError, match=r"float.npy: holds float32 values; expected bool or integers"):
        parse_config("preprocess: {mask: float.npy}", str(tmp_path / "c.yaml"))


def test_a_masked_stream_over_pva_publishes_the_masked_bin_means(tmp_path, appliance_env):
    """Real frames through a running appliance (identity model): hot pixels and a gap never reach the engine."""
    from appliance.sim.detector import DetectorProcess

    from harness import ApplianceProcess, Collector, write_config
    from onnx_models import affine_model

    mask = np.zeros((64, 64), bool)
    mask[10, 11] = mask[40, 3] = True  # hot
    mask[:, 30:34] = True  # a module gap, two whole bins wide
    np.save(tmp_path / "mask.npy", mask)
    config = write_config(str(tmp_path / "config.yaml"), "MASK:det", "MASK",
                          engine_path=affine_model(str(tmp_path / "identity.onnx"), size=32),
                          preprocess={"bin": 2, "mask": "mask.npy", "mask_fill": 0.0},
                          mosaic={"enabled": False})
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 100, (64, 64), dtype=np.uint16) for _ in range(3)]
    for image in images:
        image[mask] = 65000  # what a hot pixel or a gap's garbage would add
    detector = DetectorProcess("MASK:det")
    app = ApplianceProcess(config, appliance_env, "MASK")
    try:
        app.wait_ready()
        phases = Collector("MASK:Phase")
        detector.stream([(image, None) for image in images], rate_hz=100)
        received = phases.wait_for(3, timeout=20)
    finally:
        app.stop()
        detector.close()
    for item in received:
        image = images[item.unique_id - 1].astype(np.float64)
        good = (~mask).reshape(32, 2, 32, 2).sum(axis=(1, 3))
        sums = np.where(mask, 0, image).reshape(32, 2, 32, 2).sum(axis=(1, 3))
        expected = np.where(good > 0, sums / np.maximum(good, 1), 0.0)
        np.testing.assert_allclose(item.image, expected, rtol=1e-6)
        assert item.image.max() < 100  # no 65000 leaked into any bin
