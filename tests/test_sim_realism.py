"""The simulator's beamline imperfections: zone-plate optics, detector defects, stage errors.

Each option is off by default and the defaults reproduce the frames the shipped
model was trained and checked on, bit for bit; each option, once on, does what
a beamline scientist would expect of it.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from appliance import schema
from appliance.preprocess import frame_mask, load_mask_file
from appliance.sim import detector_model, physics, trajectory
from appliance.sim.detector_model import DetectorUnit, detector_mask, gain_map
from appliance.sim.objects import ObjectConfig
from appliance.sim.physics import DetectorSpec, ProbeConfig
from appliance.sim.scan import ScanSimulation, SimulationConfig
from appliance.sim.trajectory import ScanConfig

PIXEL = 10e-9
RADIUS = np.hypot(*(np.indices((128, 128)) - 64))  # from the beam centre / the far field's DC pixel
PUPIL = (RADIUS > 0.1 * 64) & (RADIUS < 0.45 * 64)  # inside the bright disc of the default pupil


def small_config(**changes) -> SimulationConfig:
    base = SimulationConfig(seed=7, scan=ScanConfig(points=64))
    return replace(base, **changes)


def pure_phase(**changes) -> SimulationConfig:
    return small_config(sample=ObjectConfig(absorption_ratio=0.0), **changes)


# --- defaults ---------------------------------------------------------------------


def test_defaults_take_the_single_mode_path_bit_for_bit():
    """With every option off, frames are the plain coherent model the shipped model was trained on:
    one probe, nominal positions, no detector defects (computed here from the basic steps)."""
    sim = ScanSimulation(small_config())
    probe = physics.make_probe(ProbeConfig(), 128, PIXEL)
    np.testing.assert_array_equal(sim.probe, probe)
    assert len(sim.mode_weights) == 1 and sim.mode_weights[0] == 1.0
    np.testing.assert_array_equal(sim.actual_positions_m, sim.positions_m)
    indices = list(range(8))
    centres = sim.centre_px(indices)
    whole = np.floor(centres).astype(np.int64)
    windows = np.stack([sim.object[r - 64 : r + 64, c - 64 : c + 64] for r, c in whole])
    expected = physics.expected_counts(physics.exit_waves(probe, windows, centres - whole), sim.config.detector)
    np.testing.assert_array_equal(sim.expected(indices), expected)
    seeds = [(sim.config.seed, i) for i in indices]
    np.testing.assert_array_equal(sim.frame_batch(indices), physics.record(expected, sim.config.detector, seeds))
    assert not sim.detector_unit.bad_pixels.any()


# --- probe -----------------------------------------------------------------------


def test_mode_weights_sum_to_one_and_counts_are_conserved():
    config = ProbeConfig(coherence_modes=5, source_size=0.5)
    modes, weights = physics.probe_modes(config, 128, PIXEL)
    assert modes.shape == (5, 128, 128) and modes.dtype == np.complex64
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert weights[0] == weights.max() and np.all(weights > 0)
    np.testing.assert_allclose(np.sum(np.abs(modes) ** 2, axis=(1, 2)), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(modes[0], physics.make_probe(config, 128, PIXEL))  # the central source point
    # a source point's tilt of s waves at the pupil rim moves the focus by s lambda / NA = 4 s pixels here
    tilts, _ = physics.source_points(5, 0.5)
    focus = physics.probe_modes(replace(config, defocus_m=0.0), 128, PIXEL)[0]
    for mode, (ty, tx) in zip(focus[1:], tilts[1:]):
        peak = np.array(np.unravel_index(np.argmax(np.abs(mode)), mode.shape)) - 64
        assert np.hypot(*peak) == pytest.approx(4 * np.hypot(ty, tx), abs=1.0)
    sim = ScanSimulation(pure_phase(probe=config, detector=DetectorSpec(photons=2e6)))
    np.testing.assert_allclose(sim.expected(range(3)).sum(axis=(1, 2)), 2e6, rtol=1e-5)


def test_central_stop_darkens_the_pupil_centre():
    def centre_over_annulus(stop: float) -> float:
        pattern = physics.far_field(physics.make_probe(ProbeConfig(central_stop=stop), 128, PIXEL)[None], 1)[0]
        return float(pattern[RADIUS < 0.15 * 64].mean() / pattern[(RADIUS > 0.3 * 64) & (RADIUS < 0.45 * 64)].mean())

    assert centre_over_annulus(0.0) == pytest.approx(1.0, abs=0.1)
    assert centre_over_annulus(0.5) < 0.05


def test_osa_leak_raises_intensity_far_from_the_focus():
    clean = np.abs(physics.make_probe(ProbeConfig(), 128, PIXEL)) ** 2
    leaky = np.abs(physics.make_probe(ProbeConfig(osa_leak=0.1, osa_radius_m=0.5e-6), 128, PIXEL)) ** 2
    assert leaky.sum() == pytest.approx(1.0, rel=1e-5)
    beyond_beam = (RADIUS > 40) & (RADIUS < 48)  # the beam is 59 px across; the leak disc 50 px in radius
    assert leaky[beyond_beam].mean() > 1.8 * clean[beyond_beam].mean()
    assert leaky[RADIUS > 55].mean() < 1.05 * clean[RADIUS > 55].mean()  # nothing beyond the OSA's disc


def test_aberrations_break_the_symmetries_they_should():
    yy, xx = np.indices((128, 128)) - 64

    def intensity(**aberration) -> np.ndarray:
        return np.abs(physics.make_probe(ProbeConfig(**aberration), 128, PIXEL)) ** 2

    perfect = intensity()
    np.testing.assert_allclose(perfect, perfect.T, atol=1e-9)
    astigmatic = intensity(astigmatism=0.25)  # x^2 - y^2: the beam grows along one axis, shrinks along the other
    assert (astigmatic * yy ** 2).sum() > 1.15 * (astigmatic * xx ** 2).sum()
    comatic = intensity(coma=0.25)  # odd in x, even in y
    skew_x, skew_y = (comatic * xx ** 3).sum(), (comatic * yy ** 3).sum()
    assert abs(skew_x) > 20 * abs(skew_y) and abs(skew_x) > 500
    spherical = intensity(spherical=0.25)  # round, but not the perfect probe
    np.testing.assert_allclose(spherical, spherical.T, atol=1e-7)
    assert np.abs(spherical - perfect).sum() > 0.05


def test_partially_coherent_frame_is_smoother_than_a_coherent_one():
    coherent = ScanSimulation(pure_phase())
    mixed = ScanSimulation(pure_phase(probe=ProbeConfig(coherence_modes=3, source_size=1.0)))
    np.testing.assert_array_equal(mixed.object_phase, coherent.object_phase)
    sharp, smooth = coherent.expected(range(4))[:, PUPIL], mixed.expected(range(4))[:, PUPIL]
    assert np.all(smooth.max(axis=1) < sharp.max(axis=1))
    assert np.all(smooth.min(axis=1) > sharp.min(axis=1))
    assert np.all(smooth.std(axis=1) < 0.95 * sharp.std(axis=1))


def test_random_probes_vary_within_sane_ranges_and_validate():
    base = ProbeConfig()
    probes = [physics.random_probe(np.random.default_rng(seed), base) for seed in range(20)]
    assert probes[3] == physics.random_probe(np.random.default_rng(3), base)
    assert len({p.defocus_m for p in probes}) == 20
    for probe in probes:
        assert 0.8 * base.defocus_m <= probe.defocus_m <= 1.2 * base.defocus_m
        assert 0 <= probe.central_stop <= 0.45
        assert max(abs(probe.astigmatism), abs(probe.coma), abs(probe.spherical)) <= 0.25
        assert schema.load(ProbeConfig, schema.dump(probe), "random probe") == probe
    assert np.sum(np.abs(physics.make_probe(probes[0], 128, PIXEL)) ** 2) == pytest.approx(1.0, rel=1e-5)


# --- detector --------------------------------------------------------------------


def test_layouts_have_gaps_where_the_chips_end():
    assert set(detector_model.GEOMETRY) | {"none"} == set(physics.DETECTOR_LAYOUTS)
    eiger = detector_mask(DetectorSpec(frame_size=128, layout="eiger"), 0)
    assert list(np.flatnonzero(eiger.all(axis=0))) == [63, 64] == list(np.flatnonzero(eiger.all(axis=1)))
    assert eiger.sum() == 2 * 2 * 128 - 4  # a 2-pixel cross through the centre
    quad = detector_mask(DetectorSpec(frame_size=516, layout="medipix"), 0)
    assert list(np.flatnonzero(quad.all(axis=0))) == [0, 257, 258, 259]  # off the quad, then the 3-pixel gap
    wide = detector_mask(DetectorSpec(frame_size=1600, layout="eiger"), 0)

    def gap_runs(line: np.ndarray) -> set:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], line.astype(int), [0]])))
        return set(np.diff(edges)[::2])

    assert gap_runs(wide.all(axis=1)) == {2, 37}  # rows: chip gaps and the gaps between module rows
    assert gap_runs(wide.all(axis=0)) == {2, 10}  # columns: chip gaps and the gaps between module columns
    assert not detector_mask(DetectorSpec(frame_size=128), 0).any()


def test_masked_pixels_read_zero_and_the_mask_file_matches(tmp_path):
    spec = DetectorSpec(frame_size=128, photons=1e7, layout="eiger", dead_fraction=0.01)
    sim = ScanSimulation(small_config(detector=spec, detector_seed=3))
    mask = detector_mask(spec, 3)
    np.testing.assert_array_equal(sim.detector_unit.bad_pixels, mask)
    assert (mask.sum() - 508) / (128 * 128 - 508) == pytest.approx(0.01, abs=0.003)
    frames = sim.frame_batch(range(4))
    assert np.all(frames[:, mask] == 0)
    lit = ~mask & PUPIL
    assert np.all(frames[:, lit] > 0)
    # the same unit has the same dead pixels in every scan; another unit has others
    other_scan = ScanSimulation(small_config(seed=8, detector=spec, detector_seed=3))
    np.testing.assert_array_equal(other_scan.detector_unit.bad_pixels, mask)
    assert not np.array_equal(detector_mask(spec, 4), mask)
    path = str(tmp_path / "mask.npy")
    np.save(path, mask)
    loaded = load_mask_file(path)
    np.testing.assert_array_equal(frame_mask(path, (128, 128), loaded), mask)


def test_background_raises_the_dark_pixels_by_its_mean():
    spec = DetectorSpec(photons=1e5, saturation=2**31 - 1, dtype="int32")
    dark = ScanSimulation(small_config(detector=spec)).expected(range(8)) < 1e-3
    assert dark.mean() > 0.2  # enough pixels to measure on
    plain = ScanSimulation(small_config(detector=spec)).frame_batch(range(8))
    lifted = ScanSimulation(small_config(detector=replace(spec, background=2.5))).frame_batch(range(8))
    assert plain[dark].mean() < 0.01
    assert lifted[dark].mean() == pytest.approx(2.5, rel=0.02)
    assert lifted[dark].var() == pytest.approx(2.5, rel=0.05)  # background photons are counted, so Poisson


def test_flat_field_spread_shows_in_a_flat_illumination():
    spec = DetectorSpec(frame_size=256, poisson=False, saturation=2**31 - 1, dtype="int32", flat_field_error=0.05)
    flat = np.full((2, 256, 256), 1e4)
    frames = DetectorUnit(spec, seed=5).record(flat, [(0, 0), (0, 1)]).astype(np.float64)
    assert frames.mean() == pytest.approx(1e4, rel=0.005)
    assert frames.std() / frames.mean() == pytest.approx(0.05, rel=0.05)
    np.testing.assert_array_equal(frames[0], frames[1])  # the gains belong to the pixels, not the frame
    np.testing.assert_allclose(frames[0], np.rint(1e4 * gain_map(spec, 5)))
    uniform = DetectorUnit(replace(spec, flat_field_error=0.0), seed=5).record(flat, [(0, 0), (0, 1)])
    assert np.all(uniform == 10000)


# --- scan ---------------------------------------------------------------------------


def test_position_errors_leave_positions_nominal_and_move_the_frames():
    scan = ScanConfig(points=64, position_error_m=20e-9)
    sim = ScanSimulation(small_config(scan=scan))
    np.testing.assert_array_equal(sim.positions_m, trajectory.positions(scan))
    error = sim.actual_positions_m - sim.positions_m
    assert error.std() == pytest.approx(20e-9, rel=0.2) and abs(error.mean()) < 8e-9
    point = next(sim.points(start=9, stop=10))
    assert (point.x_m, point.y_m) == tuple(sim.positions_m[9])  # what the instrument reports
    assert point.phase[64, 64] == pytest.approx(float(sim.sample_phase(*sim.actual_positions_m[9])), abs=1e-6)

    def frame_at(centre: np.ndarray) -> np.ndarray:
        whole = np.floor(centre).astype(int)
        r, c = whole - 64
        waves = physics.exit_waves(sim.probe, sim.object[None, r : r + 128, c : c + 128], (centre - whole)[None])
        return physics.expected_counts(waves, sim.config.detector)[0]

    made = sim.expected([9])[0]
    np.testing.assert_allclose(made, frame_at(sim.true_centre_px([9])[0]), rtol=1e-5, atol=1e-3)
    assert np.abs(made - frame_at(sim.centre_px([9])[0])).sum() > 0.02 * made.sum()


def test_fly_blur_smooths_the_fringes():
    sim = ScanSimulation(pure_phase(scan=ScanConfig(pattern="raster", points=16, step_m=100e-9, fly_blur_m=80e-9)))
    centres = sim.true_centre_px(range(16))
    whole = np.floor(centres).astype(int)
    windows = np.stack([sim.object[r - 64 : r + 64, c - 64 : c + 64] for r, c in whole])
    still = physics.expected_counts(physics.exit_waves(sim.probe, windows, centres - whole), sim.config.detector)
    blurred = sim.expected(range(16))
    np.testing.assert_allclose(blurred.sum(axis=(1, 2)), sim.config.detector.photons, rtol=1e-5)
    assert blurred[:, PUPIL].std(axis=1).mean() < 0.8 * still[:, PUPIL].std(axis=1).mean()
    assert np.all(blurred[:, PUPIL].max(axis=1) < still[:, PUPIL].max(axis=1))


def test_everything_at_once_still_holds_the_photon_budget():
    config = pure_phase(
        probe=ProbeConfig(coherence_modes=3, source_size=0.4, astigmatism=0.1, osa_leak=0.02),
        detector=DetectorSpec(frame_size=516, photons=1e6),
        scan=ScanConfig(points=64, position_error_m=10e-9, fly_blur_m=50e-9),
    )
    sim = ScanSimulation(config)
    np.testing.assert_allclose(sim.expected([0, 40]).sum(axis=(1, 2)), 1e6, rtol=1e-5)
    for dx in sim.fly_offsets_m[[0, -1]] / sim.pixel_size_m:  # the sample holds the window of every sub-position
        corners = np.floor(sim.true_centre_px(range(len(sim))) + (0.0, dx)).astype(int) - 64
        assert corners.min() >= 0 and np.all(corners.max(axis=0) + 128 <= np.array(sim.object.shape))


# --- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, key, value, expectation",
    [
        ("probe", "osa_leak", 1.5, "0 <= amplitude fraction < 1"),
        ("probe", "osa_radius_m", 0.0, "0 < radius < 1 mm"),
        ("probe", "astigmatism", 9.0, "-4..4 waves"),
        ("probe", "coma", -5.0, "-4..4 waves"),
        ("probe", "spherical", 4.5, "-4..4 waves"),
        ("probe", "coherence_modes", 0, "1..64 modes"),
        ("probe", "source_size", -0.1, "0..4 waves at the pupil rim"),
        ("detector", "layout", "pilatus", "none, eiger, medipix"),
        ("detector", "dead_fraction", 0.9, "0..0.5 of the pixels"),
        ("detector", "background", -1.0, "0..1e6 counts per pixel"),
        ("detector", "flat_field_error", 2.0, "0..0.5 relative gain spread"),
        ("scan", "position_error_m", -1e-9, "0..10 um (sigma per axis)"),
        ("scan", "fly_blur_m", 1.0, "0..10 um of travel per exposure"),
    ],
)
def test_validation_names_the_field_and_its_range(section, key, value, expectation):
    with pytest.raises(schema.SchemaError) as caught:
        schema.load(SimulationConfig, {section: {key: value}}, "sim.yaml")
    assert caught.value.problems == ["{}.{}: got {!r} ({}); expected {}".format(
        section, key, value, type(value).__name__, expectation)]


def test_non_default_options_round_trip_through_the_schema():
    config = small_config(
        probe=ProbeConfig(osa_leak=0.1, coma=0.2, coherence_modes=4, source_size=0.3),
        detector=DetectorSpec(layout="medipix", dead_fraction=0.001, background=0.5, flat_field_error=0.02),
        scan=ScanConfig(points=10, position_error_m=5e-9, fly_blur_m=30e-9),
        detector_seed=11,
    )
    assert schema.load(SimulationConfig, schema.dump(config), "dumped") == config
