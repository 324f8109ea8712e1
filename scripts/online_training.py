#!/usr/bin/env python3
"""The field's online training loop: record a scan, retrieve its phase iteratively, fine-tune, hot-swap.

PtychoNN's authors trained on (diffraction frame, phase retrieved iteratively
from the same scan) and trained again as scans accumulated, until the network
was nearly as good as the iterative result: the model learns the beamline's own
probe instead of a simulator's. One turn of that here:

    ptychonn-edge record scan1.h5 --config /etc/ptychonn-edge/config.yaml
    python scripts/online_training.py round scan1.h5 --probe probe.npy --energy-kev 10 \\
        --model engines/ptychonn-small.onnx --deploy /var/lib/ptychonn-edge/engines

``round`` reconstructs the recorded scans with Pty-Chi (LSQML), cuts each frame's
phase patch from the reconstruction as its label, fine-tunes the serving model
on every scan given so far, exports it with manifest and golden pair, and
deploys it through the engines directory (the appliance validates and swaps it
between batches). ``demo`` runs the whole loop on a simulated beamline whose
probe (a zone plate with a central stop) the shipped model never saw, through a
real appliance, detector stand-in and ``record`` on loopback, and prints the
table docs/model.md shows.

Needs the venv of docs/model.md (torch, ptychi, onnx, onnxruntime, h5py).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from appliance.demo import model_pixel_size_m  # noqa: E402
from appliance.engines.manifest import manifest_path  # noqa: E402
from appliance.sim.metrics import phase_figures  # noqa: E402

from ptychi_reference import lit_area, reconstruct_frames  # noqa: E402
from ptychonn_data import Pairs, beam_weight, model_input  # noqa: E402

MARGIN_PX = 8
OFFSET_BIN_RAD = 0.01


@dataclass
class Recording:
    """One recorded scan as ``ptychonn-edge record`` writes it, with the grid it is reconstructed on."""

    frames: np.ndarray  # (n, N, N) counts as float32
    positions_m: np.ndarray  # (n, 2) x, y
    pixel_size_m: float
    origin_m: np.ndarray  # (x, y) of object pixel (0, 0)
    shape: Tuple[int, int]

    @property
    def centres_px(self) -> np.ndarray:
        """(row, col) beam centres in object pixels."""
        return ((self.positions_m - self.origin_m) / self.pixel_size_m)[:, ::-1]


def load_recording(path: str, pixel_size_m: float) -> Recording:
    """A recorded scan on an object grid of ``pixel_size_m`` (the model's output pixel) that holds every patch."""
    import h5py

    with h5py.File(path, "r") as handle:
        frames = handle["frames"][()].astype(np.float32)
        positions = handle["positions_m"][()]
    if not np.all(np.isfinite(positions)):
        raise SystemExit("{}: some frames have no position; the reconstruction needs every one".format(path))
    n = frames.shape[-1]
    low, high = positions.min(axis=0), positions.max(axis=0)
    span_px = np.ceil((high - low) / pixel_size_m).astype(int)
    shape = (int(span_px[1]) + n + 2 * MARGIN_PX, int(span_px[0]) + n + 2 * MARGIN_PX)
    origin = low - (n // 2 + MARGIN_PX) * pixel_size_m
    return Recording(frames, positions, pixel_size_m, origin, shape)


def background_to_zero(phase: np.ndarray, area: np.ndarray) -> np.ndarray:
    """The retrieved phase with its most common value over ``area`` set to 0 rad.

    An iterative reconstruction picks its own global offset; the network's phase
    is absolute with the sample's background at 0, and a sample's background is
    its most common phase.
    """
    wrapped = np.angle(np.exp(1j * phase))
    edges = np.arange(-np.pi, np.pi + OFFSET_BIN_RAD, OFFSET_BIN_RAD)
    counts, _ = np.histogram(wrapped[area], edges)
    offset = edges[np.argmax(counts)] + OFFSET_BIN_RAD / 2
    return np.angle(np.exp(1j * (wrapped - offset))).astype(np.float32)


def labels_from(recording: Recording, phase: np.ndarray) -> np.ndarray:
    """Each frame's label: the reconstruction's patch centred on the frame's beam (the simulator's convention)."""
    n = recording.frames.shape[-1]
    starts = np.floor(recording.centres_px).astype(int) - n // 2
    return np.stack([phase[r : r + n, c : c + n] for r, c in starts])


def reconstruct(recording: Recording, probe: np.ndarray, energy_kev: float, epochs: int,
                refine_probe: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(phase with background 0, lit area) of the recorded scan, by Pty-Chi LSQML."""
    photons = float(np.median(recording.frames.sum(axis=(1, 2))))
    obj = reconstruct_frames(recording.frames, recording.centres_px, recording.shape, probe, photons, energy_kev,
                             recording.pixel_size_m, "lsqml", epochs, refine_probe)
    area = lit_area(recording.centres_px, recording.shape, probe)
    return background_to_zero(np.angle(obj), area), area


def fine_tune(model_path: str, out: str, inputs: np.ndarray, labels: np.ndarray, probe: np.ndarray,
              args: Namespace) -> Dict[str, str]:
    """The model at ``model_path`` trained further on (inputs, labels); exported to ``out`` with manifest and golden pair."""
    import torch

    import train_ptychonn as training
    from evaluate_ptychonn import infer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(args.seed)
    model = training.from_onnx(model_path)
    if args.refit_normalise:  # the new probe's frames have their own per-pixel statistics
        model.net[0] = training.fit_normalise(inputs)
    held = np.arange(len(inputs)) % 10 == 0
    pairs = Pairs.retrieved(inputs, labels)
    weights = beam_weight(probe)[None]
    settings = Namespace(epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed, max_minutes=args.max_minutes)
    done = training.train(settings, model, pairs.take(~held), pairs.take(held), weights)
    validation = training.validate(model, pairs.take(held), weights)
    if os.path.exists(manifest_path(out)):
        os.remove(manifest_path(out))
    training.export(model, out, 17)
    golden_in = inputs[held][:4]
    build = {
        "fine_tuned_from": os.path.basename(model_path),
        "pairs": str(len(inputs)),
        "epochs": str(done["epochs"]),
        "steps": str(done["steps"]),
        "train_seconds": "{:.0f}".format(done["train_seconds"]),
        "validation_rmse_rad": "{:.4f}".format(validation),
        "labels": "Pty-Chi LSQML of the recorded scans, background set to 0 rad",
        "command": "python scripts/online_training.py " + " ".join(sys.argv[1:]),
    }
    training.write_golden_and_manifest(
        out, golden_in, infer(out, golden_in), "PtychoNN edge model fine-tuned on this beamline's recorded scans "
        "(labels retrieved iteratively by Pty-Chi); input raw counts, output phase in rad, background 0",
        model_pixel_size_m(model_path), build)
    return build


def deploy(model: str, directory: str) -> str:
    """Golden pair and manifest first, the model last by rename: the appliance sees one complete candidate."""
    stem = os.path.splitext(model)[0]
    for golden in glob.glob(glob.escape(stem) + ".golden-*.npy"):
        shutil.copyfile(golden, os.path.join(directory, os.path.basename(golden)))
    target = os.path.join(directory, os.path.basename(model))
    shutil.copyfile(manifest_path(model), manifest_path(target))
    shutil.copyfile(model, target + ".part")
    os.rename(target + ".part", target)
    return target


def learn(recordings: Sequence[Recording], phases: Sequence[np.ndarray], model: str, out: str, probe: np.ndarray,
          args: Namespace) -> Dict[str, str]:
    """Fine-tune on every recorded scan so far (the loop's data grows with each scan)."""
    patch = recordings[0].frames.shape[-1]
    inputs = np.concatenate([model_input(r.frames, patch) for r in recordings])
    labels = np.concatenate([labels_from(r, p) for r, p in zip(recordings, phases)])
    return fine_tune(model, out, inputs, labels, probe, args)


def run_round(args: Namespace) -> int:
    probe = np.load(args.probe)
    recordings = [load_recording(path, model_pixel_size_m(args.model)) for path in args.scans]
    phases = [reconstruct(r, probe, args.energy_kev, args.reference_epochs, args.refine_probe)[0] for r in recordings]
    build = learn(recordings, phases, args.model, args.out, probe, args)
    print(json.dumps(build, indent=1))
    if args.deploy:
        print("deployed {}".format(deploy(args.out, args.deploy)))
    return 0


# -- the demo: a simulated beamline -------------------------------------------------------------------------------
DETECTOR_PV = "ONLINE:det:Image"
PREFIX = "ONLINE"


def unseen_probe():
    """A zone plate focus with a central stop (30 % of the pupil): the shipped model was trained without one
    and loses the sample on it (docs/model.md)."""
    from appliance.sim.physics import ProbeConfig

    return ProbeConfig(central_stop=0.3)


def score(phase: np.ndarray, origin_m: Sequence[float], pixel_size_m: float, area: np.ndarray, sim) -> Dict[str, float]:
    """A phase image on its own grid against the simulated sample's truth (offset removed, skill, FRC)."""
    return phase_figures(phase, sim.phase_on_grid(origin_m, pixel_size_m, phase.shape), area, pixel_size_m)


class Beamline:
    """Detector stand-in, appliance (its engines directory watched) and viewers on loopback."""

    def __init__(self, work: str, model: str) -> None:
        from appliance.sim.loopback import free_ports, loopback_env

        mine, theirs = free_ports(), free_ports()
        os.environ.update(loopback_env(mine))
        from appliance.sim.detector import DetectorServer
        from appliance.sim.process import ApplianceProcess, write_config

        self.work = work
        self.engines = os.path.join(work, "engines")
        os.makedirs(self.engines, exist_ok=True)
        deploy(model, self.engines)
        self.pixel_size_m = model_pixel_size_m(model)
        config = write_config(os.path.join(work, "config.yaml"), DETECTOR_PV, PREFIX, engine_dir=self.engines,
                              publish={"status_period_s": 0.5},
                              mosaic={"publish_period_s": 0.5, "pixel_size_m": self.pixel_size_m})
        self.config = config
        self.env = dict(os.environ)
        self.env.update(loopback_env(theirs))
        self.detector = DetectorServer(DETECTOR_PV)
        self.app = ApplianceProcess(config, self.env, PREFIX, log_path=os.path.join(work, "appliance.log"))
        self.app.wait_ready(120)
        from appliance.sim.viewer import Viewer

        self.phases = Viewer(PREFIX + ":Phase")
        self.mosaics = Viewer(PREFIX + ":Mosaic", queue_size=10)

    def scan(self, sim, path: str, rate_hz: float) -> Tuple[List, object]:
        """Stream ``sim`` to the appliance while ``ptychonn-edge record`` writes it to ``path``;
        the phases published for it and the last P:Mosaic of it (uniqueIds restart: a new acquisition).

        P:Mosaic's uniqueId counts patches stitched since the appliance started, across resets, so
        the scan's complete mosaic is the first one numbered ``len(frames)`` past the last before it.
        """
        from appliance.sim.serve import prepare, serve_in_background

        frames = prepare(sim)
        phases_before = len(self.phases.items)
        before = self.mosaics.latest()
        complete_at = (before.unique_id if before is not None else 0) + len(frames)
        recorder = subprocess.Popen([sys.executable, "-m", "appliance.cli", "record", path, "--config", self.config,
                                     "--max-frames", str(len(frames)), "--idle-s", "5"],
                                    env=self.env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert recorder.stdout is not None
        print("  record: " + recorder.stdout.readline().strip(), flush=True)  # "connected to ...": frames may flow
        serve_in_background(self.detector, frames, rate_hz).join()
        received = self.phases.wait_for(phases_before + len(frames), timeout=120)[phases_before:]
        print("  record: " + recorder.stdout.read().strip(), flush=True)
        if recorder.wait(60) != 0:
            raise SystemExit("record failed on {}".format(path))

        def last_mosaic():
            latest = self.mosaics.latest()
            return latest if latest is not None and latest.unique_id >= complete_at else None

        deadline = time.monotonic() + 30
        while last_mosaic() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # P:Mosaic goes out every publish_period_s
        return received, last_mosaic()

    def swap_to(self, name: str) -> Dict[str, object]:
        """Wait until the appliance serves ``name`` (its own validation passed) or rejected it."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = self.app.details()
            if status["engine_name"] == name:
                return status
            verdict = next((v for v in status["engine_verdicts"] if v["file"] == name and not v["accepted"]), None)
            if verdict:
                raise SystemExit("the appliance rejected {}: {}".format(name, verdict["reason"]))
            time.sleep(0.5)
        raise SystemExit("{} not served after 300 s".format(name))

    def close(self) -> int:
        self.phases.close()
        self.mosaics.close()
        code = self.app.stop()
        self.detector.close()
        return code


def run_demo(args: Namespace) -> int:
    from appliance import schema
    from appliance.demo import offline_mosaic
    from appliance.sim.scan import ScanSimulation, SimulationConfig

    work = args.out or tempfile.mkdtemp(prefix="ptychonn-online-")
    os.makedirs(work, exist_ok=True)
    beamline = Beamline(work, args.model)
    model = os.path.join(beamline.engines, os.path.basename(args.model))
    recordings: List[Recording] = []
    phases: List[np.ndarray] = []
    rows = []
    try:
        for round_index in range(args.rounds + 1):
            sim = ScanSimulation(replace(schema.load(SimulationConfig, {
                "seed": args.seed + round_index, "pixel_size_m": beamline.pixel_size_m,
                "sample": {"kind": "shapes"}, "scan": {"points": args.points}}, "demo settings"), probe=unseen_probe()))
            print("round {}: serving {}; a {}-point scan of a new sample (seed {})".format(
                round_index, os.path.basename(model), len(sim), args.seed + round_index), flush=True)
            path = os.path.join(work, "scan-{}.h5".format(round_index))
            received, live = beamline.scan(sim, path, args.rate)
            picture = offline_mosaic(received, beamline.pixel_size_m)
            scanned = picture.weights >= 0.25 * picture.weights.max()
            network = score(picture.phase, picture.origin_m, picture.pixel_size_m, scanned, sim)
            live_diff = float(np.abs(live.image - picture.phase).max()) if live is not None else float("nan")
            recording = load_recording(path, beamline.pixel_size_m)
            started = time.monotonic()
            phase, area = reconstruct(recording, sim.probe, sim.config.probe.energy_kev, args.reference_epochs, False)
            reference_s = time.monotonic() - started
            reference = score(phase, recording.origin_m, recording.pixel_size_m, area, sim)
            row = {"round": round_index, "model": os.path.basename(model), "frames": len(received),
                   "recorded": len(recording.frames), "live_vs_offline_rad": live_diff,
                   "network": network, "ptychi": reference, "ptychi_s": reference_s}
            recordings.append(recording)
            phases.append(phase)
            if round_index < args.rounds:
                out = os.path.join(work, "models", "online-r{}.onnx".format(round_index + 1))
                os.makedirs(os.path.dirname(out), exist_ok=True)
                started = time.monotonic()
                row["build"] = learn(recordings, phases, model, out, sim.probe, args)
                row["fine_tune_s"] = time.monotonic() - started
                deploy(out, beamline.engines)
                beamline.swap_to(os.path.basename(out))
                model = out
            rows.append(row)
            print(json.dumps(row, indent=1, default=str), flush=True)
    finally:
        code = beamline.close()
    with open(os.path.join(work, "rounds.json"), "w") as handle:
        json.dump(rows, handle, indent=1, default=str)
    print(table(rows))
    print("appliance exit code {}; work in {}".format(code, work))
    return 0 if code == 0 else 1


def table(rows: Sequence[Dict]) -> str:
    lines = ["| round | model serving | frames published / recorded | live mosaic RMSE (rad) | skill | FRC (nm) | "
             "Pty-Chi RMSE (rad) | skill | FRC (nm) |", "| --- |" + " --- |" * 8]
    for row in rows:
        n, p = row["network"], row["ptychi"]
        lines.append("| {} | {} | {} / {} | {:.3f} | {:.3f} | {:.1f} | {:.3f} | {:.3f} | {:.1f} |".format(
            row["round"], row["model"], row["frames"], row["recorded"], n["rmse_rad"], n["skill"],
            n["frc_resolution_nm"], p["rmse_rad"], p["skill"], p["frc_resolution_nm"]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("round", "demo"):
        sub = commands.add_parser(name)
        sub.add_argument("--model", default=os.path.join(ROOT, "engines", "ptychonn-small.onnx"),
                         help="the serving model (ONNX with its manifest), fine-tuned from")
        sub.add_argument("--reference-epochs", type=int, default=50, help="Pty-Chi LSQML epochs")
        sub.add_argument("--epochs", type=int, default=4, help="fine-tuning passes over the recorded pairs")
        sub.add_argument("--batch", type=int, default=16)
        sub.add_argument("--lr", type=float, default=3e-4)
        sub.add_argument("--seed", type=int, default=21)
        sub.add_argument("--max-minutes", type=float, default=20.0, help="stop fine-tuning past this")
        sub.add_argument("--no-refit-normalise", dest="refit_normalise", action="store_false",
                         help="keep the model's per-pixel input statistics instead of refitting them to the recorded frames")
        if name == "round":
            sub.add_argument("scans", nargs="+", help="HDF5 files written by ptychonn-edge record (all used)")
            sub.add_argument("--probe", required=True, help=".npy complex probe on the model's patch grid")
            sub.add_argument("--energy-kev", type=float, required=True)
            sub.add_argument("--refine-probe", action="store_true", help="Pty-Chi refines the probe from --probe")
            sub.add_argument("--out", required=True, help="the fine-tuned model to write (.onnx)")
            sub.add_argument("--deploy", help="engines directory to deploy the new model into")
        else:
            sub.add_argument("--rounds", type=int, default=3)
            sub.add_argument("--points", type=int, default=1000)
            sub.add_argument("--rate", type=float, default=100.0)
            sub.add_argument("--out", help="work directory (default: a new temporary one)")
    args = parser.parse_args()
    return run_round(args) if args.command == "round" else run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
