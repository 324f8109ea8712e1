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
from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence

import numpy as np
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional  # noqa: E402
from torch.nn.utils.fusion import fuse_conv_bn_eval  # noqa: E402

from appliance.engines.files import file_sha256  # noqa: E402
from appliance.engines.manifest import GoldenPair, Manifest, TrainedPreprocess, manifest_path, write_manifest  # noqa: E402
from appliance.sim import physics  # noqa: E402
from appliance.sim.detector_model import DetectorUnit  # noqa: E402
from appliance.sim.objects import TRAINING  # noqa: E402
from appliance.sim.scan import ScanSimulation, SimulationConfig  # noqa: E402

from evaluate_ptychonn import evaluate_scan, infer  # noqa: E402
from ptychonn_data import OVERSAMPLED_FRAME, Pairs, Variety, beam_weight, detector_bank, probe_bank, training_pairs  # noqa: E402

# Photons per frame the input scaling refers to: a frame is rescaled to this total before log1p,
# so the network sees the same numbers at any budget and after sum- or mean-binning.
REFERENCE_PHOTONS = 1e6
LOSS_FLOOR = 0.01
INPUT_NAME = "diffraction"
OUTPUT_NAME = "phase"
AMPLITUDE_NAME = "amplitude"
OUTPUT_NAMES = {"phase": OUTPUT_NAME, "amplitude": AMPLITUDE_NAME}  # manifest role -> ONNX output


class Normalise(nn.Module):
    """Raw counts -> standardised log counts, inside the graph so the appliance can feed raw counts.

    Each frame is first rescaled to REFERENCE_PHOTONS in total, which makes the
    model blind to the photon budget and to mean- versus sum-binning; then
    log1p, then a per-pixel standardisation with the training set's mean and
    spread. The last step matters: the sample shows up as a few-percent
    modulation of the bright pupil disc, invisible next to the disc's edge
    until every pixel is measured against its own typical value.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, 1, *mean.shape[-2:]).clone())
        self.register_buffer("std", std.reshape(1, 1, *std.shape[-2:]).clone())

    @staticmethod
    def log_counts(x: torch.Tensor) -> torch.Tensor:
        total = x.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
        return torch.log1p(x.clamp(min=0.0) * (REFERENCE_PHOTONS / total))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.log_counts(x) - self.mean) / self.std


def _block(c_in: int, c_out: int) -> list:
    """conv-BN-ReLU twice; the BatchNorms train the net out of its trivial start and are folded away on export."""
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class PtychoNNSmall(nn.Module):
    """The edge model: 4 down blocks (16/32/64/128), 4 up blocks (128/64/32/16), phase = pi * tanh.

    With ``amplitude`` the head has a second channel, amplitude = exp(-softplus)
    in (0, 1]: a thin film can only absorb.
    """

    def __init__(self, normalise: Normalise, amplitude: bool = False) -> None:
        super().__init__()
        self.amplitude = amplitude
        layers: list = [normalise]
        channels = 1
        for width in (16, 32, 64, 128):
            layers += _block(channels, width) + [nn.MaxPool2d(2)]
            channels = width
        for width in (128, 64, 32, 16):
            layers += _block(channels, width) + [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            channels = width
        layers += [nn.Conv2d(channels, 2 if amplitude else 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor):
        """(batch, channels, N, N): phase, then amplitude; exported, the two are the graph's named outputs."""
        y = self.net(x)
        if not self.amplitude:
            return torch.tanh(y) * math.pi
        phase = torch.tanh(y[:, :1]) * math.pi
        amplitude = torch.exp(-functional.softplus(y[:, 1:]))
        if torch.onnx.is_in_onnx_export():
            return phase, amplitude
        return torch.cat([phase, amplitude], dim=1)

    def fold_batchnorm(self) -> None:
        """Fold each BatchNorm into the conv before it (eval mode): the shipped graph is convs only."""
        self.eval()
        layers = list(self.net)
        fused: list = []
        for layer in layers:
            if isinstance(layer, nn.BatchNorm2d):
                fused[-1] = fuse_conv_bn_eval(fused[-1], layer)
            else:
                fused.append(layer)
        self.net = nn.Sequential(*fused)


def fit_normalise(frames: np.ndarray) -> Normalise:
    """Per-pixel mean and spread of the log counts over the training frames."""
    logs = torch.cat([Normalise.log_counts(torch.from_numpy(frames[i : i + 1024]).unsqueeze(1)) for i in range(0, len(frames), 1024)])
    return Normalise(logs.mean(dim=0), logs.std(dim=0).clamp(min=0.05))


