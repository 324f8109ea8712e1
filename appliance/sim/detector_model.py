"""What a real pixel detector does to the photons: chip gaps, dead pixels, gain spread, background.

A frame is the central ``frame_size`` x ``frame_size`` window of a tiled
detector, one frame pixel per detector pixel, centred (pixel F/2) on the
middle of a module, where the beam of a centred detector falls:

- ``eiger``: an Eiger X tiling. Chips of 256 x 256 pixels with 2-pixel gaps,
  modules of 2 x 4 chips (514 rows x 1030 columns), 37 gap rows between
  module rows and 10 gap columns between module columns. The frame's centre
  is the module's central chip-gap cross, so a 128 frame has a 2-pixel cross
  through its centre, and a 516 frame that cross plus gap rows at its top
  and bottom edges (the module is 514 rows tall) and gap columns at its side
  edges (the next chip gaps).
- ``medipix``: a 2 x 2 quad of 256-pixel chips with a 3-pixel gap cross;
  pixels off the quad (one column and row of a 516 frame) count nothing.

Gaps and dead pixels read 0. Dead pixels and gains are fixed by the unit's
seed, the same for every scan made with it, like a real detector's.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from appliance.sim import physics
from appliance.sim.physics import DetectorSpec

DEAD_STREAM = 2  # random streams of the unit's seed (three-word seeds, apart from frame noise)
GAIN_STREAM = 3


class Axis(NamedTuple):
    """The tiling along one direction of the detector."""

    chip_px: int
    chip_gap_px: int
    chips_per_module: int
    module_gap_px: Optional[int]  # None: a single module, no sensor beyond it


GEOMETRY: Dict[str, Tuple[Axis, Axis]] = {  # (rows, columns) for each layout but "none"
    "eiger": (Axis(256, 2, 2, 37), Axis(256, 2, 4, 10)),
    "medipix": (Axis(256, 3, 2, None), Axis(256, 3, 2, None)),
}


class DetectorUnit:
    """One physical detector: its spec, and the bad pixels and gains its seed fixes."""

    def __init__(self, spec: DetectorSpec, seed: int) -> None:
        self.spec = spec
        self.bad_pixels = detector_mask(spec, seed)
        self.gain = gain_map(spec, seed) if spec.flat_field_error else None

    def record(self, expected: np.ndarray, noise_seeds: Sequence[Tuple[int, int]]) -> np.ndarray:
        """Frames of ``expected`` photons as this unit counts them (see :func:`physics.record`)."""
        mean = expected if self.gain is None else expected * self.gain
        if self.spec.background:
            mean = mean + self.spec.background
        frames = physics.record(mean, self.spec, noise_seeds)
        frames[:, self.bad_pixels] = 0
        return frames


def detector_mask(spec: DetectorSpec, seed: int) -> np.ndarray:
    """(frame_size, frame_size) bool, True at gaps and dead pixels.

    Saved with ``np.save``, it is a mask file for the appliance's ``preprocess.mask``.
    """
    size = spec.frame_size
    mask = np.zeros((size, size), dtype=bool)
    if spec.layout in GEOMETRY:
        rows, columns = GEOMETRY[spec.layout]
        mask |= gaps(rows, size)[:, None] | gaps(columns, size)[None, :]
    if spec.dead_fraction:
        mask |= np.random.default_rng([seed, 0, DEAD_STREAM]).random((size, size)) < spec.dead_fraction
    return mask


def gain_map(spec: DetectorSpec, seed: int) -> np.ndarray:
    """Per-pixel gain, 1 on average with relative spread ``flat_field_error`` (never negative)."""
    rng = np.random.default_rng([seed, 0, GAIN_STREAM])
    gain = 1.0 + spec.flat_field_error * rng.standard_normal((spec.frame_size, spec.frame_size))
    return np.clip(gain, 0.0, None)


def gaps(axis: Axis, length: int) -> np.ndarray:
    """(length,) bool: True where a frame row (or column) is not on a chip."""
    module = axis.chips_per_module * axis.chip_px + (axis.chips_per_module - 1) * axis.chip_gap_px
    coord = np.arange(length) - length // 2 + module // 2  # module coordinate; the module's centre at the frame's
    if axis.module_gap_px is None:
        off_module = (coord < 0) | (coord >= module)
    else:
        coord = np.mod(coord, module + axis.module_gap_px)
        off_module = coord >= module
    between_chips = np.clip(coord, 0, module - 1) % (axis.chip_px + axis.chip_gap_px) >= axis.chip_px
    return off_module | between_chips
