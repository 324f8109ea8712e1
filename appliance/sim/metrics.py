"""How close a phase image is to the truth, in figures that cannot flatter: numpy only.

SSIM follows Wang et al. (2004): Gaussian window sigma 1.5, K1 = 0.01,
K2 = 0.03, the mean of the SSIM map. ``data_range`` defaults to the truth's
range (max - min), because phase images have no fixed white level. A mask
limits every figure to the scanned area, where there is anything to compare.

A phase is known only up to a constant (an iterative reconstruction picks its
own), so :func:`phase_figures` removes the global offset before scoring, and
says how much better the estimate is than the all-zero image (its *skill*):
a sparse sample scores a high SSIM for a blank image, skill does not.
Resolution is the Fourier ring correlation against the truth at the 1/7
threshold (Rosenthal and Henderson 2003), given as the full period 1/f.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

_SIGMA = 1.5
_RADIUS = 5  # 11-tap window, as in the reference implementation
FRC_THRESHOLD = 1.0 / 7.0
_FRC_TAPER_PX = 4.0  # the soft edge of the FRC's analysis window, so the mask's rim adds no false high frequencies


def phase_rmse(estimate: np.ndarray, truth: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    diff = np.asarray(estimate, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    if mask is not None:
        diff = diff[mask]
    return float(np.sqrt(np.mean(diff ** 2)))


def global_offset(estimate: np.ndarray, truth: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """The constant by which ``estimate`` sits above ``truth``: the circular mean of their difference.

    Circular, so that a reconstruction whose phases wrap at +-pi still gets its true offset.
    """
    diff = np.asarray(estimate, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    if mask is not None:
        diff = diff[mask]
    return float(np.angle(np.mean(np.exp(1j * diff))))


def skill(estimate: np.ndarray, truth: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """1 - MSE(estimate) / MSE(all-zero image), both after offset removal.

    After offset removal the all-zero image is the truth's mean, so skill is the
    fraction of the truth's phase variance the estimate explains: 1 is perfect,
    0 is no better than a blank image, negative is worse than one.
    """
    shown = np.asarray(truth)[mask] if mask is not None else np.asarray(truth)
    if np.ptp(shown) == 0:  # not baseline == 0: the offset's round trip through exp/angle leaves ~1e-32
        raise ValueError("skill needs a truth that is not constant over the mask")
    aligned = np.asarray(estimate, dtype=np.float64) - global_offset(estimate, truth, mask)
    zero = np.zeros(np.shape(truth))
    baseline = phase_rmse(zero - global_offset(zero, truth, mask), truth, mask) ** 2
    return 1.0 - phase_rmse(aligned, truth, mask) ** 2 / baseline


def phase_figures(
    estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray, pixel_size_m: float
) -> Dict[str, float]:
    """Everything one table row reports for a phase image against its truth (over ``mask``)."""
    offset = global_offset(estimate, truth, mask)
    aligned = np.asarray(estimate, dtype=np.float64) - offset
    zero = np.full(np.shape(truth), -global_offset(np.zeros(np.shape(truth)), truth, mask))
    return {
        "rmse_rad": phase_rmse(aligned, truth, mask),
        "ssim": ssim(aligned, truth, mask),
        "skill": skill(estimate, truth, mask),
        "frc_resolution_nm": frc_resolution(aligned, truth, pixel_size_m, mask) * 1e9,
        "offset_rad": offset,
        "zero_rmse_rad": phase_rmse(zero, truth, mask),
        "zero_ssim": ssim(zero, truth, mask),
    }


def ssim(
    estimate: np.ndarray,
    truth: np.ndarray,
    mask: Optional[np.ndarray] = None,
    data_range: Optional[float] = None,
) -> float:
    """Mean structural similarity of two 2-D images (over ``mask`` where given)."""
    return float(ssim_map(estimate, truth, data_range)[mask if mask is not None else Ellipsis].mean())


def ssim_map(estimate: np.ndarray, truth: np.ndarray, data_range: Optional[float] = None) -> np.ndarray:
    x = np.asarray(estimate, dtype=np.float64)
    y = np.asarray(truth, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError("ssim needs two 2-D images of one shape, got {} and {}".format(x.shape, y.shape))
    if data_range is None:
        data_range = float(y.max() - y.min()) or 1.0
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mx, my = _blur(x), _blur(y)
    vx = _blur(x * x) - mx * mx
    vy = _blur(y * y) - my * my
    cov = _blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def frc(
    a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Fourier ring correlation of two 2-D images: (ring radius in cycles per pixel, correlation).

    Both images are cut to the mask's bounding box (padded square), their means
    over the mask removed, and multiplied by a window that falls smoothly to zero
    at the mask's rim, so the window's own edge is not counted as detail the two
    images share. Rings are
    one frequency step wide, from the first above zero to Nyquist.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError("frc needs two 2-D images of one shape, got {} and {}".format(x.shape, y.shape))
    region = np.ones(x.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if not region.any():
        raise ValueError("frc needs a mask with at least one pixel set")
    rows, cols = np.nonzero(region)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    region, x, y = region[box], x[box], y[box]
    taper = _blur(region.astype(np.float64), sigma=_FRC_TAPER_PX, radius=int(3 * _FRC_TAPER_PX), mode="constant")
    window = np.clip(2.0 * taper - 1.0, 0.0, 1.0) ** 2  # 0 at the rim and flat into it: no step for the FFT to see
    size = max(region.shape)
    spectra = []
    for image in (x, y):
        square = np.zeros((size, size))
        square[: image.shape[0], : image.shape[1]] = (image - image[region].mean()) * window
        spectra.append(np.fft.fftshift(np.fft.fft2(square)))
    freq = np.fft.fftshift(np.fft.fftfreq(size))
    ring = np.rint(np.hypot(freq[:, None], freq[None, :]) * size).astype(int).ravel()
    rings = size // 2
    cross = np.bincount(ring, (spectra[0] * np.conj(spectra[1])).real.ravel(), minlength=rings + 1)
    power_a = np.bincount(ring, (np.abs(spectra[0]) ** 2).ravel(), minlength=rings + 1)
    power_b = np.bincount(ring, (np.abs(spectra[1]) ** 2).ravel(), minlength=rings + 1)
    k = np.arange(1, rings + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = cross[k] / np.sqrt(power_a[k] * power_b[k])
    return k / float(size), np.nan_to_num(curve, nan=0.0)


def frc_resolution(
    a: np.ndarray,
    b: np.ndarray,
    pixel_size_m: float,
    mask: Optional[np.ndarray] = None,
    threshold: float = FRC_THRESHOLD,
) -> float:
    """The period (m) at which the FRC first falls below ``threshold``, between rings linearly.

    Never falling below means the images agree to the pixel grid's limit, so the
    answer is the Nyquist period (two pixels); below at the first ring means they
    share nothing finer than the field, so the answer is infinite.
    """
    frequency, curve = frc(a, b, mask)
    below = np.nonzero(curve < threshold)[0]
    if not below.size:
        return 2.0 * pixel_size_m
    first = int(below[0])
    if first == 0:
        return float("inf")
    f0, f1 = frequency[first - 1], frequency[first]
    c0, c1 = curve[first - 1], curve[first]
    crossing = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0)
    return float(pixel_size_m / crossing)


def _blur(image: np.ndarray, sigma: float = _SIGMA, radius: int = _RADIUS, mode: str = "edge") -> np.ndarray:
    """Separable Gaussian filter that keeps the image's shape; outside it is the edge repeated
    (SSIM) or zero (``mode="constant"``: a mask's taper falls off at the image border too)."""
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, radius, mode=mode)
    rows = sum(taps[k] * padded[k : k + image.shape[0], :] for k in range(len(taps)))
    return sum(taps[k] * rows[:, k : k + image.shape[1]] for k in range(len(taps)))
