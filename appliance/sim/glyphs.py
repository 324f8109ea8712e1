"""Digits, letters and lines drawn as thick strokes, without fonts.

The test samples must be shapes the network never saw in training (the
field's network was trained on random etchings and tested on numbers and
lines). Fonts would make the shapes depend on what the machine has installed;
a stroke table makes them the same everywhere, and anti-aliased thick segments
are what a lithographic pattern of a pen path looks like.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

Point = Tuple[float, float]
Polyline = Sequence[Point]

# Each glyph is a set of polylines on a box 4 units wide and 6 units tall, y down.
GLYPHS: Dict[str, Tuple[Polyline, ...]] = {
    "0": (((0, 0), (4, 0), (4, 6), (0, 6), (0, 0)), ((4, 0), (0, 6))),
    "1": (((1, 1), (2, 0), (2, 6)), ((1, 6), (3, 6))),
    "2": (((0, 1), (1, 0), (3, 0), (4, 1), (4, 2), (0, 6), (4, 6)),),
    "3": (((0, 0), (4, 0), (4, 6), (0, 6)), ((1, 3), (4, 3))),
    "4": (((3, 6), (3, 0), (0, 4), (4, 4)),),
    "5": (((4, 0), (0, 0), (0, 3), (3, 3), (4, 4), (4, 5), (3, 6), (0, 6)),),
    "6": (((4, 0), (1, 0), (0, 1), (0, 6), (4, 6), (4, 3), (0, 3)),),
    "7": (((0, 0), (4, 0), (1.5, 6)),),
    "8": (((0, 0), (4, 0), (4, 6), (0, 6), (0, 0)), ((0, 3), (4, 3))),
    "9": (((4, 3), (0, 3), (0, 0), (4, 0), (4, 5), (3, 6), (0, 6)),),
    "A": (((0, 6), (2, 0), (4, 6)), ((1, 3.5), (3, 3.5))),
    "E": (((4, 0), (0, 0), (0, 6), (4, 6)), ((0, 3), (3, 3))),
    "F": (((4, 0), (0, 0), (0, 6)), ((0, 3), (3, 3))),
    "H": (((0, 0), (0, 6)), ((4, 0), (4, 6)), ((0, 3), (4, 3))),
    "K": (((0, 0), (0, 6)), ((4, 0), (0, 3.5)), ((1.3, 2.7), (4, 6))),
    "L": (((0, 0), (0, 6), (4, 6)),),
    "M": (((0, 6), (0, 0), (2, 3), (4, 0), (4, 6)),),
    "N": (((0, 6), (0, 0), (4, 6), (4, 0)),),
    "P": (((0, 6), (0, 0), (4, 0), (4, 3), (0, 3)),),
    "R": (((0, 6), (0, 0), (4, 0), (4, 3), (0, 3), (4, 6)),),
    "T": (((0, 0), (4, 0)), ((2, 0), (2, 6))),
    "V": (((0, 0), (2, 6), (4, 0)),),
    "W": (((0, 0), (1, 6), (2, 2), (3, 6), (4, 0)),),
    "X": (((0, 0), (4, 6)), ((4, 0), (0, 6))),
    "Y": (((0, 0), (2, 3), (4, 0)), ((2, 3), (2, 6))),
    "Z": (((0, 0), (4, 0), (0, 6), (4, 6)),),
}
GLYPH_WIDTH = 4.0
GLYPH_HEIGHT = 6.0


def glyph_segments(char: str, height_px: float, angle_rad: float, centre: Point) -> np.ndarray:
    """The strokes of ``char`` as (n, 2, 2) segment end points (x, y) in pixels."""
    scale = height_px / GLYPH_HEIGHT
    cos, sin = np.cos(angle_rad), np.sin(angle_rad)
    segments: List[Tuple[Point, Point]] = []
    for line in GLYPHS[char]:
        segments.extend(zip(line[:-1], line[1:]))
    ends = np.asarray(segments, dtype=np.float64)  # (n, 2 ends, 2 coords)
    ends[..., 0] -= GLYPH_WIDTH / 2
    ends[..., 1] -= GLYPH_HEIGHT / 2
    ends *= scale
    x = ends[..., 0] * cos - ends[..., 1] * sin + centre[0]
    y = ends[..., 0] * sin + ends[..., 1] * cos + centre[1]
    return np.stack([x, y], axis=-1)


def draw_segments(canvas: np.ndarray, segments: np.ndarray, width_px: float, value: float) -> None:
    """Paint anti-aliased strokes of ``width_px`` into ``canvas`` (keeping the larger value).

    Only the segments' bounding box is touched, so a scan-sized sample with
    dozens of glyphs renders in milliseconds.
    """
    if len(segments) == 0:
        return
    half = width_px / 2 + 1
    x0 = max(int(np.floor(segments[..., 0].min() - half)), 0)
    x1 = min(int(np.ceil(segments[..., 0].max() + half)) + 1, canvas.shape[1])
    y0 = max(int(np.floor(segments[..., 1].min() - half)), 0)
    y1 = min(int(np.ceil(segments[..., 1].max() + half)) + 1, canvas.shape[0])
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    distance = np.full(ys.shape, np.inf)
    for (ax, ay), (bx, by) in segments:
        dx, dy = bx - ax, by - ay
        length2 = dx * dx + dy * dy
        t = ((xs - ax) * dx + (ys - ay) * dy) / length2 if length2 > 0 else np.zeros_like(xs)
        t = np.clip(t, 0.0, 1.0)
        np.minimum(distance, np.hypot(xs - ax - t * dx, ys - ay - t * dy), out=distance)
    coverage = np.clip(width_px / 2 - distance + 0.5, 0.0, 1.0) * value
    region = canvas[y0:y1, x0:x1]
    np.maximum(region, coverage.astype(canvas.dtype), out=region)