@dataclass
class PoissonTerm:
    """How far the counts of each natively recorded frame are from what the predicted object would give.

    The model's object (its amplitude, or the simulator's absorption tied to
    the phase for a phase-only model) times the pair's probe is propagated to
    the detector as ``physics.expected_counts`` does and seen through the
    pair's detector unit (gain, background, bad pixels). The Poisson deviance
    against the recorded counts, per recorded count, is what a noisy frame can
    vouch for: at 1e4 photons the L1 term alone trains on labels the frame
    cannot support. Frames binned from 516 pixels are not re-simulated.
    """

    probes: torch.Tensor  # (P, N, N) complex64
    gains: torch.Tensor  # (U, N, N)
    backgrounds: torch.Tensor  # (U,)
    counted: torch.Tensor  # (U, N, N) 1 where a pixel counts, 0 at gaps and dead pixels
    absorption_ratio: float
    weight: float

    @classmethod
    def of(cls, probes: np.ndarray, units: Sequence[DetectorUnit], absorption_ratio: float, weight: float) -> PoissonTerm:
        shape = probes.shape[-2:]
        gains = [np.ones(shape, np.float32) if u.gain is None else u.gain.astype(np.float32) for u in units]
        return cls(torch.from_numpy(probes), torch.from_numpy(np.stack(gains)),
                   torch.tensor([u.spec.background for u in units], dtype=torch.float32),
                   torch.from_numpy(np.stack([~u.bad_pixels for u in units]).astype(np.float32)), absorption_ratio, weight)

    def __call__(self, prediction: torch.Tensor, counts: torch.Tensor, pairs: Pairs, batch: np.ndarray) -> torch.Tensor:
        """``prediction`` and ``counts`` are the model's output and input for the pairs ``pairs[batch]``."""
        native = np.flatnonzero(pairs.native[batch])
        if not len(native):
            return prediction.new_zeros(())
        rows, source = torch.from_numpy(native), batch[native]
        phase = prediction[rows, 0]
        amplitude = prediction[rows, 1] if prediction.shape[1] > 1 else torch.exp(-self.absorption_ratio * phase)
        probe = self.probes[torch.from_numpy(pairs.probe_index[source].astype(np.int64))]
        unit = torch.from_numpy(pairs.unit_index[source].astype(np.int64))
        wave = probe * torch.polar(amplitude, phase)
        spectrum = torch.fft.fftshift(torch.fft.fft2(wave), dim=(-2, -1))
        photons = torch.from_numpy(pairs.photons[source])[:, None, None]
        intensity = (spectrum.real ** 2 + spectrum.imag ** 2) / (wave.shape[-1] ** 2)
        mean = (intensity * photons * self.gains[unit] + self.backgrounds[unit][:, None, None]).clamp(min=1e-6)
        observed = counts[rows, 0]
        # k log k apart from k log mu: xlogy's gradient in its second argument is 0/0 where k = 0
        deviance = mean - observed + torch.xlogy(observed, observed) - observed * torch.log(mean)
        return self.weight * (deviance * self.counted[unit]).sum() / observed.sum().clamp(min=1.0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "engines", "ptychonn-small.onnx"))
    p.add_argument("--train-size", type=int, default=24000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--photons", type=float, nargs=2, default=(2.5e5, 4e6), help="log-uniform budget range per frame")
    p.add_argument("--probe-variety", type=int, default=1, help="zone plates and alignments to train on (1: the test probe only)")
    p.add_argument("--detector-variety", type=int, default=0, help="imperfect detector units besides the ideal one")
    p.add_argument("--amplitude", action="store_true", help="a second output, the amplitude")
    p.add_argument("--poisson-weight", type=float, default=0.0, help="weight of the Poisson deviance of re-simulated frames")
    p.add_argument("--oversampled-share", type=float, default=0.2, help="share of pairs recorded at 516x516 and binned")
    p.add_argument("--max-minutes", type=float, default=40.0, help="stop training early (and say so) past this")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--opset", type=int, default=17)
    return p.parse_args()


def log(message: str) -> None:
    tqdm.write("[{}] {}".format(time.strftime("%H:%M:%S"), message))  # above a progress bar, not through it


def train(args: argparse.Namespace, model: PtychoNNSmall, pairs: Pairs, val: Pairs, weights: np.ndarray,
          poisson: Optional[PoissonTerm] = None) -> Dict[str, float]:
    """Adam + one-cycle decay on an L1 loss weighted by each pair's beam (``weights[probe_index]``),
    plus the amplitude's L1 and the Poisson term where asked; returns what was done."""
    if model.amplitude and pairs.amplitudes is None:
        raise SystemExit("an amplitude model needs amplitude labels; these pairs have phases only")
    frames = torch.from_numpy(pairs.frames).unsqueeze(1)
    labels = torch.from_numpy(pairs.labels).unsqueeze(1)
    if model.amplitude:
        labels = torch.cat([labels, torch.from_numpy(pairs.amplitudes).unsqueeze(1)], dim=1)
    # A small floor outside the beam teaches the network to stay near the background there
    # instead of painting noise into the published patches.
    beams = torch.from_numpy(weights + LOSS_FLOOR)
    steps_per_epoch = len(frames) // args.batch
    total_steps = steps_per_epoch * args.epochs
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, args.lr, total_steps=total_steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(args.seed)
    model = model.to(memory_format=torch.channels_last)
    start = time.time()
    step = 0
    epochs_done = 0
    progress = tqdm(total=total_steps, desc="training", unit="step", disable=None)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(frames), generator=generator)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * args.batch : (b + 1) * args.batch]
            x = frames[idx].contiguous(memory_format=torch.channels_last)
            w = beams[torch.from_numpy(pairs.probe_index[idx.numpy()].astype(np.int64))].unsqueeze(1)
            prediction = model(x)
            loss = ((prediction - labels[idx]).abs() * w).sum() / w.sum()
            if poisson is not None:
                loss = loss + poisson(prediction, x, pairs, idx.numpy())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            running += float(loss.detach())
            step += 1
            progress.update()
            progress.set_postfix(epoch=epoch + 1, loss="{:.4f}".format(running / (b + 1)), refresh=False)
            if step % 100 == 0:
                log("epoch {} step {}/{} loss {:.4f} ({:.0f} s)".format(epoch + 1, step, total_steps, running / (b + 1), time.time() - start))
            if time.time() - start > args.max_minutes * 60:
                break
        epochs_done = epoch + 1
        log("epoch {} done: train loss {:.4f}, validation weighted RMSE {:.4f} rad".format(
            epochs_done, running / max(b + 1, 1), validate(model, val, weights)))
        if time.time() - start > args.max_minutes * 60:
            log("stopping early: past --max-minutes")
            break
    progress.close()
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
    return float(np.sqrt(np.sum((estimate - truth) ** 2 * weight) / np.sum(np.broadcast_to(weight, truth.shape))))


