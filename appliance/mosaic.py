"""Live stitching: each phase patch lands at its frame's motor position.

Patches are added, weighted by a window that trusts the centre of the
illuminated area more than its edges, into running sums; the mosaic is
sum / weight wherever something landed. Positions are sub-pixel: each patch is
split over the four neighbouring integer placements with bilinear weights, as
the field's offline stitching interpolated. The canvas grows with the scan up
to a pixel budget, so memory stays bounded whatever the motors report.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

# Positions further out than this many object pixels are a motor glitch, not a scan (at 10 nm
# pixels it is 21 m): they count as outside, and NaN or Inf cannot reach the arithmetic.
_MAX_PIXEL_COORDINATE = 2.0 ** 31


def make_window(shape: Tuple[int, int], kind: str, sigma_px: float = 8.0) -> np.ndarray:
    """Per-pixel trust in a patch.

    A network's phase is best where the beam is brightest and poor where the
    beam never lit the sample, so the default is a Gaussian about the patch
    centre (the beam centre) of a width matching the beam's bright core; ``hann``
    spans the whole patch and ``flat`` trusts every pixel alike.
    """
    if kind == "flat":
        return np.ones(shape, dtype=np.float32)
    if kind == "gaussian":
        rows = np.exp(-0.5 * ((np.arange(shape[0]) - shape[0] / 2.0) / sigma_px) ** 2)
        cols = np.exp(-0.5 * ((np.arange(shape[1]) - shape[1] / 2.0) / sigma_px) ** 2)
        return np.outer(rows, cols).astype(np.float32)
    rows = np.sin(np.pi * (np.arange(shape[0]) + 0.5) / shape[0]) ** 2
    cols = np.sin(np.pi * (np.arange(shape[1]) + 0.5) / shape[1]) ** 2
    return np.outer(rows, cols).astype(np.float32)


class Mosaic:
    """Running weighted sums on a canvas in object pixels; thread-safe."""

    def __init__(
        self,
        pixel_size_m: float,
        window: np.ndarray,
        max_pixels: int = 2048 * 2048,
        extent_m: Optional[Tuple[float, float, float, float]] = None,
    ) -> None:
        """``window`` is the per-pixel weight of a patch (see :func:`make_window`); it sets the patch shape."""
        self.pixel_size_m = pixel_size_m
        self.patch_shape = (int(window.shape[0]), int(window.shape[1]))
        self.max_pixels = max_pixels
        self._window = np.asarray(window, dtype=np.float32)
        self._extent = extent_m
        self._lock = threading.Lock()
        self.counts: Dict[str, int] = {"stitched": 0, "unplaced": 0, "outside": 0, "resets": 0}
        self.last_outside = ""  # why the latest patch counted as outside was left out
        self._last_id: Optional[int] = None
        self._clear()

    def _clear(self) -> None:
        self._sums = np.zeros((0, 0), dtype=np.float32)
        self._weights = np.zeros((0, 0), dtype=np.float32)
        self._origin = (0, 0)  # canvas[0, 0] in global object pixels (row, column)
        if self._extent is not None:
            x_min, x_max, y_min, y_max = self._extent
            top, left = self._pixel(y_min), self._pixel(x_min)
            self._allocate((top, left), (self._pixel(y_max) + self.patch_shape[0] + 1, self._pixel(x_max) + self.patch_shape[1] + 1))

    def _pixel(self, metres: float) -> int:
        return int(math.floor(metres / self.pixel_size_m))

    def reset(self) -> None:
        with self._lock:
            self._clear()
            self._last_id = None
            self.counts["resets"] += 1

    def add(self, patch: np.ndarray, position: Optional[Tuple[float, float]], unique_id: int,
            late: bool = False) -> Optional[str]:
        """Stitch one phase patch centred at ``position`` (x, y in metres); ids going back start a new mosaic,
        except a ``late`` one (the collector let it out after later ids: it belongs to this scan).

        Returns why a placed patch was left out (it counts as ``outside``, and the
        reason stays in :attr:`last_outside`), None otherwise: a motor reading in
        the wrong units lands every point outside, and an operator must see why.
        """
        with self._lock:
            if not late:
                if self._last_id is not None and unique_id <= self._last_id:
                    self._clear()
                    self.counts["resets"] += 1
                self._last_id = unique_id
            if position is None:
                self.counts["unplaced"] += 1
                return None
            row = position[1] / self.pixel_size_m - self.patch_shape[0] / 2.0
            col = position[0] / self.pixel_size_m - self.patch_shape[1] / 2.0
            if not (abs(row) < _MAX_PIXEL_COORDINATE and abs(col) < _MAX_PIXEL_COORDINATE):  # NaN fails too
                return self._outside(unique_id, position, "over 2^31 mosaic pixels from the origin")
            top, left = int(math.floor(row)), int(math.floor(col))
            if not self._cover(top, left):
                return self._outside(unique_id, position, "beyond mosaic.extent_m" if self._extent is not None
                                     else "the canvas would exceed mosaic.max_pixels")
            self._splat(patch, top, left, row - top, col - left)
            self.counts["stitched"] += 1
            return None

    def _outside(self, unique_id: int, position: Tuple[float, float], why: str) -> str:
        self.counts["outside"] += 1
        self.last_outside = "uniqueId {}: position ({:.6g}, {:.6g}) m is outside the mosaic: {} " \
                            "(check detector.positions scale, sign and swap)".format(unique_id, position[0], position[1], why)
        return self.last_outside

    def _cover(self, top: int, left: int) -> bool:
        """Make the canvas hold a patch at (top, left) plus one pixel for interpolation; False if over budget."""
        bottom, right = top + self.patch_shape[0] + 1, left + self.patch_shape[1] + 1
        origin_row, origin_col = self._origin
        height, width = self._sums.shape
        if height and top >= origin_row and left >= origin_col and bottom <= origin_row + height and right <= origin_col + width:
            return True
        if self._extent is not None:
            return False
        if height:
            top, left = min(top, origin_row), min(left, origin_col)
            bottom, right = max(bottom, origin_row + height), max(right, origin_col + width)
        # Grow with a margin so a scan moving outwards does not reallocate every frame.
        margin = max(self.patch_shape)
        top, left, bottom, right = top - margin, left - margin, bottom + margin, right + margin
        if (bottom - top) * (right - left) > self.max_pixels:
            return False
        self._allocate((top, left), (bottom, right))
        return True

    def _allocate(self, top_left: Tuple[int, int], bottom_right: Tuple[int, int]) -> None:
        shape = (bottom_right[0] - top_left[0], bottom_right[1] - top_left[1])
        sums = np.zeros(shape, dtype=np.float32)
        weights = np.zeros(shape, dtype=np.float32)
        if self._sums.size:
            r, c = self._origin[0] - top_left[0], self._origin[1] - top_left[1]
            h, w = self._sums.shape
            sums[r : r + h, c : c + w] = self._sums
            weights[r : r + h, c : c + w] = self._weights
        self._sums, self._weights, self._origin = sums, weights, top_left

    def _splat(self, patch: np.ndarray, top: int, left: int, frac_row: float, frac_col: float) -> None:
        h, w = self.patch_shape
        r0, c0 = top - self._origin[0], left - self._origin[1]
        weighted = patch * self._window
        for dr, wr in ((0, 1.0 - frac_row), (1, frac_row)):
            for dc, wc in ((0, 1.0 - frac_col), (1, frac_col)):
                share = wr * wc
                if share <= 0.0:
                    continue
                rows, cols = slice(r0 + dr, r0 + dr + h), slice(c0 + dc, c0 + dc + w)
                self._sums[rows, cols] += share * weighted
                self._weights[rows, cols] += share * self._window

    def snapshot(self, min_weight: float = 1e-3) -> "MosaicImage":
        """The stitched phase (0 where nothing landed), its summed weights, where it sits, and the count of
        patches stitched so far (read with the canvas: a count read after it named a patch still missing)."""
        with self._lock:
            sums, weights, origin, stitched = self._sums.copy(), self._weights.copy(), self._origin, self.counts["stitched"]
        covered = weights > min_weight
        image = np.zeros_like(sums)
        image[covered] = sums[covered] / weights[covered]
        return MosaicImage(image, weights, covered, (origin[1] * self.pixel_size_m, origin[0] * self.pixel_size_m),
                           self.pixel_size_m, stitched)


@dataclass(frozen=True)
class MosaicImage:
    phase: np.ndarray
    weights: np.ndarray  # summed window weights: how much evidence each pixel has
    covered: np.ndarray  # bool: weights above the threshold the phase was computed with
    origin_m: Tuple[float, float]  # (x, y) of pixel [0, 0]'s corner
    pixel_size_m: float
    stitched: int  # patches stitched since the mosaic was made: a reset does not restart it (P:Mosaic's uniqueId only grows)
