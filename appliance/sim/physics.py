"""The optics and the detector: probe, exit wave, far field, photons, counts.

Units: lengths in metres, the sample sampled on a square grid of
``pixel_size_m`` (the real-space pixel that a detector frame of ``patch_size``
pixels resolves: lambda * distance / (patch_size * detector pixel)).

A frame of ``frame_size`` pixels is the far field of a ``patch_size`` exit wave
sampled ``m = frame_size // patch_size`` times finer, with a dead border of
``(frame_size - m * patch_size) / 2`` pixels: 128 -> m=1, 516 -> m=4 and a
2-pixel border, so cropping ``[2:-2]`` and 4x4 binning a 516 frame gives the
128x128 model input, like at the beamline.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence, Tuple

import numpy as np

from appliance.schema import check
from appliance.sim.trajectory import GOLDEN_ANGLE

PLANCK_EV_M = 1.239841984e-6  # h c in eV * m
FRAME_DTYPES = ("uint16", "uint32", "int32")
DETECTOR_LAYOUTS = ("none", "eiger", "medipix")  # the gap geometries are in detector_model.py
MAX_ABERRATION_WAVES = 4.0


@dataclass(frozen=True)
class ProbeConfig:
    """A zone-plate focus: a uniform circular pupil (optionally with a central stop), then defocus.

    ``pupil_fraction`` is the pupil's diameter on the detector as a fraction of
    the frame width; it sets the numerical aperture and so the focal spot
    (Airy core of radius 0.61 lambda / NA). The sample sits ``defocus_m`` from
    the focus, which widens the beam to about 2 NA defocus and gives it the
    curved phase that lets a single diffraction pattern tell an object from its
    twin.

    The rest is what makes a real zone plate less than ideal, all off by default:

    - ``osa_leak``: the order-sorting aperture lets some unfocused zero-order
      light through, a flat wave over a disc of ``osa_radius_m`` at the sample;
      its amplitude as a fraction of the focused beam's peak amplitude.
    - ``astigmatism``, ``coma``, ``spherical``: pupil phase in waves of the
      unnormalised Zernike polynomials Z(2,2) = rho^2 cos 2theta,
      Z(3,1) = (3 rho^3 - 2 rho) cos theta and Z(4,0) = 6 rho^4 - 6 rho^2 + 1
      (each 1 at the pupil rim, theta from the x axis).
    - ``coherence_modes``, ``source_size``: an extended source. Each source point
      is one mode: a linear pupil phase tilt, which moves the focus sideways;
      ``source_size`` is the Gaussian sigma of that tilt in waves at the pupil
      rim, s waves moving the focus by s lambda / NA (a demagnified source of
      sigma d at the focus has ``source_size = d NA / lambda``).
    """

    energy_kev: float = field(default=10.0, metadata=check(lambda v: 0.1 <= v <= 100, "0.1..100 keV"))
    pupil_fraction: float = field(default=0.5, metadata=check(lambda v: 0 < v <= 1, "0 < fraction <= 1"))
    central_stop: float = field(default=0.0, metadata=check(lambda v: 0 <= v < 1, "0 <= fraction < 1"))
    defocus_m: float = field(default=100e-6, metadata=check(lambda v: abs(v) < 1, "|defocus| < 1 m"))
    osa_leak: float = field(default=0.0, metadata=check(lambda v: 0 <= v < 1, "0 <= amplitude fraction < 1"))
    osa_radius_m: float = field(default=0.6e-6, metadata=check(lambda v: 0 < v < 1e-3, "0 < radius < 1 mm"))
    astigmatism: float = field(default=0.0, metadata=check(lambda v: abs(v) <= MAX_ABERRATION_WAVES, "-4..4 waves"))
    coma: float = field(default=0.0, metadata=check(lambda v: abs(v) <= MAX_ABERRATION_WAVES, "-4..4 waves"))
    spherical: float = field(default=0.0, metadata=check(lambda v: abs(v) <= MAX_ABERRATION_WAVES, "-4..4 waves"))
    coherence_modes: int = field(default=1, metadata=check(lambda v: 1 <= v <= 64, "1..64 modes"))
    source_size: float = field(default=0.0, metadata=check(lambda v: 0 <= v <= 4, "0..4 waves at the pupil rim"))


@dataclass(frozen=True)
class DetectorSpec:
    """Frame size, photon budget and the counting detector's limits.

    ``photons`` is the number of photons hitting the sample per frame; the
    frame sums to that times the sample's transmission (before noise and
    saturation).

    ``layout`` (chip and module gaps), ``dead_fraction``, ``background`` (mean
    counts per pixel before Poisson noise) and ``flat_field_error`` (relative
    per-pixel gain spread) are the imperfections of a real unit; see
    ``detector_model.py``. All are off by default.
    """

    frame_size: int = field(default=128, metadata=check(lambda v: 8 <= v <= 8192, "8..8192 pixels"))
    photons: float = field(default=1e6, metadata=check(lambda v: v > 0, "> 0"))
    saturation: int = field(default=65535, metadata=check(lambda v: v >= 1, ">= 1 count"))
    dtype: str = field(default="uint16", metadata=check(lambda v: v in FRAME_DTYPES, ", ".join(FRAME_DTYPES)))
    poisson: bool = True
    layout: str = field(default="none", metadata=check(lambda v: v in DETECTOR_LAYOUTS, ", ".join(DETECTOR_LAYOUTS)))
    dead_fraction: float = field(default=0.0, metadata=check(lambda v: 0 <= v <= 0.5, "0..0.5 of the pixels"))
    background: float = field(default=0.0, metadata=check(lambda v: 0 <= v <= 1e6, "0..1e6 counts per pixel"))
    flat_field_error: float = field(default=0.0, metadata=check(lambda v: 0 <= v <= 0.5, "0..0.5 relative gain spread"))


def wavelength_m(energy_kev: float) -> float:
    return PLANCK_EV_M / (energy_kev * 1e3)


def oversampling(frame_size: int, patch_size: int) -> Tuple[int, int]:
    """(m, border) such that ``frame_size == m * patch_size + 2 * border``; ValueError otherwise."""
    m = frame_size // patch_size
    border2 = frame_size - m * patch_size
    if m < 1 or border2 % 2:
        raise ValueError(
            "frame_size {} does not hold the {}-pixel patch's far field m times with an even border".format(
                frame_size, patch_size
            )
        )
    return m, border2 // 2


def make_probe(config: ProbeConfig, patch_size: int, pixel_size_m: float) -> np.ndarray:
    """Complex probe on the ``patch_size`` grid, centred at pixel (N/2, N/2), with sum |P|^2 = 1.

    With several coherence modes this is the central source point's mode: the
    probe a reconstruction that ignores partial coherence would find.
    """
    return _probe(config, patch_size, pixel_size_m, (0.0, 0.0))


def probe_modes(config: ProbeConfig, patch_size: int, pixel_size_m: float) -> Tuple[np.ndarray, np.ndarray]:
    """((K, N, N) complex64 modes, each with sum |P|^2 = 1; (K,) weights summing to 1).

    A partially coherent beam's diffraction pattern is the weighted sum of its
    modes' intensities, so the weights conserve the photon budget.
    """
    tilts, weights = source_points(config.coherence_modes, config.source_size)
    modes = np.stack([_probe(config, patch_size, pixel_size_m, (ty, tx)) for ty, tx in tilts])
    return modes, weights


def source_points(count: int, sigma: float) -> Tuple[np.ndarray, np.ndarray]:
    """(count, 2) pupil tilts (y, x) in waves at the rim and their Gaussian weights, summing to 1.

    Points on a Fermat spiral out to 2 sigma each stand for the same area of
    the source, so Gaussian weights sample a Gaussian source; point 0 is its
    centre, so one mode is the coherent probe.
    """
    n = np.arange(count)
    radius = 2.0 * sigma * np.sqrt(n / max(count - 1, 1))
    theta = n * GOLDEN_ANGLE
    weights = np.exp(-0.5 * (radius / sigma) ** 2) if sigma > 0 else np.ones(count)
    return np.stack([radius * np.sin(theta), radius * np.cos(theta)], axis=1), weights / weights.sum()


def random_probe(rng: np.random.Generator, base: ProbeConfig = ProbeConfig()) -> ProbeConfig:
    """Another plausible zone plate and alignment, so that training meets more than one probe.

    Defocus within 20% of the base (the in-line hologram condition
    lambda * defocus ~ N dx^2 still roughly holds), a central stop up to 0.45 of
    the pupil, and up to 0.25 waves of each aberration at the rim (about the
    quarter-wave limit of an optic still called diffraction limited).
    """
    return replace(
        base,
        defocus_m=base.defocus_m * float(rng.uniform(0.8, 1.2)),
        central_stop=float(rng.uniform(0.0, 0.45)),
        astigmatism=float(rng.uniform(-0.25, 0.25)),
        coma=float(rng.uniform(-0.25, 0.25)),
        spherical=float(rng.uniform(-0.25, 0.25)),
    )


def _probe(config: ProbeConfig, patch_size: int, pixel_size_m: float, tilt_waves: Tuple[float, float]) -> np.ndarray:
    """One mode, built on a twice larger grid and cropped, so the side lobes fall off instead of wrapping around."""
    size = 2 * patch_size
    q = np.fft.fftfreq(size)  # cycles per pixel
    qy, qx = np.meshgrid(q, q, indexing="ij")
    radius = np.hypot(qy, qx) / 0.5  # 1 at the frame's edge
    pupil = (radius <= config.pupil_fraction) & (radius >= config.central_stop * config.pupil_fraction)
    pupil = pupil.astype(np.complex128)
    waves = _pupil_waves(config, qy / (0.5 * config.pupil_fraction), qx / (0.5 * config.pupil_fraction), tilt_waves)
    if np.any(waves):
        pupil *= np.exp(2j * np.pi * waves)
    field_at_focus = np.fft.ifft2(pupil)
    probe = fresnel_propagate(field_at_focus, config.defocus_m, wavelength_m(config.energy_kev), pixel_size_m)
    probe = np.fft.fftshift(probe)
    if config.osa_leak:
        yy, xx = np.indices(probe.shape) - size // 2
        disc = np.hypot(yy, xx) <= config.osa_radius_m / pixel_size_m
        probe = probe + config.osa_leak * np.abs(probe).max() * disc
    start = size // 2 - patch_size // 2
    probe = probe[start : start + patch_size, start : start + patch_size]
    return (probe / np.sqrt(np.sum(np.abs(probe) ** 2))).astype(np.complex64)


def _pupil_waves(config: ProbeConfig, y: np.ndarray, x: np.ndarray, tilt_waves: Tuple[float, float]) -> np.ndarray:
    """Pupil phase in waves at pupil coordinates (y, x), 1 at the rim: aberrations and a source point's tilt."""
    rho2 = x ** 2 + y ** 2
    return (
        config.astigmatism * (x ** 2 - y ** 2)
        + config.coma * (3 * rho2 - 2) * x
        + config.spherical * (6 * rho2 ** 2 - 6 * rho2 + 1)
        + tilt_waves[0] * y
        + tilt_waves[1] * x
    )


