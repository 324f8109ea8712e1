"""Stitching geometry: where patches land, sub-pixel placement, resets, the memory bound."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from appliance.mosaic import Mosaic, make_window

PIXEL = 10e-9


def test_a_patch_lands_centred_on_its_position():
    mosaic = Mosaic(PIXEL, make_window((16, 16), "flat"))
    mosaic.add(np.full((16, 16), 2.0, np.float32), (100 * PIXEL, 50 * PIXEL), unique_id=1)
    picture = mosaic.snapshot()
    rows, cols = np.nonzero(picture.covered)
    # Global pixel of canvas [0, 0] from the origin; the patch spans rows 42..57 and columns 92..107.
    row0 = round(picture.origin_m[1] / PIXEL)
    col0 = round(picture.origin_m[0] / PIXEL)
    assert (rows.min() + row0, rows.max() + row0) == (42, 57)
    assert (cols.min() + col0, cols.max() + col0) == (92, 107)
    np.testing.assert_allclose(picture.phase[picture.covered], 2.0)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.8])
def test_sub_pixel_positions_shift_the_patch_by_that_fraction(fraction):
    mosaic = Mosaic(PIXEL, make_window((16, 16), "flat"))
    ramp = np.tile(np.arange(16, dtype=np.float32), (16, 1))  # value = column within the patch
    x = (100 + fraction) * PIXEL
    mosaic.add(ramp, (x, 50 * PIXEL), unique_id=1)
    picture = mosaic.snapshot()
    col0 = round(picture.origin_m[0] / PIXEL)
    left_exact = 100 + fraction - 8  # the patch's left edge in global pixels
    row = np.nonzero(picture.covered.any(axis=1))[0][5]
    for col in range(int(np.ceil(left_exact)) + 1, int(left_exact) + 15):
        assert picture.phase[row, col - col0] == pytest.approx(col - left_exact, abs=1e-5)


def test_overlapping_patches_are_averaged_with_their_window_weights():
    mosaic = Mosaic(PIXEL, make_window((8, 8), "hann"))
    mosaic.add(np.full((8, 8), 1.0, np.float32), (0.0, 0.0), 1)
    mosaic.add(np.full((8, 8), 3.0, np.float32), (2 * PIXEL, 0.0), 2)
    picture = mosaic.snapshot()
    values = picture.phase[picture.covered]
    assert values.min() == pytest.approx(1.0) and values.max() == pytest.approx(3.0)
    window = make_window((8, 8), "hann")
    # Where both overlap, the value is the window-weighted mean of 1 and 3.
    row = np.nonzero(picture.covered.any(axis=1))[0][4]
    col0 = round(picture.origin_m[0] / PIXEL)
    global_col = 0  # column 4 of patch 1 (left edge -4), column 2 of patch 2 (left edge -2)
    w1, w2 = window[4, 4], window[4, 2]
    assert picture.phase[row, global_col - col0] == pytest.approx((w1 * 1 + w2 * 3) / (w1 + w2), rel=1e-5)


def test_ids_going_back_or_a_reset_start_a_new_mosaic():
    mosaic = Mosaic(PIXEL, make_window((8, 8), "flat"))
    mosaic.add(np.ones((8, 8), np.float32), (0.0, 0.0), 10)
    mosaic.add(np.ones((8, 8), np.float32), (500 * PIXEL, 0.0), 1)  # a new acquisition
    assert mosaic.counts["resets"] == 1
    assert mosaic.snapshot().covered.sum() == 64
    mosaic.reset()
    assert mosaic.snapshot().phase.size == 0 and mosaic.counts["resets"] == 2


def test_frames_without_positions_are_counted_not_stitched():
    mosaic = Mosaic(PIXEL, make_window((8, 8), "hann"))
    mosaic.add(np.ones((8, 8), np.float32), None, 1)
    assert mosaic.counts == {"stitched": 0, "unplaced": 1, "outside": 0, "resets": 0}


def test_memory_is_bounded_whatever_the_motors_report():
    mosaic = Mosaic(PIXEL, make_window((16, 16), "hann"), max_pixels=200 * 200)
    rng = np.random.default_rng(0)
    for uid in range(1, 200):
        x, y = rng.uniform(-1e-3, 1e-3, 2)  # up to 100000 pixels apart
        mosaic.add(np.ones((16, 16), np.float32), (x, y), uid)
    picture = mosaic.snapshot()
    assert picture.phase.size <= 200 * 200
    assert mosaic.counts["outside"] > 150 and mosaic.counts["stitched"] >= 1


def test_a_fixed_extent_keeps_its_size():
    mosaic = Mosaic(PIXEL, make_window((8, 8), "hann"), extent_m=(0.0, 100 * PIXEL, 0.0, 50 * PIXEL))
    shape = mosaic.snapshot().phase.shape
    mosaic.add(np.ones((8, 8), np.float32), (50 * PIXEL, 25 * PIXEL), 1)
    mosaic.add(np.ones((8, 8), np.float32), (1000 * PIXEL, 25 * PIXEL), 2)
    assert mosaic.snapshot().phase.shape == shape and mosaic.counts["outside"] == 1


def test_a_snapshot_counts_exactly_the_patches_it_holds_while_patches_arrive():
    # P:Mosaic's uniqueId is this count: read after the canvas, it once named a patch the image lacked.
    mosaic = Mosaic(PIXEL, make_window((8, 8), "flat"))
    patches = 100

    def stitch():
        for index in range(patches):  # 10 pixels apart: no two overlap
            mosaic.add(np.ones((8, 8), np.float32), ((10 + 10 * index) * PIXEL, 10 * PIXEL), unique_id=index + 1)

    worker = threading.Thread(target=stitch)
    worker.start()
    seen = []
    while worker.is_alive() or not seen:
        picture = mosaic.snapshot()
        seen.append((int(picture.covered.sum()), picture.stitched))
    worker.join()
    assert all(covered == 64 * stitched for covered, stitched in seen), [s for s in seen if s[0] != 64 * s[1]][:5]
    assert mosaic.snapshot().stitched == patches