def validate(model: nn.Module, pairs: Pairs, weights: np.ndarray) -> float:
    """Phase RMSE weighted by each pair's beam."""
    return weighted_rmse(predict(model, pairs.frames), pairs.labels, weights[pairs.probe_index])


def export(model: PtychoNNSmall, path: str, opset: int) -> None:
    model = model.to(memory_format=torch.contiguous_format).eval()
    dummy = torch.zeros(1, 1, 128, 128)
    outputs = [OUTPUT_NAMES[role] for role in (("phase", "amplitude") if model.amplitude else ("phase",))]
    torch.onnx.export(
        model,
        (dummy,),
        path,
        input_names=[INPUT_NAME],
        output_names=outputs,
        dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME] + outputs},
        opset_version=opset,
        dynamo=False,
    )


def write_golden_and_manifest(out: str, golden_in: np.ndarray, golden_out: Dict[str, np.ndarray], description: str,
                              pixel_size_m: float, build: Dict[str, str]) -> str:
    """The exported model's golden pair (its own ONNX outputs, by role) and manifest beside it: what hot swap checks."""
    stem = os.path.splitext(os.path.basename(out))[0]
    files = {role: stem + ".golden-{}.npy".format(role) for role in ["input"] + sorted(golden_out)}
    for role, array in [("input", golden_in)] + sorted(golden_out.items()):
        np.save(os.path.join(os.path.dirname(out), files[role]), array.astype(np.float32))
    manifest = Manifest(
        description=description,
        outputs={role: OUTPUT_NAMES[role] for role in golden_out},
        pixel_size_m=pixel_size_m,
        preprocess=TrainedPreprocess(crop=(0, 0, 0, 0), bin=1),
        golden=GoldenPair(input=files["input"], phase=files["phase"], amplitude=files.get("amplitude"), atol=0.02, rtol=0.01),
        sha256=file_sha256(out),
        build=build,
    )
    path = write_manifest(out, manifest)
    log("wrote {}".format(path))
    return path