def fresnel_propagate(wave: np.ndarray, distance_m: float, wavelength: float, pixel_size_m: float) -> np.ndarray:
    """Paraxial angular-spectrum propagation over ``distance_m`` (periodic grid)."""
    qy = np.fft.fftfreq(wave.shape[-2], d=pixel_size_m)[:, None]
    qx = np.fft.fftfreq(wave.shape[-1], d=pixel_size_m)[None, :]
    kernel = np.exp(-1j * np.pi * wavelength * distance_m * (qy ** 2 + qx ** 2))
    return np.fft.ifft2(np.fft.fft2(wave) * kernel)


def beam_diameter_px(probe: np.ndarray, fraction: float = 0.9) -> float:
    """Diameter of the centred disc holding ``fraction`` of the probe's intensity."""
    n = probe.shape[0]
    yy, xx = np.indices(probe.shape)
    radius = np.hypot(yy - n // 2, xx - n // 2).ravel()
    intensity = (np.abs(probe) ** 2).ravel()
    order = np.argsort(radius)
    cumulative = np.cumsum(intensity[order]) / intensity.sum()
    return float(2 * radius[order][np.searchsorted(cumulative, fraction)])


def shift_probe(probe: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """(n, N, N) copies of ``probe`` moved by sub-pixel (dy, dx) ``shifts_px`` (Fourier shift)."""
    n = probe.shape[0]
    q = np.fft.fftfreq(n)
    spectrum = np.fft.fft2(probe)
    ramp_y = np.exp(-2j * np.pi * shifts_px[:, 0, None] * q[None, :])[:, :, None]
    ramp_x = np.exp(-2j * np.pi * shifts_px[:, 1, None] * q[None, :])[:, None, :]
    return np.fft.ifft2(spectrum[None] * ramp_y * ramp_x).astype(np.complex64)


def far_field(exit_waves: np.ndarray, m: int) -> np.ndarray:
    """|FFT|^2 of (n, N, N) exit waves on an m-times finer grid, DC centred, summing to sum |psi|^2.

    For m > 1 the pattern is shifted by (m - 1) / 2 fine pixels so that the
    zero frequency sits at the centre of a binned pixel: binning m x m then
    gives a pattern centred like the m = 1 one.
    """
    n_patch = exit_waves.shape[-1]
    size = m * n_patch
    if m == 1:
        padded = exit_waves
    else:
        padded = np.zeros(exit_waves.shape[:-2] + (size, size), dtype=np.complex64)
        start = (size - n_patch) // 2
        padded[..., start : start + n_patch, start : start + n_patch] = exit_waves
        ramp = np.exp(2j * np.pi * (m - 1) / 2.0 * np.arange(size) / size).astype(np.complex64)
        padded *= ramp[:, None] * ramp[None, :]
    spectrum = np.fft.fftshift(np.fft.fft2(padded), axes=(-2, -1))
    intensity = spectrum.real ** 2 + spectrum.imag ** 2
    return intensity / float(size * size)


def expected_counts(exit_waves: np.ndarray, detector: DetectorSpec) -> np.ndarray:
    """Noiseless photon counts per pixel: (n, frame_size, frame_size) float32 (the exit waves are complex64).

    With the probe normalised to sum |P|^2 = 1, Parseval makes each frame sum
    to ``photons`` times the fraction the sample transmits.
    """
    m, border = oversampling(detector.frame_size, exit_waves.shape[-1])
    counts = far_field(exit_waves, m) * detector.photons
    if border:
        counts = np.pad(counts, ((0, 0), (border, border), (border, border)))
    return counts


def record(expected: np.ndarray, detector: DetectorSpec, seeds: Sequence[Tuple[int, int]]) -> np.ndarray:
    """Counts as the detector delivers them: Poisson noise, saturation, integer dtype.

    Each frame draws its noise from its own (seed, index) generator, so a frame
    is the same whether it is made alone, in a batch, or out of order.
    """
    frames = np.empty(expected.shape, dtype=detector.dtype)
    for frame, mean, seed in zip(frames, expected, seeds):
        counts = np.random.default_rng(list(seed)).poisson(mean) if detector.poisson else np.rint(mean)
        np.minimum(counts, detector.saturation, out=counts, casting="unsafe")
        frame[...] = counts
    return frames


def exit_waves(probe: np.ndarray, windows: np.ndarray, fractions_px: np.ndarray) -> np.ndarray:
    """Probe (moved by each window's sub-pixel remainder) times the object window."""
    if np.any(fractions_px):
        probes = shift_probe(probe, fractions_px)
    else:
        probes = probe[None]
    return (probes * windows).astype(np.complex64)
