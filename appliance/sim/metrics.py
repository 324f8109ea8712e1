"""How close a phase image is to the truth: RMSE and SSIM, numpy only.

SSIM follows Wang et al. (2004): Gaussian window sigma 1.5, K1 = 0.01,
K2 = 0.03, the mean of the SSIM map. ``data_range`` defaults to the truth's
range (max - min), because phase images have no fixed white level. A mask
limits both figures to the scanned area, where there is anything to compare.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

_SIGMA = 1.5
_RADIUS = 5  # 11-tap window, as in the reference implementation


def phase_rmse(estimate: np.ndarray, truth: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    diff = np.asarray(estimate, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    if mask is not None:
        diff = diff[mask]
    return float(np.sqrt(np.mean(diff ** 2)))


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


def _blur(image: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter with edge replication, so the map keeps the image's shape."""
    taps = np.exp(-0.5 * (np.arange(-_RADIUS, _RADIUS + 1) / _SIGMA) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, _RADIUS, mode="edge")
    rows = sum(taps[k] * padded[k : k + image.shape[0], :] for k in range(len(taps)))
    return sum(taps[k] * rows[:, k : k + image.shape[1]] for k in range(len(taps)))
