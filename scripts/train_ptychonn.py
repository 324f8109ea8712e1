#!/usr/bin/env python3
"""Train the PtychoNN edge model on simulated scans, export it to ONNX with its manifest.

Needs the ``train`` extra (PyTorch, onnx) plus onnxruntime; none of it is a
runtime dependency of the appliance. Runs on one CPU thread in under half an
hour with the defaults; ``docs/model.md`` has the command, settings and
results of the shipped model.

    python scripts/train_ptychonn.py --out engines/ptychonn-small.onnx
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from typing import Dict, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from appliance.engines.base import file_sha256  # noqa: E402
from appliance.engines.manifest import GoldenPair, Manifest, TrainedPreprocess, write_manifest  # noqa: E402
from appliance.sim import physics  # noqa: E402
from appliance.sim.metrics import phase_rmse, ssim  # noqa: E402
from appliance.sim.objects import TRAINING  # noqa: E402
from appliance.sim.physics import DetectorSpec  # noqa: E402
from appliance.sim.scan import ScanSimulation, SimulationConfig  # noqa: E402
from ptychonn_data import OVERSAMPLED_FRAME, beam_weight, model_input, stitch, training_pairs  # noqa: E402

# Photons per frame the input scaling refers to: a frame is rescaled to this total before log1p,
# so the network sees the same numbers at any budget and after sum- or mean-binning.
REFERENCE_PHOTONS = 1e6
INPUT_NAME = "diffraction"
OUTPUT_NAME = "phase"


class Normalise(nn.Module):
    """Raw counts -> log1p(counts rescaled to REFERENCE_PHOTONS per frame), inside the graph.

    The appliance feeds raw counts (after crop/bin), so the scaling must travel
    with the model; dividing by the frame's own total makes the model blind to
    the photon budget and to mean- versus sum-binning.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
        return torch.log1p(x.clamp(min=0.0) * (REFERENCE_PHOTONS / total)) * 0.25


def _block(c_in: int, c_out: int) -> list:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(inplace=True)]


class PtychoNNSmall(nn.Module):
    """The edge model: 4 down blocks (16/32/64/128), 4 up blocks (128/64/32/16), phase = pi * tanh."""

    def __init__(self) -> None:
        super().__init__()
        layers: list = [Normalise()]
        channels = 1
        for width in (16, 32, 64, 128):
            layers += _block(channels, width) + [nn.MaxPool2d(2)]
            channels = width
        for width in (128, 64, 32, 16):
            layers += _block(channels, width) + [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            channels = width
        layers += [nn.Conv2d(channels, 1, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * math.pi


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "engines", "ptychonn-small.onnx"))
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--photons", type=float, nargs=2, default=(2.5e5, 4e6), help="log-uniform budget range per frame")
    p.add_argument("--oversampled-share", type=float, default=0.2, help="share of pairs recorded at 516x516 and binned")
    p.add_argument("--max-minutes", type=float, default=40.0, help="stop training early (and say so) past this")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--opset", type=int, default=17)
    return p.parse_args()


def log(message: str) -> None:
    print("[{}] {}".format(time.strftime("%H:%M:%S"), message), flush=True)


def train(args: argparse.Namespace, model: nn.Module, data: Dict[str, np.ndarray], weight: np.ndarray) -> Dict[str, float]:
    """Adam + cosine decay on a probe-weighted L1 loss; returns what was done."""
    frames = torch.from_numpy(data["train_x"]).unsqueeze(1)
    labels = torch.from_numpy(data["train_y"]).unsqueeze(1)
    w = torch.from_numpy(weight)[None, None]
    steps_per_epoch = len(frames) // args.batch
    total_steps = steps_per_epoch * args.epochs
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, args.lr, total_steps=total_steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(args.seed)
    model = model.to(memory_format=torch.channels_last)
    start = time.time()
    step = 0
    epochs_done = 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(frames), generator=generator)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * args.batch : (b + 1) * args.batch]
            x = frames[idx].contiguous(memory_format=torch.channels_last)
            loss = ((model(x) - labels[idx]).abs() * w).sum() / (w.sum() * len(idx))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            running += float(loss)
            step += 1
            if step % 100 == 0:
                log("epoch {} step {}/{} loss {:.4f} ({:.0f} s)".format(epoch + 1, step, total_steps, running / (b + 1), time.time() - start))
            if time.time() - start > args.max_minutes * 60:
                break
        epochs_done = epoch + 1
        val = validate(model, data["val_x"], data["val_y"], weight)
        log("epoch {} done: train L1 {:.4f}, validation weighted RMSE {:.4f} rad".format(epochs_done, running / max(b + 1, 1), val))
        if time.time() - start > args.max_minutes * 60:
            log("stopping early: past --max-minutes")
            break
    return {"epochs": epochs_done, "steps": step, "train_seconds": time.time() - start}


def predict(model: nn.Module, frames: np.ndarray, batch: int = 64) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for first in range(0, len(frames), batch):
            x = torch.from_numpy(frames[first : first + batch]).unsqueeze(1).contiguous(memory_format=torch.channels_last)
            out.append(model(x)[:, 0].numpy())
    return np.concatenate(out)


def weighted_rmse(estimate: np.ndarray, truth: np.ndarray, weight: np.ndarray) -> float:
    return float(np.sqrt(np.sum((estimate - truth) ** 2 * weight) / (np.sum(weight) * len(truth))))


def validate(model: nn.Module, frames: np.ndarray, labels: np.ndarray, weight: np.ndarray) -> float:
    return weighted_rmse(predict(model, frames), labels, weight)


def export(model: nn.Module, path: str, opset: int) -> None:
    model = model.to(memory_format=torch.contiguous_format).eval()
    dummy = torch.zeros(1, 1, 128, 128)
    torch.onnx.export(
        model,
        (dummy,),
        path,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )


