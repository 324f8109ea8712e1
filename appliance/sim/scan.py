"""A whole simulated ptychography scan: sample, probe, trajectory, frames and ground truth.

Coordinates: ``positions_m[i]`` is the (x, y) motor position of frame i in
metres, relative to the scan centre. Object pixel (row, col) lies at
``x = origin_m[0] + col * pixel_size_m``, ``y = origin_m[1] + row * pixel_size_m``.
Pixel (i, j) of a frame's phase patch lies at
``x = x_i + (j - patch_size / 2) * pixel_size_m`` (and likewise in y): the
beam centre is the patch's pixel (patch_size/2, patch_size/2).

``positions_m`` are the nominal positions, what the instrument reports and a
reconstruction is given; ``actual_positions_m`` are where the beam really was
(they differ by ``scan.position_error_m``), which the frames and the
ground-truth patches follow.

Frames are computed on demand, in chunks, and each one only depends on the
seed and its index, so a server can stream a scan of any length at any rate
without holding it in memory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

from appliance import schema
from appliance.schema import check
from appliance.sim import physics, trajectory
from appliance.sim.detector_model import DetectorUnit
from appliance.sim.objects import ObjectConfig, make_phase, transmission
from appliance.sim.physics import DetectorSpec, ProbeConfig
from appliance.sim.trajectory import ScanConfig

MARGIN_PX = 8


@dataclass(frozen=True)
class SimulationConfig:
    pixel_size_m: float = field(default=10e-9, metadata=check(lambda v: 0 < v < 1e-3, "0 < size < 1 mm"))
    patch_size: int = field(default=128, metadata=check(lambda v: 8 <= v <= 4096 and v % 2 == 0, "even, 8..4096"))
    seed: int = 0
    sample: ObjectConfig = field(default_factory=ObjectConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    detector: DetectorSpec = field(default_factory=DetectorSpec)
    scan: ScanConfig = field(default_factory=ScanConfig)
    detector_seed: int = 0  # the detector unit: its dead pixels and gains, the same for every scan with it


@dataclass(frozen=True)
class ScanPoint:
    index: int
    frame: np.ndarray  # (frame_size, frame_size) counts in the detector dtype
    x_m: float
    y_m: float
    phase: np.ndarray  # (patch_size, patch_size) float32 ground-truth phase, beam-centred


class ScanSimulation:
    """The sample, probe and trajectory of one scan; frames on demand.

    ``probe_modes`` and ``mode_weights`` are the partially coherent beam
    (one mode, weight 1, by default); ``probe`` is its central mode.
    """

    def __init__(self, config: Optional[SimulationConfig] = None) -> None:
        self.config = config or SimulationConfig()
        cfg = self.config
        physics.oversampling(cfg.detector.frame_size, cfg.patch_size)  # reject bad sizes early
        self.positions_m = trajectory.positions(cfg.scan)
        self.actual_positions_m = trajectory.actual_positions(cfg.scan, self.positions_m, cfg.seed)
        self.fly_offsets_m = trajectory.fly_offsets(cfg.scan)
        lit = [self.actual_positions_m + (dx, 0.0) for dx in (self.fly_offsets_m[0], self.fly_offsets_m[-1])]
        extent = np.concatenate([self.positions_m] + lit)  # the sample must hold every window the beam lights
        span_px = (extent.max(axis=0) - extent.min(axis=0)) / cfg.pixel_size_m
        size = (int(np.ceil(span_px[1])) + cfg.patch_size + 2 * MARGIN_PX, int(np.ceil(span_px[0])) + cfg.patch_size + 2 * MARGIN_PX)
        centre_m = (extent.max(axis=0) + extent.min(axis=0)) / 2
        self.origin_m = centre_m - np.array([(size[1] - 1) / 2.0, (size[0] - 1) / 2.0]) * cfg.pixel_size_m
        rng = np.random.default_rng(cfg.seed)
        self.object_phase = make_phase(cfg.sample, size, rng)
        self.object = transmission(self.object_phase, cfg.sample.absorption_ratio)
        self.probe_modes, self.mode_weights = physics.probe_modes(cfg.probe, cfg.patch_size, cfg.pixel_size_m)
        self.probe = self.probe_modes[0]
        self.detector_unit = DetectorUnit(cfg.detector, cfg.detector_seed)

    @property
    def pixel_size_m(self) -> float:
        return self.config.pixel_size_m

    def __len__(self) -> int:
        return len(self.positions_m)

    @property
    def beam_diameter_m(self) -> float:
        return physics.beam_diameter_px(self.probe) * self.pixel_size_m

    @property
    def overlap(self) -> float:
        """1 - step / beam diameter: > 0 when neighbouring illuminations overlap."""
        return 1.0 - self.config.scan.step_m / self.beam_diameter_m

    def centre_px(self, indices: Sequence[int]) -> np.ndarray:
        """(n, 2) nominal beam centres as (row, col) in object pixels, fractional: what a reconstruction is told."""
        return self._to_px(self.positions_m[np.asarray(indices)])

    def true_centre_px(self, indices: Sequence[int]) -> np.ndarray:
        """(n, 2) beam centres (mid-exposure) where the frames were really taken, as (row, col) object pixels."""
        return self._to_px(self.actual_positions_m[np.asarray(indices)])

    def _to_px(self, positions_m: np.ndarray) -> np.ndarray:
        xy = (positions_m - self.origin_m) / self.pixel_size_m
        return xy[:, ::-1]

    def expected(self, indices: Sequence[int]) -> np.ndarray:
        """Noiseless counts of the given frames, (n, frame_size, frame_size) float32.

        The incoherent sum over the probe modes, averaged over the beam's
        positions during a fly-scan exposure.
        """
        centres = self.true_centre_px(indices)
        shifts = [(0.0, dx) for dx in self.fly_offsets_m / self.pixel_size_m]
        modes = list(zip(self.probe_modes, self.mode_weights))
        return sum(float(w) / len(shifts) * self._coherent(mode, centres + shift) for shift in shifts for mode, w in modes)

    def _coherent(self, probe: np.ndarray, centres: np.ndarray) -> np.ndarray:
        whole = np.floor(centres).astype(np.int64)
        starts = whole - self.config.patch_size // 2
        n = self.config.patch_size
        windows = np.stack([self.object[r : r + n, c : c + n] for r, c in starts])
        waves = physics.exit_waves(probe, windows, centres - whole)
        return physics.expected_counts(waves, self.config.detector)

    def frame_batch(self, indices: Sequence[int]) -> np.ndarray:
        seeds = [(self.config.seed, int(i)) for i in indices]
        return self.detector_unit.record(self.expected(indices), seeds)

    def phase_patch(self, index: int) -> np.ndarray:
        """Ground-truth phase on the frame's patch grid (bilinear), where the beam really was at mid-exposure."""
        half = self.config.patch_size // 2
        offsets = (np.arange(self.config.patch_size) - half) * self.pixel_size_m
        x, y = self.actual_positions_m[index]
        return self.sample_phase(x + offsets[None, :], y + offsets[:, None])

    def phase_on_grid(self, origin_m: Sequence[float], pixel_size_m: float, shape: Tuple[int, int]) -> np.ndarray:
        """Ground-truth phase on an image grid (pixel (0, 0) at ``origin_m``): a mosaic's or a reconstruction's."""
        x = origin_m[0] + np.arange(shape[1]) * pixel_size_m
        y = origin_m[1] + np.arange(shape[0]) * pixel_size_m
        return self.sample_phase(x[None, :], y[:, None])

    def sample_phase(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
        """Ground-truth phase at arbitrary (broadcast) positions, bilinear, 0 outside the sample.

        Lets a stitched mosaic on any grid be compared with the truth.
        """
        col = (np.asarray(x_m, dtype=np.float64) - self.origin_m[0]) / self.pixel_size_m
        row = (np.asarray(y_m, dtype=np.float64) - self.origin_m[1]) / self.pixel_size_m
        col, row = np.broadcast_arrays(col, row)
        padded = np.pad(self.object_phase, 1)
        c0 = np.clip(np.floor(col).astype(np.int64), -1, padded.shape[1] - 3)
        r0 = np.clip(np.floor(row).astype(np.int64), -1, padded.shape[0] - 3)
        fc = np.clip(col - c0, 0.0, 1.0)
        fr = np.clip(row - r0, 0.0, 1.0)
        r0, c0 = r0 + 1, c0 + 1
        top = padded[r0, c0] * (1 - fc) + padded[r0, c0 + 1] * fc
        bottom = padded[r0 + 1, c0] * (1 - fc) + padded[r0 + 1, c0 + 1] * fc
        return (top * (1 - fr) + bottom * fr).astype(np.float32)

    def points(self, start: int = 0, stop: Optional[int] = None, chunk: int = 32) -> Iterator[ScanPoint]:
        """Scan points in acquisition order, computed ``chunk`` frames at a time."""
        stop = len(self) if stop is None else min(stop, len(self))
        for first in range(start, stop, chunk):
            indices = list(range(first, min(first + chunk, stop)))
            frames = self.frame_batch(indices)
            for index, frame in zip(indices, frames):
                x, y = self.positions_m[index]
                yield ScanPoint(index, frame, float(x), float(y), self.phase_patch(index))

    def metadata(self) -> dict:
        """What a saved scan needs besides its arrays to be understood (JSON-ready)."""
        return {
            "pixel_size_m": self.pixel_size_m,
            "origin_m": [float(v) for v in self.origin_m],
            "patch_size": self.config.patch_size,
            "beam_diameter_m": self.beam_diameter_m,
            "overlap": self.overlap,
            "config": schema.dump(self.config),
        }


@dataclass
class SavedScan:
    frames: np.ndarray
    positions_m: np.ndarray
    object_phase: np.ndarray
    probe: np.ndarray
    metadata: dict

    @property
    def pixel_size_m(self) -> float:
        return float(self.metadata["pixel_size_m"])

    @property
    def origin_m(self) -> Tuple[float, float]:
        x, y = self.metadata["origin_m"]
        return float(x), float(y)


def save_scan(sim: ScanSimulation, path: str, chunk: int = 64) -> str:
    """Write frames, positions and ground truth: one HDF5 file for ``*.h5``, else a directory of .npy files.

    Frames are written chunk by chunk (HDF5 dataset or .npy memory map), so a
    long scan never sits in memory whole.
    """
    n = len(sim)
    size = sim.config.detector.frame_size
    dtype = np.dtype(sim.config.detector.dtype)
    meta = sim.metadata()
    if path.endswith((".h5", ".hdf5")):
        try:
            import h5py
        except ImportError as exc:
            raise RuntimeError("writing {} needs h5py (pip install h5py); or give a directory for .npy files".format(path)) from exc
        with h5py.File(path, "w") as handle:
            frames = handle.create_dataset("frames", (n, size, size), dtype=dtype, chunks=(1, size, size))
            _fill(sim, frames, chunk)
            handle["positions_m"] = sim.positions_m
            handle["object_phase"] = sim.object_phase
            handle["probe"] = sim.probe
            handle.attrs["metadata"] = json.dumps(meta)
        return path
    os.makedirs(path, exist_ok=True)
    frames = np.lib.format.open_memmap(os.path.join(path, "frames.npy"), "w+", dtype, (n, size, size))
    _fill(sim, frames, chunk)
    frames.flush()
    del frames
    np.save(os.path.join(path, "positions_m.npy"), sim.positions_m)
    np.save(os.path.join(path, "object_phase.npy"), sim.object_phase)
    np.save(os.path.join(path, "probe.npy"), sim.probe)
    with open(os.path.join(path, "scan.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=1)
    return path


def load_scan(path: str) -> SavedScan:
    """Read back what :func:`save_scan` wrote (frames memory-mapped for .npy)."""
    if path.endswith((".h5", ".hdf5")):
        import h5py

        with h5py.File(path, "r") as handle:
            return SavedScan(
                handle["frames"][()],
                handle["positions_m"][()],
                handle["object_phase"][()],
                handle["probe"][()],
                json.loads(handle.attrs["metadata"]),
            )
    with open(os.path.join(path, "scan.json"), "r", encoding="utf-8") as handle:
        meta = json.load(handle)
    return SavedScan(
        np.load(os.path.join(path, "frames.npy"), mmap_mode="r"),
        np.load(os.path.join(path, "positions_m.npy")),
        np.load(os.path.join(path, "object_phase.npy")),
        np.load(os.path.join(path, "probe.npy")),
        meta,
    )


def _fill(sim: ScanSimulation, frames: np.ndarray, chunk: int) -> None:
    for first in range(0, len(sim), chunk):
        indices = list(range(first, min(first + chunk, len(sim))))
        frames[first : first + len(indices)] = sim.frame_batch(indices)
