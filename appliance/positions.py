"""Motor readings to mosaic coordinates: the detector.positions scale, sign and axis swap.

Beamlines report sample positions in the motors' own units (um, mm, encoder
counts) and axes (a stage mounted turned, a motor counting the other way); the
mosaic works in metres on the beam's view of the sample. Applied once per
stitched frame, to a position that ntndarray already found finite.
"""
from __future__ import annotations

from typing import Optional, Tuple

from appliance.config import PositionAttributes

Position = Optional[Tuple[float, float]]


class PositionTransform:
    def __init__(self, settings: PositionAttributes) -> None:
        self._swap = settings.swap
        self._x = settings.sign[0] * settings.scale
        self._y = settings.sign[1] * settings.scale

    def __call__(self, reading: Position) -> Position:
        """(x, y) in metres from the (x attribute, y attribute) reading; None stays None (unplaced)."""
        if reading is None:
            return None
        first, second = (reading[1], reading[0]) if self._swap else reading
        return first * self._x, second * self._y
