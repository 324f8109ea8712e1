"""Samples: phase maps of etched training patterns and of unseen test shapes.

A lithographic test sample is a thin film with features etched to roughly one
depth, so its phase is a few levels between 0 (no material removed, the
background) and ``max_phase_rad``, and its absorption follows the same
thickness: amplitude = exp(-absorption_ratio * phase) with absorption_ratio the
material's beta/delta. Training and test samples come from different
generators on purpose: random etchings (blobs, ellipses, polygons) for
training; digits, letters and straight lines for testing, so a good score on
the test sample measures generalisation and not memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

import numpy as np

from appliance.schema import check
from appliance.sim.glyphs import GLYPHS, draw_segments, glyph_segments

TRAINING = "etched"
TESTING = "shapes"


@dataclass(frozen=True)
class ObjectConfig:
    """What the sample is made of and which generator draws it."""

    kind: str = field(default=TESTING, metadata=check(lambda v: v in (TRAINING, TESTING), "etched or shapes"))
    max_phase_rad: float = field(default=1.0, metadata=check(lambda v: 0 < v <= np.pi, "0 < phase <= pi"))
    absorption_ratio: float = field(default=0.1, metadata=check(lambda v: 0 <= v <= 1, "beta/delta in 0..1"))
    stroke_px: float = field(default=7.0, metadata=check(lambda v: 1 <= v <= 64, "1..64 pixels"))
    glyph_height_px: Tuple[float, float] = field(
        default=(50.0, 80.0), metadata=check(lambda v: 8 <= v[0] <= v[1], "8 <= low <= high pixels")
    )


def transmission(phase: np.ndarray, absorption_ratio: float) -> np.ndarray:
    """Complex transmission of a thin film whose phase and absorption come from one thickness map."""
    return np.exp((1j - absorption_ratio) * phase.astype(np.float64)).astype(np.complex64)


def make_phase(config: ObjectConfig, shape: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    if config.kind == TRAINING:
        return etched_phase(shape, rng, config.max_phase_rad)
    return shapes_phase(shape, rng, config)


def etched_phase(shape: Tuple[int, int], rng: np.random.Generator, max_phase: float) -> np.ndarray:
    """Random etchings: smooth-noise blobs at two scales plus ellipses and polygons, each its own depth.

    Depths vary between 0.5 and 1 of ``max_phase`` so the network learns the
    edges and levels of the film rather than one fixed step height.
    """
    phase = np.zeros(shape, dtype=np.float32)
    for _ in range(int(rng.integers(1, 3))):
        sigma = rng.uniform(2.0, 9.0)
        noise = _smooth(rng.standard_normal(shape), sigma)
        mask = noise > np.quantile(noise, rng.uniform(0.7, 0.9))
        np.maximum(phase, mask * _depth(rng, max_phase), out=phase)
    area = shape[0] * shape[1]
    for _ in range(int(rng.poisson(area / 6000.0)) + 1):
        _draw_ellipse(phase, rng, _depth(rng, max_phase))
    for _ in range(int(rng.poisson(area / 8000.0)) + 1):
        _draw_polygon(phase, rng, _depth(rng, max_phase))
    return _smooth(phase, 0.6).astype(np.float32)


def shapes_phase(shape: Tuple[int, int], rng: np.random.Generator, config: ObjectConfig) -> np.ndarray:
    """Digits, letters and straight lines laid out on a jittered grid, all at one etch depth.

    Every grid cell holds a glyph in a random pose, except about one in five
    that holds a pair of lines of differing widths.
    """
    phase = np.zeros(shape, dtype=np.float32)
    depth = 0.9 * config.max_phase_rad
    low, high = config.glyph_height_px
    cell = high * 1.25
    rows = max(int(shape[0] // cell), 1)
    cols = max(int(shape[1] // cell), 1)
    chars = sorted(GLYPHS)
    for row in range(rows):
        for col in range(cols):
            centre = (
                (col + 0.5) * shape[1] / cols + rng.uniform(-0.1, 0.1) * cell,
                (row + 0.5) * shape[0] / rows + rng.uniform(-0.1, 0.1) * cell,
            )
            if rng.random() < 0.2:
                _draw_lines(phase, rng, centre, high, config.stroke_px, depth)
                continue
            char = chars[int(rng.integers(len(chars)))]
            segments = glyph_segments(char, rng.uniform(low, high), rng.uniform(-0.4, 0.4), centre)
            draw_segments(phase, segments, config.stroke_px, depth)
    return phase


def _draw_lines(
    phase: np.ndarray, rng: np.random.Generator, centre: Tuple[float, float], size: float, stroke: float, depth: float
) -> None:
    for _ in range(2):
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.25, 0.25) * size
        dx, dy = np.cos(angle) * size / 2, np.sin(angle) * size / 2
        cx, cy = centre[0] - dy / (size / 2) * offset, centre[1] + dx / (size / 2) * offset
        segment = np.array([[[cx - dx, cy - dy], [cx + dx, cy + dy]]])
        draw_segments(phase, segment, stroke * rng.uniform(0.6, 1.4), depth)


def _depth(rng: np.random.Generator, max_phase: float) -> float:
    return float(rng.uniform(0.5, 1.0) * max_phase)


def _draw_ellipse(phase: np.ndarray, rng: np.random.Generator, depth: float) -> None:
    cy, cx = rng.uniform(0, phase.shape[0]), rng.uniform(0, phase.shape[1])
    a, b = rng.uniform(3, 30), rng.uniform(3, 30)
    angle = rng.uniform(0, np.pi)
    y0, y1 = int(max(cy - 31, 0)), int(min(cy + 32, phase.shape[0]))
    x0, x1 = int(max(cx - 31, 0)), int(min(cx + 32, phase.shape[1]))
    if y0 >= y1 or x0 >= x1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1]
    u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
    v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
    inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    region = phase[y0:y1, x0:x1]
    np.maximum(region, inside * depth, out=region)


def _draw_polygon(phase: np.ndarray, rng: np.random.Generator, depth: float) -> None:
    """A random convex polygon: the intersection of the half-planes of its edges."""
    cy, cx = rng.uniform(0, phase.shape[0]), rng.uniform(0, phase.shape[1])
    radius = rng.uniform(5, 30)
    angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
    px, py = cx + radius * np.cos(angles), cy + radius * np.sin(angles)
    y0, y1 = int(max(cy - radius - 1, 0)), int(min(cy + radius + 2, phase.shape[0]))
    x0, x1 = int(max(cx - radius - 1, 0)), int(min(cx + radius + 2, phase.shape[1]))
    if y0 >= y1 or x0 >= x1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1]
    inside = np.ones(ys.shape, dtype=bool)
    for i in range(len(angles)):
        ax, ay, bx, by = px[i], py[i], px[(i + 1) % len(angles)], py[(i + 1) % len(angles)]
        inside &= (bx - ax) * (ys - ay) - (by - ay) * (xs - ax) >= 0
    region = phase[y0:y1, x0:x1]
    np.maximum(region, inside * depth, out=region)


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur by FFT (periodic edges do not matter for random textures)."""
    ky = np.fft.fftfreq(image.shape[0])[:, None]
    kx = np.fft.rfftfreq(image.shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (ky ** 2 + kx ** 2))
    return np.fft.irfft2(np.fft.rfft2(image) * kernel, s=image.shape)
