"""The evaluation's figures on cases whose answer is known by construction."""
from __future__ import annotations

import numpy as np
import pytest

from appliance.sim.metrics import frc, frc_resolution, global_offset, phase_figures, skill, ssim
from appliance.sim.objects import ObjectConfig, shapes_phase

PIXEL = 10e-9


def glyph_truth() -> np.ndarray:
    """A sparse test sample: an all-zero image scores a high SSIM on it, which is the trap."""
    return shapes_phase((256, 256), np.random.default_rng(3), ObjectConfig())


def disc(size: int, radius: float) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    return np.hypot(rows - size / 2, cols - size / 2) < radius


def band_limited_pair(size: int, cutoff_rings: int):
    """White noise, and the same noise up to ``cutoff_rings`` with independent noise above it."""
    rng = np.random.default_rng(5)
    frequency = np.fft.fftfreq(size)
    radius = np.hypot(frequency[:, None], frequency[None, :]) * size
    a = rng.normal(size=(size, size))
    high = np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) * (radius > cutoff_rings)).real
    low = np.fft.ifft2(np.fft.fft2(a) * (radius <= cutoff_rings)).real
    return a, low + high


def test_the_all_zero_image_has_skill_zero_though_its_ssim_is_high():
    truth = glyph_truth()
    mask = disc(256, 110)
    zero = np.zeros_like(truth)
    assert skill(zero, truth, mask) == pytest.approx(0.0, abs=1e-12)
    figures = phase_figures(zero, truth, mask, PIXEL)
    assert figures["skill"] == pytest.approx(0.0, abs=1e-12)
    assert ssim(zero, truth, mask) > 0.75  # the trap: plain SSIM rewards a blank image on a sparse sample
    assert figures["ssim"] == pytest.approx(figures["zero_ssim"])
    assert figures["zero_ssim"] < 0.1  # with the offset removed it does not


def test_the_truth_itself_has_skill_one_and_a_noisy_copy_less():
    truth = glyph_truth()
    mask = disc(256, 110)
    assert skill(truth, truth, mask) == pytest.approx(1.0)
    noisy = truth + np.random.default_rng(1).normal(0, 0.1, truth.shape)
    variance = truth[mask].var()
    assert skill(noisy, truth, mask) == pytest.approx(1 - 0.01 / variance, rel=0.05)
    assert skill(-truth, truth, mask) < 0  # worse than blank: the contrast is inverted


@pytest.mark.parametrize("offset", [0.7, -2.5, 3.0])
def test_a_constant_offset_is_removed_before_scoring(offset):
    truth = glyph_truth()
    mask = disc(256, 110)
    estimate = truth + offset
    # 3.0 rad above a truth that reaches 0.9 rad wraps past pi: the circular mean still finds it.
    wrapped = np.angle(np.exp(1j * estimate))
    for image in (estimate, wrapped):
        assert global_offset(image, truth, mask) == pytest.approx(offset, abs=1e-6)
    figures = phase_figures(estimate, truth, mask, PIXEL)
    assert figures["offset_rad"] == pytest.approx(offset)
    assert figures["rmse_rad"] == pytest.approx(0.0, abs=1e-6)
    assert figures["ssim"] == pytest.approx(1.0)
    assert figures["skill"] == pytest.approx(1.0)
    assert ssim(estimate, truth, mask) < 0.9  # without the removal the offset would cost


def test_frc_of_a_band_limited_pair_crosses_at_its_cutoff():
    """Shared detail up to ring 32 of 256 pixels at 10 nm: the period 256 * 10 nm / 32 = 80 nm."""
    a, b = band_limited_pair(256, 32)
    frequency, curve = frc(a, b)
    assert np.all(curve[frequency * 256 <= 28] > 0.9)
    assert np.all(np.abs(curve[frequency * 256 >= 36]) < 0.2)
    assert frc_resolution(a, b, PIXEL) * 1e9 == pytest.approx(80.0, rel=0.05)
    # A soft-edged disc mask inside the image: the same answer, the rim adds no false detail.
    assert frc_resolution(a, b, PIXEL, disc(256, 100)) * 1e9 == pytest.approx(80.0, rel=0.05)


def test_frc_limits_identical_and_shifted_cutoffs():
    a, _ = band_limited_pair(128, 16)
    assert frc_resolution(a, a, PIXEL) == pytest.approx(2 * PIXEL)  # agree to the pixel grid's limit
    a, b = band_limited_pair(256, 64)
    assert frc_resolution(a, b, PIXEL) * 1e9 == pytest.approx(40.0, rel=0.05)


def test_frc_rejects_what_it_cannot_measure():
    with pytest.raises(ValueError, match="one shape"):
        frc(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="at least one pixel"):
        frc(np.zeros((4, 4)), np.zeros((4, 4)), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="not constant"):
        skill(np.zeros((4, 4)), np.ones((4, 4)))
