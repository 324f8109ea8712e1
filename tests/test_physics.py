"""The simulator's physics and the shipped default model.

Every figure here is one a physicist would check by hand: photons are
conserved, counting noise is Poisson, the detector clips, the scan goes where
it says, the test sample is not made of training features, and the model file
in ``engines/`` reproduces what its author recorded.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest

from appliance.sim import physics, trajectory
from appliance.sim.metrics import phase_rmse, ssim
from appliance.sim.objects import TESTING, TRAINING, ObjectConfig, etched_phase, make_phase, shapes_phase
from appliance.sim.physics import DetectorSpec, ProbeConfig
from appliance.sim.scan import ScanSimulation, SimulationConfig, load_scan, save_scan
from appliance.sim.trajectory import ScanConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "engines", "ptychonn-small.onnx")


def small_config(**changes) -> SimulationConfig:
    """A 64-point scan: big enough for statistics, small enough to build in milliseconds."""
    base = SimulationConfig(seed=7, scan=ScanConfig(points=64))
    return replace(base, **changes)


# --- photons -----------------------------------------------------------------


@pytest.mark.parametrize("frame_size", [128, 516])
def test_noiseless_frame_of_pure_phase_object_holds_the_photon_budget(frame_size):
    config = small_config(
        sample=ObjectConfig(absorption_ratio=0.0),
        detector=DetectorSpec(frame_size=frame_size, photons=3.5e6),
    )
    sim = ScanSimulation(config)
    expected = sim.expected(range(4))
    assert expected.shape == (4, frame_size, frame_size)
    np.testing.assert_allclose(expected.sum(axis=(1, 2)), 3.5e6, rtol=1e-5)


def test_absorbing_sample_transmits_what_parseval_says():
    sim = ScanSimulation(small_config(detector=DetectorSpec(photons=1e6)))
    n = sim.config.patch_size
    centres = sim.centre_px(range(len(sim)))
    corners = np.floor(centres).astype(int) - n // 2
    probes = physics.shift_probe(sim.probe, centres - np.floor(centres))
    transmitted = np.array(
        [np.sum(np.abs(p * sim.object[r : r + n, c : c + n]) ** 2) for p, (r, c) in zip(probes, corners)]
    )
    index = int(np.argmin(transmitted))
    assert transmitted[index] < 0.99  # the test means something only if the sample absorbs there
    assert sim.expected([index]).sum() == pytest.approx(1e6 * transmitted[index], rel=1e-5)


def test_binned_516_frame_is_the_128_frame():
    """Crop [2:-2] and 4x4 binning of a 516 frame gives the 128 frame of the same scan point."""
    sim128 = ScanSimulation(small_config())
    sim516 = ScanSimulation(small_config(detector=DetectorSpec(frame_size=516)))
    fine = sim516.expected([3])[0]
    assert fine[:2].sum() == 0 and fine[:, -2:].sum() == 0  # dead border
    binned = fine[2:-2, 2:-2].reshape(128, 4, 128, 4).sum(axis=(1, 3))
    coarse = sim128.expected([3])[0]
    rows = np.arange(128)[:, None]
    assert (binned * rows).sum() / binned.sum() == pytest.approx((coarse * rows).sum() / coarse.sum(), abs=0.05)
    assert np.abs(binned - coarse).sum() / coarse.sum() < 0.05


def test_saturation_clips_at_the_detector_limit():
    detector = DetectorSpec(photons=1e8, saturation=1000, dtype="uint16")
    frames = ScanSimulation(small_config(detector=detector)).frame_batch([0, 1])
    assert frames.dtype == np.uint16
    assert frames.max() == 1000
    assert np.count_nonzero(frames == 1000) > 100
    unclipped = ScanSimulation(small_config(detector=replace(detector, saturation=2**31 - 1, dtype="int32")))
    assert unclipped.frame_batch([0]).max() > 1000


def test_counting_noise_is_poisson():
    detector = DetectorSpec(photons=1.0)
    mean = np.full((8, 64, 64), 50.0)
    counts = physics.record(mean, detector, [(3, i) for i in range(8)]).astype(np.float64)
    assert counts.mean() == pytest.approx(50.0, rel=0.01)
    assert counts.var() == pytest.approx(50.0, rel=0.05)
    assert np.all(counts == np.rint(counts))
    noiseless = physics.record(mean, replace(detector, poisson=False), [(3, i) for i in range(8)])
    assert np.all(noiseless == 50)


def test_frames_carry_noise_around_the_expected_counts():
    sim = ScanSimulation(small_config(detector=DetectorSpec(photons=1e7)))
    frame = sim.frame_batch([5])[0].astype(np.float64)
    expected = sim.expected([5])[0]
    bright = expected > 100
    z = (frame[bright] - expected[bright]) / np.sqrt(expected[bright])
    assert abs(z.mean()) < 0.1
    assert z.std() == pytest.approx(1.0, abs=0.1)


# --- probe --------------------------------------------------------------------


def test_probe_is_normalised_and_defocus_widens_it():
    focused = physics.make_probe(ProbeConfig(defocus_m=0.0), 128, 10e-9)
    defocused = physics.make_probe(ProbeConfig(defocus_m=60e-6), 128, 10e-9)
    for probe in (focused, defocused):
        assert np.sum(np.abs(probe) ** 2) == pytest.approx(1.0, rel=1e-5)
    # Airy core of a pupil of NA = lambda * 0.25 / 10 nm: first zero at 0.61 lambda / NA = 2.44 px,
    # so 1 px off centre the intensity is (2 J1(u) / u)^2 = 0.52 with u = 3.832 / 2.44
    profile = np.abs(focused[64, 64:80]) ** 2
    assert profile[1] / profile[0] == pytest.approx(0.52, abs=0.02)
    assert profile[3] / profile[0] < 0.02
    assert physics.beam_diameter_px(defocused) > 4 * physics.beam_diameter_px(focused)
    na = physics.wavelength_m(10.0) * 0.25 / 10e-9
    assert physics.beam_diameter_px(defocused) * 10e-9 == pytest.approx(2 * na * 60e-6, rel=0.25)


def test_far_field_of_the_probe_alone_is_the_pupil():
    probe = physics.make_probe(ProbeConfig(pupil_fraction=0.5, central_stop=0.3), 128, 10e-9)
    pattern = physics.far_field(probe[None], 1)[0]
    radius = np.hypot(*(np.indices(pattern.shape) - 64)) / 64
    inside = pattern[(radius < 0.45) & (radius > 0.2)].mean()
    assert pattern[(radius > 0.6)].mean() < 1e-2 * inside  # dark outside the pupil
    assert pattern[radius < 0.1].mean() < 0.1 * inside  # and behind the central stop


# --- scan geometry -----------------------------------------------------------------


def test_fermat_spiral_radius_grows_with_square_root_of_index():
    step = 100e-9
    points = trajectory.fermat_spiral(500, step)
    radius = np.hypot(points[:, 0], points[:, 1])
    np.testing.assert_allclose(radius ** 2, np.arange(500) * step ** 2 / np.pi, rtol=1e-9, atol=1e-30)
    angles = np.arctan2(points[1:, 1], points[1:, 0])
    turn = np.mod(np.diff(angles), 2 * np.pi)
    np.testing.assert_allclose(turn, trajectory.GOLDEN_ANGLE, atol=1e-9)
    distances = np.hypot(*(points[:, None, :] - points[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(distances, np.inf)
    nearest = np.median(distances.min(axis=1))
    assert 0.7 * step < nearest < 1.3 * step


def test_raster_steps_and_centre():
    points = trajectory.raster(20, 50e-9)  # 5 columns x 4 rows
    assert points.shape == (20, 2)
    np.testing.assert_allclose(np.unique(np.round(np.diff(points[:5, 0]), 15)), [50e-9])
    np.testing.assert_allclose(sorted(set(np.round(points[:, 1] / 50e-9, 9))), [-1.5, -0.5, 0.5, 1.5])
    np.testing.assert_allclose(points.mean(axis=0), 0.0, atol=1e-20)
    assert np.all(points[:5, 1] == points[0, 1])  # x fast, y slow


def test_overlap_follows_step_and_beam():
    overlapping = ScanSimulation(small_config(scan=ScanConfig(pattern="raster", points=16, step_m=100e-9)))
    apart = ScanSimulation(small_config(scan=ScanConfig(pattern="raster", points=16, step_m=900e-9)))
    beam = overlapping.beam_diameter_m
    assert overlapping.overlap == pytest.approx(1 - 100e-9 / beam)
    assert overlapping.overlap > 0.5 and apart.overlap < 0
    # without overlap, the beam discs of neighbouring points share no illuminated pixel
    n = apart.config.patch_size
    lit = np.abs(apart.probe) ** 2 > 1e-2 * np.max(np.abs(apart.probe) ** 2)
    shift = int(round(900e-9 / apart.pixel_size_m))
    assert shift < n and not np.any(lit[:, shift:] & lit[:, : n - shift])


def test_positions_and_ground_truth_patches_agree():
    sim = ScanSimulation(small_config())
    assert sim.positions_m.shape == (64, 2)
    point = next(sim.points(start=10, stop=11))
    assert (point.x_m, point.y_m) == tuple(sim.positions_m[10])
    assert point.phase.shape == (128, 128) and point.frame.shape == (128, 128)
    assert point.phase[64, 64] == pytest.approx(float(sim.sample_phase(point.x_m, point.y_m)), abs=1e-6)
    # at a position on the pixel grid the patch is a plain slice of the sample
    row, col = np.array(sim.object_phase.shape) // 2 + (3, -5)
    x = sim.origin_m[0] + col * sim.pixel_size_m
    y = sim.origin_m[1] + row * sim.pixel_size_m
    offsets = (np.arange(128) - 64) * sim.pixel_size_m
    patch = sim.sample_phase(x + offsets[None, :], y + offsets[:, None])
    np.testing.assert_allclose(patch, sim.object_phase[row - 64 : row + 64, col - 64 : col + 64], atol=1e-6)


def test_sample_covers_every_window():
    sim = ScanSimulation(SimulationConfig(scan=ScanConfig(points=300, step_m=150e-9)))
    corners = np.floor(sim.centre_px(range(len(sim)))).astype(int) - 64
    assert corners.min() >= 0
    assert np.all(corners.max(axis=0) + 129 <= np.array(sim.object_phase.shape))


# --- samples ------------------------------------------------------------------


def _erode(mask: np.ndarray, size: int) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(mask, size // 2), (size, size))
    return windows.all(axis=(-2, -1))


def _levels(values: np.ndarray) -> list:
    found, counts = np.unique(np.round(values, 2), return_counts=True)
    return [round(float(v), 2) for v in found[counts >= 0.02 * len(values)]]


def test_test_shapes_are_not_training_features():
    rng = np.random.default_rng(0)
    shapes = shapes_phase((400, 400), rng, ObjectConfig(stroke_px=7.0))
    etched = etched_phase((400, 400), rng, 1.0)
    # one etch depth for the shapes, several for the etchings (levels held by >= 2% of the inner pixels)
    assert _levels(shapes[_erode(shapes > 0.45, 3)]) == [0.9]
    assert len(_levels(etched[_erode(etched > 0.3, 5)])) >= 3
    # shapes are thin strokes that an 11-pixel erosion removes; etched features are bulky
    shape_mask, etched_mask = shapes > 0.45, etched > 0.3
    assert shape_mask.mean() > 0.05 and etched_mask.mean() > 0.05
    assert _erode(shape_mask, 11).sum() < 0.001 * shape_mask.sum()
    assert _erode(etched_mask, 11).sum() > 0.05 * etched_mask.sum()
    assert 0 <= shapes.min() and shapes.max() <= 1.0 and etched.max() <= 1.0


def test_same_seed_same_scan_and_frames_independent_of_batching():
    a, b = ScanSimulation(small_config()), ScanSimulation(small_config())
    np.testing.assert_array_equal(a.object_phase, b.object_phase)
    batch = a.frame_batch(range(8))
    np.testing.assert_array_equal(batch, b.frame_batch(range(8)))
    np.testing.assert_array_equal(batch[5], a.frame_batch([5])[0])
    c = ScanSimulation(small_config(seed=8))
    assert not np.array_equal(c.object_phase, a.object_phase)
    assert not np.array_equal(c.frame_batch([0]), batch[:1])


def test_object_kinds_are_chosen_by_config():
    rng = np.random.default_rng(1)
    assert make_phase(ObjectConfig(kind=TRAINING), (64, 64), rng).shape == (64, 64)
    assert make_phase(ObjectConfig(kind=TESTING), (64, 64), rng).shape == (64, 64)


def test_bad_frame_size_is_refused():
    with pytest.raises(ValueError, match="frame_size 201"):
        ScanSimulation(small_config(detector=DetectorSpec(frame_size=201)))


# --- files ---------------------------------------------------------------------------


def test_scan_written_as_npy_reads_back(tmp_path):
    sim = ScanSimulation(small_config(scan=ScanConfig(points=10)))
    saved = load_scan(save_scan(sim, str(tmp_path / "scan"), chunk=4))
    np.testing.assert_array_equal(saved.frames, sim.frame_batch(range(10)))
    np.testing.assert_array_equal(saved.positions_m, sim.positions_m)
    np.testing.assert_array_equal(saved.object_phase, sim.object_phase)
    assert saved.pixel_size_m == sim.pixel_size_m and saved.origin_m == tuple(sim.origin_m)
    assert json.loads(json.dumps(saved.metadata))["config"]["scan"]["points"] == 10


def test_scan_written_as_hdf5_reads_back(tmp_path):
    pytest.importorskip("h5py", reason="h5py is optional: .h5 output needs it")
    sim = ScanSimulation(small_config(scan=ScanConfig(points=6)))
    saved = load_scan(save_scan(sim, str(tmp_path / "scan.h5")))
    np.testing.assert_array_equal(saved.frames, sim.frame_batch(range(6)))
    np.testing.assert_array_equal(saved.object_phase, sim.object_phase)
    assert saved.metadata["patch_size"] == 128


# --- metrics ------------------------------------------------------------------------


def test_ssim_and_rmse_behave():
    truth = ScanSimulation(small_config()).object_phase
    assert ssim(truth, truth) == pytest.approx(1.0)
    assert phase_rmse(truth, truth) == 0.0
    noisy = truth + np.random.default_rng(0).normal(0, 0.3, truth.shape)
    assert ssim(noisy, truth) < 0.5
    assert phase_rmse(noisy, truth) == pytest.approx(0.3, rel=0.05)


# --- the shipped model -----------------------------------------------------------------


def test_shipped_model_reproduces_its_golden_pair():
    pytest.importorskip("onnxruntime", reason="the shipped model runs on onnxruntime (extra 'cpu')")
    from appliance.engines import open_engine
    from appliance.engines.manifest import load_golden

    engine = open_engine(MODEL, dynamic_batch=8, cpu_threads=1)
    try:
        assert engine.io.image_shape == (128, 128)
        assert engine.io.input.dtype == np.float32
        assert not engine.io.batch.fixed
        manifest = engine_manifest()
        golden_in, expected = load_golden(MODEL, manifest.golden)
        out = engine.run(golden_in.astype(np.float32))
        np.testing.assert_allclose(out["phase"], expected["phase"], atol=manifest.golden.atol, rtol=manifest.golden.rtol)
    finally:
        engine.close()


def test_shipped_model_sees_unseen_shapes():
    """Raw counts of a fresh test-shape scan in, the right phase out (within the beam)."""
    pytest.importorskip("onnxruntime", reason="the shipped model runs on onnxruntime (extra 'cpu')")
    from appliance.engines import open_engine

    sim = ScanSimulation(small_config(seed=99, scan=ScanConfig(points=32)))
    engine = open_engine(MODEL, dynamic_batch=32, cpu_threads=1)
    try:
        phases = engine.run(sim.frame_batch(range(32)).astype(np.float32))["phase"]
    finally:
        engine.close()
    truth = np.stack([sim.phase_patch(i) for i in range(32)])
    beam = np.abs(sim.probe) ** 2 > 0.1 * np.max(np.abs(sim.probe) ** 2)
    error = phase_rmse(phases[:, beam], truth[:, beam])
    assert error < 0.12  # 0.07 rad when shipped
    assert error < 0.5 * phase_rmse(np.zeros_like(truth[:, beam]), truth[:, beam])  # far better than "flat"


def engine_manifest():
    from appliance.engines.manifest import load_manifest

    manifest = load_manifest(MODEL)
    assert manifest is not None and manifest.golden is not None
    assert manifest.outputs == {"phase": "phase"} and manifest.pixel_size_m == pytest.approx(10e-9)
    return manifest
