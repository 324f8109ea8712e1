#!/usr/bin/env python3
"""The iterative reference: Pty-Chi (the APS's PyTorch ptychography engines) on a simulated scan.

Reconstructs the same scan the network is measured on, with the probe known
(the simulator's) or refined from it, and scores the object's phase with the
same figures (appliance.sim.metrics.phase_figures) over the scanned area.
Needs ptychi and torch (a venv of their own: see docs/model.md); run through
``evaluate_ptychonn.py --reference lsqml`` (or ``epie``).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Dict, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from appliance.sim.metrics import phase_figures  # noqa: E402
from appliance.sim.scan import ScanSimulation  # noqa: E402


def reconstruct(sim: ScanSimulation, algorithm: str, epochs: int, refine_probe: bool) -> np.ndarray:
    """The complex object Pty-Chi retrieves on the simulator's object grid (same origin and pixels)."""
    n = sim.config.patch_size
    frames = sim.frame_batch(range(len(sim))).astype(np.float32)
    if frames.shape[-1] != n:
        raise SystemExit("the reference runs on {}x{} frames (the patch size); got {}".format(n, n, frames.shape[-1]))
    return reconstruct_frames(frames, sim.centre_px(range(len(sim))), sim.object.shape, sim.probe,
                              sim.config.detector.photons, sim.config.probe.energy_kev, sim.pixel_size_m,
                              algorithm, epochs, refine_probe)


def reconstruct_frames(frames: np.ndarray, centres_px: np.ndarray, object_shape: Tuple[int, int], probe: np.ndarray,
                       photons: float, energy_kev: float, pixel_size_m: float, algorithm: str, epochs: int,
                       refine_probe: bool) -> np.ndarray:
    """Pty-Chi on measured frames: ``centres_px`` are the (row, col) beam centres in pixels of the object grid.

    ``probe`` is normalised to sum |P|^2 = 1 (the simulator's convention) and
    scaled here by the photons per frame: the simulator's far field is
    photons * |FFT(P O)|^2 / n^2, Pty-Chi's is |FFT(P O)|^2.
    """
    import ptychi.api as api
    import torch
    from ptychi.api.task import PtychographyTask

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    n = frames.shape[-1]
    scaled = (probe * np.sqrt(photons) / n).astype(np.complex64)
    options = api.LSQMLOptions() if algorithm == "lsqml" else api.EPIEOptions()
    options.data_options.data = np.ascontiguousarray(frames, dtype=np.float32)
    options.data_options.wavelength_m = 1.2398e-9 / energy_kev
    options.object_options.initial_guess = torch.ones((1,) + tuple(object_shape), dtype=torch.complex64)
    options.object_options.pixel_size_m = pixel_size_m
    options.object_options.optimizable = True
    options.object_options.determine_position_origin_coords_by = api.enums.ObjectPosOriginCoordsMethods.SPECIFIED
    options.object_options.position_origin_coords = (0.0, 0.0)
    options.probe_options.initial_guess = torch.from_numpy(scaled[None, None])
    options.probe_options.optimizable = refine_probe
    options.probe_position_options.position_y_px = centres_px[:, 0]
    options.probe_position_options.position_x_px = centres_px[:, 1]
    options.probe_position_options.optimizable = False
    options.reconstructor_options.num_epochs = epochs
    options.reconstructor_options.batch_size = min(len(frames), 32)
    if algorithm == "lsqml":
        options.reconstructor_options.noise_model = api.NoiseModels.POISSON
    options.object_options.step_size = 1.0 if algorithm == "lsqml" else 0.5
    options.probe_options.step_size = 1.0 if algorithm == "lsqml" else 0.5
    task = PtychographyTask(options)
    task.run()
    return task.get_data_to_cpu("object", as_numpy=True)[0]


def scanned_area(sim: ScanSimulation) -> np.ndarray:
    """Object pixels whose summed beam intensity is at least a quarter of its peak (the mosaic's rule)."""
    return lit_area(sim.centre_px(range(len(sim))), sim.object.shape, sim.probe)


def lit_area(centres_px: np.ndarray, object_shape: Tuple[int, int], probe: np.ndarray) -> np.ndarray:
    """:func:`scanned_area` for beam centres on any object grid."""
    n = probe.shape[0]
    weight = np.zeros(object_shape)
    intensity = np.abs(probe) ** 2
    for r, c in np.floor(centres_px).astype(int) - n // 2:
        weight[r : r + n, c : c + n] += intensity
    return weight >= 0.25 * weight.max()


def reference_figures(sim: ScanSimulation, algorithm: str, epochs: int, refine_probe: bool) -> Dict[str, float]:
    """Pty-Chi's reconstruction of ``sim`` scored like the network's mosaic (on the object grid)."""
    started = time.monotonic()
    obj = reconstruct(sim, algorithm, epochs, refine_probe)
    figures = phase_figures(np.angle(obj), sim.object_phase, scanned_area(sim), sim.pixel_size_m)
    figures["seconds"] = time.monotonic() - started
    return figures
