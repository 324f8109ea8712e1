"""Training pairs and evaluation helpers for ``train_ptychonn.py`` (numpy; no torch here).

Pairs are (diffraction frame as the appliance feeds it to the model, ground
truth phase patch) cut from random etched samples with the simulator's physics,
so training data and the appliance's live data come from one code path.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from appliance.sim import physics
from appliance.sim.detector_model import DetectorUnit
from appliance.sim.objects import etched_phase, transmission
from appliance.sim.physics import DetectorSpec, ProbeConfig

OVERSAMPLED_FRAME = 516  # the field's 516x516 detector: crop [2:-2], bin 4 -> 128
PROBE_STREAM, DETECTOR_STREAM = 1, 2  # random streams of the banks, apart from the pairs' own


def model_input(frames: np.ndarray, patch_size: int) -> np.ndarray:
    """What the appliance gives the model: crop the dead border, mean-bin to ``patch_size``, float32."""
    m, border = physics.oversampling(frames.shape[-1], patch_size)
    if border:
        frames = frames[..., border:-border, border:-border]
    frames = frames.astype(np.float32)
    if m > 1:
        frames = frames.reshape(frames.shape[:-2] + (patch_size, m, patch_size, m)).mean(axis=(-3, -1))
    return frames


class Pairs(NamedTuple):
    """Training pairs and, per pair, what the physics term of the loss needs to re-simulate its frame."""

    frames: np.ndarray  # (count, N, N) float32, as the appliance feeds the model
    labels: np.ndarray  # (count, N, N) float32 phase, rad
    amplitudes: Optional[np.ndarray]  # (count, N, N) float32 |transmission|, where known
    probe_index: np.ndarray  # (count,) int: the pair's probe in the bank
    unit_index: np.ndarray  # (count,) int: the pair's detector unit in the bank
    photons: np.ndarray  # (count,) float32 incident photons
    native: np.ndarray  # (count,) bool: recorded at the patch size (not binned from 516 pixels)

    @classmethod
    def retrieved(cls, frames: np.ndarray, labels: np.ndarray) -> Pairs:
        """Pairs whose phases were retrieved from a real scan: one probe, no dose known, nothing to re-simulate."""
        none = np.zeros(len(frames), np.int16)
        return cls(frames, labels, None, none, none, np.zeros(len(frames), np.float32), np.zeros(len(frames), bool))

    def take(self, rows: np.ndarray) -> Pairs:
        return Pairs(*(None if column is None else column[rows] for column in self))


@dataclass(frozen=True)
class Variety:
    """What changes between training samples besides the etching and the dose.

    ``probes`` > 1 draws a bank of zone plates and alignments
    (:func:`physics.random_probe`, the first one the given probe) and gives each
    sample one of them; ``detectors`` > 0 records each sample on one of that many
    detector units with dead pixels, a background and a flat-field error, as
    the appliance would receive them (dead pixels read 0, the mask fill).
    """

    probes: int = 1
    detectors: int = 0


def probe_bank(first: np.ndarray, config: ProbeConfig, variety: Variety, seed: int, patch_size: int,
               pixel_size_m: float) -> np.ndarray:
    """(P, N, N) complex64: ``first``, then ``variety.probes - 1`` random ones around ``config``."""
    rng = np.random.default_rng([seed, PROBE_STREAM])
    others = [physics.make_probe(physics.random_probe(rng, config), patch_size, pixel_size_m) for _ in range(variety.probes - 1)]
    return np.stack([first] + others).astype(np.complex64)


def detector_bank(base: DetectorSpec, variety: Variety, seed: int) -> List[DetectorUnit]:
    """The ideal detector, then ``variety.detectors`` imperfect units (their bad pixels and gains fixed by seed)."""
    rng = np.random.default_rng([seed, DETECTOR_STREAM])
    units = [DetectorUnit(base, 0)]
    for k in range(variety.detectors):
        spec = replace(base, dead_fraction=float(rng.uniform(0, 2e-3)), background=float(rng.uniform(0, 0.5)),
                       flat_field_error=float(rng.uniform(0, 0.05)))
        units.append(DetectorUnit(spec, seed * 1000 + k + 1))
    return units


def training_pairs(
    count: int,
    seed: int,
    probes: np.ndarray,
    units: Sequence[DetectorUnit],
    photons_range: Tuple[float, float],
    oversampled_share: float,
    max_phase: float,
    absorption_ratio: float,
    object_size: int = 512,
    per_object: int = 400,
) -> Pairs:
    """``count`` (frame, phase) pairs from fresh etched samples.

    Each chunk of 32 pairs draws its own photon budget (log-uniform in
    ``photons_range``), and a share of them is recorded on the 516-pixel
    detector and binned, so the model meets the noise levels and the pixel
    integration of both detector sizes. Each sample draws a probe from
    ``probes`` and a unit from ``units`` (no draw when a bank has one entry,
    so a single probe and the ideal detector give the pairs they always gave).
    Units apply at the patch size only: a 516-pixel frame is recorded on an
    ideal detector.
    """
    rng = np.random.default_rng(seed)
    n = probes.shape[-1]
    pairs = Pairs(np.empty((count, n, n), np.float32), np.empty((count, n, n), np.float32), np.empty((count, n, n), np.float32),
                  np.zeros(count, np.int16), np.zeros(count, np.int16), np.empty(count, np.float32), np.zeros(count, bool))
    done = 0
    progress = tqdm(total=count, desc="simulating pairs", unit="pair", disable=None)
    while done < count:
        phase = etched_phase((object_size, object_size), rng, max_phase)
        sample = transmission(phase, absorption_ratio)
        take = min(per_object, count - done)
        starts = rng.integers(0, object_size - n, size=(take, 2))
        probe_index = int(rng.integers(len(probes))) if len(probes) > 1 else 0
        unit_index = int(rng.integers(len(units))) if len(units) > 1 else 0
        for first in range(0, take, 32):
            chunk = starts[first : first + 32]
            windows = np.stack([sample[r : r + n, c : c + n] for r, c in chunk])
            waves = physics.exit_waves(probes[probe_index], windows, np.zeros((len(chunk), 2)))
            size = OVERSAMPLED_FRAME if rng.random() < oversampled_share else n
            photons = float(np.exp(rng.uniform(*np.log(photons_range))))
            seeds = [(seed, done + first + i) for i in range(len(chunk))]
            rows = slice(done + first, done + first + len(chunk))
            if size == n:
                unit = units[unit_index]
                detector = replace(unit.spec, photons=photons)
                recorded = unit.record(physics.expected_counts(waves, detector), seeds)
                pairs.unit_index[rows] = unit_index
                pairs.native[rows] = True
            else:
                detector = replace(units[0].spec, frame_size=size, photons=photons)
                recorded = physics.record(physics.expected_counts(waves, detector), detector, seeds)
            pairs.frames[rows] = model_input(recorded, n)
            pairs.labels[rows] = np.stack([phase[r : r + n, c : c + n] for r, c in chunk])
            pairs.amplitudes[rows] = np.abs(windows)
            pairs.probe_index[rows] = probe_index
            pairs.photons[rows] = photons
            progress.update(len(chunk))
        done += take
    progress.close()
    return pairs


def beam_weight(probe: np.ndarray) -> np.ndarray:
    """Where a frame says something about the sample: the probe intensity, smoothed over its rings, max 1.

    Weights the training loss: the network is only asked for what the frame can tell.
    """
    intensity = np.abs(probe.astype(np.complex128)) ** 2
    q = np.fft.fftfreq(probe.shape[0])
    kernel = np.exp(-2 * (np.pi * 2.0) ** 2 * (q[:, None] ** 2 + q[None, :] ** 2))
    smooth = np.fft.ifft2(np.fft.fft2(intensity) * kernel).real.clip(min=0)
    return (smooth / smooth.max()).astype(np.float32)


def stitch_weight(probe: np.ndarray) -> np.ndarray:
    """Patch weight for stitching: the beam weight squared, i.e. mostly the inner ~250 nm of the beam.

    Single-frame phases are best where the beam is brightest and degrade
    towards its rim; with the scan's overlap every sample point is also near
    the centre of some other frame, so favouring centres beats plain intensity
    weighting (mosaic SSIM 0.93 against 0.85 on the test shapes, see
    docs/model.md).
    """
    return beam_weight(probe) ** 2
