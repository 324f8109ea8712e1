"""Crop, bin and cast a received frame straight into its ring slot.

This is the one copy a frame gets on its way to the engine: cropping is a view,
binning reduces into the slot, and the cast to the engine's input dtype happens
in the same pass, so no temporary image is ever allocated per frame.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from appliance.ntndarray import FrameError


class Preprocessor:
    """The transform for frames of one shape; ingest keeps one per shape it has seen."""

    def __init__(
        self, frame_shape: Tuple[int, int], crop: Tuple[int, int, int, int], bin_factor: int
    ) -> None:
        top, bottom, left, right = crop
        height, width = frame_shape
        cropped = (height - top - bottom, width - left - right)
        if cropped[0] <= 0 or cropped[1] <= 0:
            raise FrameError(
                "shape", "frame {}x{} is smaller than the crop margins {}".format(height, width, list(crop))
            )
        if cropped[0] % bin_factor or cropped[1] % bin_factor:
            raise FrameError(
                "shape",
                "frame {}x{} cropped by {} gives {}x{}, not divisible by the bin factor {}".format(
                    height, width, list(crop), cropped[0], cropped[1], bin_factor
                ),
            )
        self.frame_shape = frame_shape
        self.rows = slice(top, height - bottom)
        self.columns = slice(left, width - right)
        self.bin = bin_factor
        self.output_shape = (cropped[0] // bin_factor, cropped[1] // bin_factor)
        # Bin sums accumulate here, not in the slot: a float16 slot would overflow mid-sum.
        self._sums = np.empty(self.output_shape, dtype=np.float32)

    def __call__(self, image: np.ndarray, out: np.ndarray) -> None:
        """Write the processed ``image`` into ``out`` (the slot, already in the engine's dtype)."""
        region = image[self.rows, self.columns]
        if self.bin == 1:
            np.copyto(out, region, casting="unsafe")
            return
        b = self.bin
        blocks = region.reshape(self.output_shape[0], b, self.output_shape[1], b)
        np.sum(blocks, axis=(1, 3), dtype=np.float32, out=self._sums)
        np.multiply(self._sums, 1.0 / (b * b), out=out, casting="unsafe")