def from_onnx(path: str) -> PtychoNNSmall:
    """An exported model (BatchNorm folded) back in PyTorch, to fine-tune it: the graph's initializers
    carry the module's own parameter names."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    model = PtychoNNSmall(Normalise(torch.zeros(128, 128), torch.ones(128, 128)), amplitude=len(graph.output) > 1)
    model.fold_batchnorm()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise SystemExit("{} is not a PtychoNNSmall export: no {}".format(path, ", ".join(missing[:3])))
    model.load_state_dict({name: weights[name] for name in expected})
    return model


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    test_config = SimulationConfig(seed=12345)
    probe = physics.make_probe(test_config.probe, test_config.patch_size, test_config.pixel_size_m)
    variety = Variety(probes=args.probe_variety, detectors=args.detector_variety)
    probes = probe_bank(probe, test_config.probe, variety, args.seed, test_config.patch_size, test_config.pixel_size_m)
    units = detector_bank(test_config.detector, variety, args.seed)
    weights = np.stack([beam_weight(p) for p in probes])
    sample = test_config.sample
    t0 = time.time()

    def pairs(count: int, seed: int) -> Pairs:
        return training_pairs(count, seed, probes, units, tuple(args.photons), args.oversampled_share, sample.max_phase_rad, sample.absorption_ratio)

    train_pairs, val = pairs(args.train_size, args.seed), pairs(args.val_size, args.seed + 1000)
    data_seconds = time.time() - t0
    log("{} training and {} validation pairs ({} probes, {} detector units) in {:.0f} s".format(
        len(train_pairs.frames), len(val.frames), len(probes), len(units), data_seconds))

    model = PtychoNNSmall(fit_normalise(train_pairs.frames), amplitude=args.amplitude)
    poisson = PoissonTerm.of(probes, units, sample.absorption_ratio, args.poisson_weight) if args.poisson_weight else None
    done = train(args, model, train_pairs, val, weights, poisson)
    val_rmse = validate(model, val, weights)
    log("validation weighted RMSE {:.4f} rad after {} epochs, {:.0f} s".format(val_rmse, done["epochs"], done["train_seconds"]))
    if not math.isfinite(val_rmse):
        raise SystemExit("training diverged (validation RMSE {}): no model written".format(val_rmse))

    model.fold_batchnorm()
    parameters = sum(p.numel() for p in model.parameters())
    log("model: {} parameters after folding BatchNorm; validation after folding {:.4f} rad".format(parameters, validate(model, val, weights)))
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(manifest_path(out)):
        os.remove(manifest_path(out))  # a previous model's manifest would fail the new file's sha256
    export(model, out, args.opset)

    test = {}
    sims = {
        "test_128": ScanSimulation(test_config),
        "test_516": ScanSimulation(replace(test_config, detector=replace(test_config.detector, frame_size=OVERSAMPLED_FRAME))),
        "etched_128": ScanSimulation(replace(test_config, sample=replace(sample, kind=TRAINING))),
    }
    golden_in = None
    for name, sim in sims.items():
        figures, inputs, _ = evaluate_scan(out, sim)
        test[name] = figures
        log("{}: {}".format(name, json.dumps(figures)))
        if golden_in is None:
            golden_in = inputs[:8:2].copy()
    golden_out = infer(out, golden_in)
    torch_out = predict(model, golden_in)
    log("onnx vs torch max |diff| on the golden batch: {:.2e}".format(float(np.abs(torch_out - golden_out["phase"]).max())))

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
        "probes": str(len(probes)),
        "detector_units": str(len(units)),
        "poisson_weight": "{:g}".format(args.poisson_weight),
        "validation_rmse_rad": "{:.4f}".format(val_rmse),
        "test_mosaic_ssim": "{:.3f}".format(test["test_128"]["mosaic_ssim"]),
        "test_mosaic_rmse_rad": "{:.4f}".format(test["test_128"]["mosaic_rmse_rad"]),
        "test_mosaic_skill": "{:.3f}".format(test["test_128"]["mosaic_skill"]),
        "command": "python scripts/train_ptychonn.py " + " ".join(sys.argv[1:]),
    }
    description = (
        "PtychoNN edge model ({}) trained on simulated etched samples; input raw counts "
        "(any photon budget: each frame is rescaled to 1e6 photons, log1p'd and standardised per pixel inside the graph); "
        "output phase in rad, background 0{}, meaningful within the beam (~{:.0f} nm)".format(
            "phase and amplitude" if args.amplitude else "phase only", ", amplitude in (0, 1]" if args.amplitude else "",
            sims["test_128"].beam_diameter_m * 1e9)
    )
    write_golden_and_manifest(out, golden_in, golden_out, description, test_config.pixel_size_m, build)
    summary = {"validation_rmse_rad": val_rmse, "data_seconds": data_seconds, **done, "test": test, "parameters": parameters}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
