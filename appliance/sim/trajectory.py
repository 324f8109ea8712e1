"""Scan trajectories: where the beam sits on the sample for each frame.

Positions are (x, y) offsets in metres from the scan centre. ``step_m`` means
the same thing for both patterns, the spacing between neighbouring points, so
the overlap between neighbouring illuminations is ``1 - step / beam diameter``
for either.

A real stage is neither where it reports nor still while it counts:
``position_error_m`` is the spread of the actual positions around the nominal
ones, and ``fly_blur_m`` the beam's travel along x (the fast axis of a raster)
during one exposure of a fly scan. Both are 0 by default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from appliance.schema import check

SPIRAL = "spiral"
RASTER = "raster"
GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))
FLY_SUBPOSITIONS = 7  # beam positions averaged over one fly-scan exposure
POSITION_STREAM = 1  # the random stream of the position errors, apart from the frames' noise


@dataclass(frozen=True)
class ScanConfig:
    pattern: str = field(default=SPIRAL, metadata=check(lambda v: v in (SPIRAL, RASTER), "spiral or raster"))
    points: int = field(default=1000, metadata=check(lambda v: 1 <= v <= 10**7, "1..10000000"))
    step_m: float = field(default=150e-9, metadata=check(lambda v: 0 < v < 1e-3, "0 < step < 1 mm"))
    position_error_m: float = field(default=0.0, metadata=check(lambda v: 0 <= v <= 1e-5, "0..10 um (sigma per axis)"))
    fly_blur_m: float = field(default=0.0, metadata=check(lambda v: 0 <= v <= 1e-5, "0..10 um of travel per exposure"))


def positions(config: ScanConfig) -> np.ndarray:
    """(points, 2) array of (x, y) in metres, in acquisition order."""
    if config.pattern == SPIRAL:
        return fermat_spiral(config.points, config.step_m)
    return raster(config.points, config.step_m)


def fermat_spiral(points: int, step_m: float) -> np.ndarray:
    """Fermat spiral r_n = c sqrt(n), theta_n = n * golden angle: uniform density, no grid artefacts.

    Every point owns the area pi c^2; choosing c = step / sqrt(pi) makes that
    step^2, so the spiral and a raster of the same step cover the same area per
    point.
    """
    n = np.arange(points, dtype=np.float64)
    radius = step_m / math.sqrt(math.pi) * np.sqrt(n)
    theta = n * GOLDEN_ANGLE
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)


def raster(points: int, step_m: float) -> np.ndarray:
    """Row-by-row grid (x fast, y slow) of ``ceil(sqrt(points))`` columns, centred on 0."""
    columns = int(math.ceil(math.sqrt(points)))
    rows = int(math.ceil(points / columns))
    index = np.arange(points)
    x = (index % columns - (columns - 1) / 2.0) * step_m
    y = (index // columns - (rows - 1) / 2.0) * step_m
    return np.stack([x, y], axis=1)


def actual_positions(config: ScanConfig, nominal: np.ndarray, seed: int) -> np.ndarray:
    """Where the beam really was: ``nominal`` plus Gaussian errors of sigma ``position_error_m`` per axis.

    The errors come from their own stream of ``seed`` (a three-word seed, which
    no frame's two-word noise seed equals), so turning them on leaves the
    counting noise as it was.
    """
    if not config.position_error_m:
        return nominal.copy()
    rng = np.random.default_rng([seed, 0, POSITION_STREAM])
    return nominal + rng.normal(0.0, config.position_error_m, nominal.shape)


def fly_offsets(config: ScanConfig) -> np.ndarray:
    """x offsets in metres of the beam during one exposure, relative to its mid-exposure position.

    Midpoints of equal parts of the travel, so their average is the exposure's
    time average; one offset, 0, for a step scan.
    """
    if not config.fly_blur_m:
        return np.zeros(1)
    return ((np.arange(FLY_SUBPOSITIONS) + 0.5) / FLY_SUBPOSITIONS - 0.5) * config.fly_blur_m
