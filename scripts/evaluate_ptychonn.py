#!/usr/bin/env python3
"""Measure a phase model on a simulated scan: per-patch and stitched accuracy against the truth.

Runs the model through the appliance's own engine loader (ONNX Runtime), so
what is measured is what the appliance serves. Needs numpy, onnxruntime and
tqdm (the progress bars, shown on a terminal only).

    python scripts/evaluate_ptychonn.py --model engines/ptychonn-small.onnx --frame-size 516
    python scripts/evaluate_ptychonn.py --table    # every case docs/model.md tabulates
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Dict, Tuple

import numpy as np
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from appliance.demo import accuracy  # noqa: E402
from appliance.engines import open_engine  # noqa: E402
from appliance.mosaic import Mosaic, MosaicImage  # noqa: E402
from appliance.sim.metrics import phase_figures, phase_rmse, ssim  # noqa: E402
from appliance.sim.scan import ScanSimulation, SimulationConfig  # noqa: E402
from appliance.sim.trajectory import ScanConfig  # noqa: E402

from ptychonn_data import beam_weight, model_input, stitch_weight  # noqa: E402

TEST_SEED = 12345  # the scan the shipped model's figures in docs/model.md refer to


def infer(model_path: str, inputs: np.ndarray, batch: int = 64) -> Dict[str, np.ndarray]:
    """Every output of the model by role ("phase", and "amplitude" where it has one)."""
    engine = open_engine(model_path, dynamic_batch=batch, cpu_threads=1)
    try:
        starts = tqdm(range(0, len(inputs), batch), desc="inference", unit="batch", disable=None)
        runs = [engine.run(inputs[i : i + batch]) for i in starts]
        return {role: np.concatenate([run[role] for run in runs]) for role in runs[0]}
    finally:
        engine.close()


def evaluate_scan(model_path: str, sim: ScanSimulation) -> Tuple[Dict[str, float], np.ndarray, np.ndarray]:
    """Figures for one scan, plus the model inputs and inferred phases (for golden pairs and pictures).

    Patch figures count the pixels the beam lights (smoothed intensity > 10% of
    its peak); the mosaic is stitched by the appliance's own Mosaic with
    :func:`stitch_weight`, compared over the scanned area the demo uses
    (appliance.demo.accuracy), and scored by :func:`phase_figures`: global
    offset removed, skill over the all-zero image, FRC resolution.
    """
    indices = list(range(len(sim)))
    n = sim.config.patch_size
    starts = tqdm(range(0, len(sim), 64), desc="simulating the scan", unit="batch", disable=None)
    inputs = np.concatenate([model_input(sim.frame_batch(indices[i : i + 64]), n) for i in starts])
    phases = infer(model_path, inputs)["phase"]
    truth = np.stack([sim.phase_patch(i) for i in indices])
    beam = beam_weight(sim.probe) > 0.1
    _, mosaic_truth, mosaic_phase, scanned = accuracy(sim, stitched(sim, phases))
    scores = phase_figures(mosaic_phase, mosaic_truth, scanned, sim.pixel_size_m)
    figures = {
        "patch_rmse_rad": phase_rmse(phases[:, beam], truth[:, beam]),
        "patch_ssim": float(np.mean([ssim(p, t, beam) for p, t in zip(phases[::10], truth[::10])])),
        **{"mosaic_" + key: value for key, value in scores.items()},
        "scanned_pixels": int(scanned.sum()),
        "overlap": round(sim.overlap, 3),
    }
    return figures, inputs, phases


def stitched(sim: ScanSimulation, phases: np.ndarray) -> MosaicImage:
    mosaic = Mosaic(sim.pixel_size_m, stitch_weight(sim.probe))
    for index, phase in enumerate(phases):
        mosaic.add(phase, (float(sim.positions_m[index][0]), float(sim.positions_m[index][1])), index + 1)
    return mosaic.snapshot()


# The cases docs/model.md tabulates: (label, changes to the command line's defaults).
CASES = (
    ("test shapes, 128x128 frames", {}),
    ("test shapes, 516x516 frames, crop 2 + bin 4", {"frame_size": 516}),
    ("test shapes, another sample (seed 777)", {"seed": 777}),
    ("test shapes, 300 nm step, 300 points (overlap 0.49)", {"step_nm": 300.0, "points": 300}),
    ("test shapes, raster 10x10, 700 nm step (no overlap)", {"pattern": "raster", "points": 100, "step_nm": 700.0}),
    ("test shapes, 1e7 photons", {"photons": 1e7}),
    ("test shapes, 1e5 photons (below training range)", {"photons": 1e5}),
    ("test shapes, 3e4 photons", {"photons": 3e4}),
    ("test shapes, 1e4 photons", {"photons": 1e4}),
    ("test shapes, zone plate with a 30 % central stop (unseen probe)", {"central_stop": 0.3}),
    ("etched (training-like) sample", {"kind": "etched"}),
)
_COLUMNS = ("mosaic_rmse_rad", "mosaic_ssim", "mosaic_skill", "mosaic_frc_resolution_nm", "mosaic_zero_ssim", "patch_rmse_rad")


def simulation(args: argparse.Namespace) -> ScanSimulation:
    base = SimulationConfig(seed=args.seed)
    return ScanSimulation(replace(
        base,
        sample=replace(base.sample, kind=args.kind),
        probe=replace(base.probe, central_stop=args.central_stop),
        detector=replace(base.detector, frame_size=args.frame_size, photons=args.photons),
        scan=ScanConfig(pattern=args.pattern, points=args.points, step_m=args.step_nm * 1e-9),
    ))


def table(args: argparse.Namespace) -> str:
    """Every case of :data:`CASES` as the markdown table docs/model.md shows."""
    lines = ["| case | " + " | ".join(_COLUMNS) + " |", "| --- |" + " --- |" * len(_COLUMNS)]
    for label, changes in CASES:
        figures = evaluate_scan(args.model, simulation(argparse.Namespace(**{**vars(args), **changes})))[0]
        lines.append("| {} | {} |".format(label, " | ".join("{:.3f}".format(figures[key]) for key in _COLUMNS)))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "engines", "ptychonn-small.onnx"))
    p.add_argument("--kind", default="shapes", choices=("shapes", "etched"))
    p.add_argument("--frame-size", type=int, default=128)
    p.add_argument("--photons", type=float, default=1e6)
    p.add_argument("--pattern", default="spiral", choices=("spiral", "raster"))
    p.add_argument("--points", type=int, default=1000)
    p.add_argument("--step-nm", type=float, default=150.0)
    p.add_argument("--central-stop", type=float, default=0.0, help="the probe's central stop, a fraction of the pupil")
    p.add_argument("--seed", type=int, default=TEST_SEED)
    p.add_argument("--save", help="write truth, mosaic and weights to this .npz")
    p.add_argument("--table", action="store_true", help="run every case docs/model.md tabulates; print the table")
    p.add_argument("--reference", choices=("lsqml", "epie"),
                   help="also reconstruct the scan with Pty-Chi (needs ptychi and torch) and report its figures")
    p.add_argument("--reference-epochs", type=int, default=50)
    p.add_argument("--refine-probe", action="store_true", help="Pty-Chi refines the probe (it starts from the true one)")
    args = p.parse_args()
    if args.table:
        print(table(args))
        return 0
    sim = simulation(args)
    figures, _, phases = evaluate_scan(args.model, sim)
    if args.reference:
        from ptychi_reference import reference_figures

        scores = reference_figures(sim, args.reference, args.reference_epochs, args.refine_probe)
        figures.update({"reference_" + key: value for key, value in scores.items()})
    print(json.dumps(figures, indent=1))
    if args.save:
        picture = stitched(sim, phases)
        np.savez_compressed(args.save, truth=sim.object_phase, mosaic=picture.phase, weights=picture.weights,
                            phases=phases[:16])
    return 0


if __name__ == "__main__":
    sys.exit(main())
