"""Crop, bin and cast a received frame straight into its ring slot, leaving bad pixels out.

This is the one copy a frame gets on its way to the engine: cropping is a view,
binning reduces into the slot, and the cast to the engine's input dtype happens
in the same pass, so no temporary image is ever allocated per frame.

Masked pixels (dead, hot, module gaps: ``preprocess.mask``) are left out of
their bin's mean rather than set to a value first: the mean of the remaining
pixels estimates the counts the bin would have had, so a dead pixel does not
darken its bin and a hot one does not brighten it, and the frame's total (which
the model divides by) stays right. The correction touches only the masked
pixels, after the block sum. A pixel with no unmasked neighbour in its bin (every
masked pixel when ``bin`` is 1, or a bin wholly inside a gap) has nothing to
average, so it gets ``preprocess.mask_fill``: 0 by default, what a module gap
reads, which is what a model trained on gapped frames saw there.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from appliance.ntndarray import FrameError

MaskSpec = Union[None, str, Sequence[Sequence[int]]]


def load_mask_file(path: str) -> np.ndarray:
    """A mask file as a boolean 2-D array (nonzero = masked); ValueError saying what is wrong with it."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError("{}: cannot be read as a .npy array ({})".format(path, exc)) from exc
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        raise ValueError("{}: holds shape {}; expected a 2-D array, the detector frame's shape".format(
            path, getattr(array, "shape", "?")))
    if array.dtype.kind not in "biu":
        raise ValueError("{}: holds {} values; expected bool or integers (nonzero = masked)".format(
            path, array.dtype.name))
    return array != 0


def frame_mask(spec: MaskSpec, shape: Tuple[int, int], loaded: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """The boolean mask (True = bad pixel) for raw frames of ``shape``, or None when nothing is masked.

    ``loaded`` is the file's array when ``spec`` names a file (read once, at start).
    FrameError("shape") when the mask does not fit frames of this shape.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        assert loaded is not None
        if loaded.shape != tuple(shape):
            raise FrameError("shape", "frame {}x{} but preprocess.mask {} is {}x{}".format(
                shape[0], shape[1], spec, loaded.shape[0], loaded.shape[1]))
        return loaded if loaded.any() else None
    mask = np.zeros(shape, dtype=bool)
    for entry in spec:
        rows = (entry[0], entry[0]) if len(entry) == 2 else (entry[0], entry[1])
        cols = (entry[1], entry[1]) if len(entry) == 2 else (entry[2], entry[3])
        if rows[1] >= shape[0] or cols[1] >= shape[1]:
            raise FrameError("shape", "frame {}x{} but preprocess.mask entry {} reaches row {}, column {}".format(
                shape[0], shape[1], list(entry), rows[1], cols[1]))
        mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return mask if mask.any() else None


class Preprocessor:
    """The transform for frames of one shape; ingest keeps one per shape it has seen."""

    def __init__(
        self,
        frame_shape: Tuple[int, int],
        crop: Tuple[int, int, int, int],
        bin_factor: int,
        mask: Optional[np.ndarray] = None,
        fill: float = 0.0,
    ) -> None:
        """``mask`` is :func:`frame_mask`'s answer for ``frame_shape`` (raw-frame coordinates)."""
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
        self._fill = fill
        self._masked: Optional[Tuple[np.ndarray, np.ndarray]] = None
        if mask is not None:
            self._set_mask(np.asarray(mask, dtype=bool)[self.rows, self.columns])

    def _set_mask(self, cropped: np.ndarray) -> None:
        """Precompute what each frame's correction needs: where the bad pixels are and what is left per bin."""
        rows, cols = np.nonzero(cropped)
        if not rows.size:
            return
        self._masked = (rows, cols)
        b = self.bin
        self._bins = (rows // b, cols // b)
        self._values = np.empty(rows.size, dtype=np.float32)
        good = b * b - cropped.reshape(self.output_shape[0], b, self.output_shape[1], b).sum(axis=(1, 3))
        self._scale = np.where(good > 0, 1.0 / np.maximum(good, 1), 0.0).astype(np.float32)
        self._empty = np.nonzero(good == 0)

    def __call__(self, image: np.ndarray, out: np.ndarray) -> None:
        """Write the processed ``image`` into ``out`` (the slot, already in the engine's dtype)."""
        region = image[self.rows, self.columns]
        if self.bin == 1:
            np.copyto(out, region, casting="unsafe")
            if self._masked is not None:
                out[self._masked] = self._fill
            return
        b = self.bin
        blocks = region.reshape(self.output_shape[0], b, self.output_shape[1], b)
        np.sum(blocks, axis=(1, 3), dtype=np.float32, out=self._sums)
        if self._masked is None:
            np.multiply(self._sums, 1.0 / (b * b), out=out, casting="unsafe")
            return
        self._values[:] = region[self._masked]
        np.subtract.at(self._sums, self._bins, self._values)
        np.multiply(self._sums, self._scale, out=out, casting="unsafe")
        out[self._empty] = self._fill