def onnx_predict(path: str, frames: np.ndarray) -> np.ndarray:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    out = [session.run([OUTPUT_NAME], {INPUT_NAME: frames[i : i + 64, None]})[0][:, 0] for i in range(0, len(frames), 64)]
    return np.concatenate(out)


def evaluate_scan(onnx_path: str, sim: ScanSimulation, weight: np.ndarray) -> Tuple[Dict[str, float], np.ndarray, np.ndarray]:
    """Per-patch and stitched accuracy of the exported model on one scan; returns (figures, inputs, phases)."""
    indices = list(range(len(sim)))
    inputs = np.concatenate([model_input(sim.frame_batch(indices[i : i + 64]), sim.config.patch_size) for i in range(0, len(sim), 64)])
    phases = onnx_predict(onnx_path, inputs)
    truth = np.stack([sim.phase_patch(i) for i in indices])
    beam = weight > 0.1
    mosaic, weights = stitch(sim, phases, weight)
    scanned = weights >= 0.25 * weights.max()
    figures = {
        "patch_rmse_rad": phase_rmse(phases[:, beam], truth[:, beam]),
        "patch_ssim": float(np.mean([ssim(p, t, beam) for p, t in zip(phases[::10], truth[::10])])),
        "mosaic_rmse_rad": phase_rmse(mosaic, sim.object_phase, scanned),
        "mosaic_ssim": ssim(mosaic, sim.object_phase, scanned),
        "scanned_pixels": int(scanned.sum()),
        "overlap": sim.overlap,
    }
    return figures, inputs, phases


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    test_config = SimulationConfig(seed=12345)
    probe = physics.make_probe(test_config.probe, test_config.patch_size, test_config.pixel_size_m)
    weight = beam_weight(probe)
    sample = test_config.sample
    t0 = time.time()

    def pairs(count: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
        return training_pairs(count, seed, probe, test_config.detector, tuple(args.photons), args.oversampled_share, sample.max_phase_rad, sample.absorption_ratio)

    train_x, train_y = pairs(args.train_size, args.seed)
    val_x, val_y = pairs(args.val_size, args.seed + 1000)
    data_seconds = time.time() - t0
    log("{} training and {} validation pairs in {:.0f} s".format(len(train_x), len(val_x), data_seconds))

    model = PtychoNNSmall()
    parameters = sum(p.numel() for p in model.parameters())
    log("model: {} parameters".format(parameters))
    done = train(args, model, {"train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y}, weight)
    val_rmse = validate(model, val_x, val_y, weight)
    log("validation weighted RMSE {:.4f} rad after {} epochs, {:.0f} s".format(val_rmse, done["epochs"], done["train_seconds"]))

    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    export(model, out, args.opset)

    test = {}
    sims = {
        "test_128": ScanSimulation(test_config),
        "test_516": ScanSimulation(replace(test_config, detector=replace(test_config.detector, frame_size=OVERSAMPLED_FRAME))),
        "etched_128": ScanSimulation(replace(test_config, sample=replace(sample, kind=TRAINING))),
    }
    golden_in = None
    for name, sim in sims.items():
        figures, inputs, phases = evaluate_scan(out, sim, weight)
        test[name] = figures
        log("{}: {}".format(name, json.dumps(figures)))
        if golden_in is None:
            golden_in, golden_out = inputs[:8:2].copy(), phases[:8:2].copy()
    torch_out = predict(model, golden_in)
    log("onnx vs torch max |diff| on the golden batch: {:.2e}".format(float(np.abs(torch_out - golden_out).max())))

    stem = os.path.splitext(os.path.basename(out))[0]
    np.save(os.path.join(os.path.dirname(out), stem + ".golden-input.npy"), golden_in.astype(np.float32))
    np.save(os.path.join(os.path.dirname(out), stem + ".golden-phase.npy"), golden_out.astype(np.float32))
    build = {
        "torch": str(torch.__version__),
        "opset": str(args.opset),
        "parameters": str(parameters),
        "epochs": str(done["epochs"]),
        "steps": str(done["steps"]),
        "batch": str(args.batch),
        "train_size": str(args.train_size),
        "train_seconds": "{:.0f}".format(done["train_seconds"]),
        "photons": "{:g}..{:g}".format(*args.photons),
        "validation_rmse_rad": "{:.4f}".format(val_rmse),
        "test_mosaic_ssim": "{:.3f}".format(test["test_128"]["mosaic_ssim"]),
        "test_mosaic_rmse_rad": "{:.4f}".format(test["test_128"]["mosaic_rmse_rad"]),
        "command": "python scripts/train_ptychonn.py " + " ".join(sys.argv[1:]),
    }
    manifest = Manifest(
        description=(
            "PtychoNN edge model (phase only) trained on simulated etched samples; input raw counts "
            "(any photon budget: each frame is rescaled to 1e6 photons and log1p'd inside the graph); "
            "output phase in rad, background 0, meaningful within the beam (~{:.0f} nm)".format(sims["test_128"].beam_diameter_m * 1e9)
        ),
        outputs={"phase": OUTPUT_NAME},
        pixel_size_m=test_config.pixel_size_m,
        preprocess=TrainedPreprocess(crop=(0, 0, 0, 0), bin=1),
        golden=GoldenPair(input=stem + ".golden-input.npy", phase=stem + ".golden-phase.npy", atol=0.02, rtol=0.01),
        sha256=file_sha256(out),
        build=build,
    )
    log("wrote {}".format(write_manifest(out, manifest)))
    summary = {"validation_rmse_rad": val_rmse, "data_seconds": data_seconds, **done, "test": test, "parameters": parameters}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
