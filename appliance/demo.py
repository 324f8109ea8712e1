"""Run the appliance end to end on a simulated scan of shapes the model never saw.

Three parties on loopback, as at a beamline: a detector (the physics
simulator serving NTNDArray frames), the appliance (its own process, started as
systemd would), and a viewer client. At the end it says how fast, how many
frames were lost (must be none) and how close the live mosaic is to the true
sample, and draws a picture of it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engines", "ptychonn-small.onnx")
DETECTOR_PV = "DEMO:det:Image"
PREFIX = "DEMO"


def model_pixel_size_m(model_path: str) -> float:
    """The output pixel its manifest gives, or the simulator's 10 nm for a model without one."""
    from appliance.engines.manifest import load_manifest

    manifest = load_manifest(model_path)
    return manifest.pixel_size_m if manifest and manifest.pixel_size_m else 10e-9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="ONNX model with its manifest (default: the shipped one)")
    parser.add_argument("--points", type=int, default=1000, help="scan points")
    parser.add_argument("--rate", type=float, default=100.0, help="detector frame rate (the field's Jetson ran 100 Hz)")
    parser.add_argument("--seed", type=int, default=7, help="sample and noise seed")
    parser.add_argument("--out", default="demo-output", help="directory for the picture and the appliance log")
    parser.add_argument("--appliances", type=int, default=1, choices=range(1, 9), metavar="N",
                        help="appliances sharing the detector through the data distributor, merged by the collector "
                             "(default 1: one appliance, no collector)")


def main(args: argparse.Namespace) -> int:
    if not os.path.exists(args.model):
        print("no model at {}; train one with scripts/train_ptychonn.py or pass --model".format(args.model), file=sys.stderr)
        return 2
    from appliance.sim.loopback import free_ports, loopback_env

    mine, theirs = free_ports(), free_ports()
    os.environ.update(loopback_env(mine))  # before this process creates any PVA object

    from appliance import schema
    from appliance.sim.detector import DetectorServer
    from appliance.sim.process import ApplianceProcess, write_config
    from appliance.sim.scan import ScanSimulation, SimulationConfig
    from appliance.sim.serve import prepare, serve_in_background
    from appliance.sim.viewer import Viewer, latencies_ms

    pixel_size = model_pixel_size_m(args.model)
    os.makedirs(args.out, exist_ok=True)
    sim = ScanSimulation(schema.load(SimulationConfig, {
        "seed": args.seed, "pixel_size_m": pixel_size,
        "sample": {"kind": "shapes"}, "scan": {"points": args.points},
    }, "demo settings"))
    print("simulating a {}-point spiral scan over test shapes (beam {:.0f} nm, overlap {:.0%}) ...".format(
        len(sim), sim.beam_diameter_m * 1e9, sim.overlap))
    frames = prepare(sim)

    work = tempfile.mkdtemp(prefix="ptychonn-demo-")
    if args.appliances > 1:
        return _scaled(args, sim, frames, pixel_size, work)
    config = write_config(os.path.join(work, "config.yaml"), DETECTOR_PV, PREFIX, engine_path=os.path.abspath(args.model),
                          publish={"status_period_s": 0.5},
                          mosaic={"publish_period_s": 0.5, "pixel_size_m": pixel_size})
    env = dict(os.environ)
    env.update(loopback_env(theirs))
    detector = DetectorServer(DETECTOR_PV)
    app = ApplianceProcess(config, env, PREFIX, log_path=os.path.join(args.out, "appliance.log"))
    try:
        app.wait_ready(60)
        phases = Viewer(PREFIX + ":Phase")
        mosaics = Viewer(PREFIX + ":Mosaic", queue_size=10)
        print("streaming {} frames at {:.0f} Hz: detector -> appliance -> viewer".format(len(frames), args.rate))
        streamer = serve_in_background(detector, frames, args.rate)
        _show_progress(app, phases, len(frames), streamer)
        received = phases.wait_for(len(frames), timeout=30)
        status = app.details()
    finally:
        code = app.stop()
        detector.close()
    final_mosaic = mosaics.latest()
    return _report(args, sim, frames, received, status, final_mosaic, code, latencies_ms(received))


def _scaled(args: argparse.Namespace, sim, frames, pixel_size: float, work: str) -> int:
    """The scan through ``--appliances`` appliances (data distributor) and the collector: the merged output
    is what the report judges, as a beamline would see it."""
    from appliance.sim.detector import DetectorServer
    from appliance.sim.scaleout import ScaleOut
    from appliance.sim.serve import serve_in_background
    from appliance.sim.viewer import Viewer, latencies_ms

    group = ScaleOut(work, DETECTOR_PV, os.path.abspath(args.model), args.appliances, prefix=PREFIX,
                     collector={"mosaic": {"pixel_size_m": pixel_size, "publish_period_s": 0.5},
                                "publish": {"status_period_s": 0.5}},
                     log_dir=args.out, publish={"status_period_s": 0.5}, mosaic={"enabled": False})
    detector = DetectorServer(DETECTOR_PV)
    try:
        group.start()
        collector = group.collector
        phases = Viewer(PREFIX + ":Phase")
        mosaics = Viewer(PREFIX + ":Mosaic", queue_size=10)
        print("streaming {} frames at {:.0f} Hz: detector -> {} appliances (data distributor) -> collector -> "
              "viewer".format(len(frames), args.rate, args.appliances))
        streamer = serve_in_background(detector, frames, args.rate)
        while streamer.is_alive() or len(phases.items) < len(frames):
            time.sleep(1.0)
            status = collector.details()
            print("  merged {:5d}/{}, missing {}, late {}, reorder depth {}; per appliance: {}".format(
                status["merged"], len(frames), status["missing"], status["late"], status["reorder_depth"],
                ", ".join("{} {:.0f} Hz".format(p, s["rate_hz"]) for p, s in sorted(status["appliances"].items()))),
                flush=True)
            if not streamer.is_alive() and status["merged"] >= len(frames) and status["reorder_depth"] == 0:
                break
        received = phases.wait_for(len(frames), timeout=30)
        status = collector.wait_details(lambda s: s["reorder_depth"] == 0)
    finally:
        codes = group.stop()
        detector.close()
    code = max(codes.values()) if codes else 1
    ids = [item.unique_id for item in received]
    print("\nresults ({} appliances + collector)".format(args.appliances))
    print("  frames: sent {}, merged {}, lost {} (collector: missing {}, late {}, duplicates {}), exit codes {}".format(
        len(frames), len(received), len(frames) - len(set(ids)), status["missing"], status["late"],
        status["duplicates"], codes))
    print("  per appliance: {}".format(", ".join("{} {} frames".format(p, s["frames"])
                                                 for p, s in sorted(status["appliances"].items()))))
    print("  in uniqueId order: {}".format("yes" if ids == sorted(ids) else "no ({} late)".format(status["late"])))
    return _report(args, sim, frames, received, {"dropped_total": status["missing"]}, mosaics.latest(), code,
                   latencies_ms(received))


def _show_progress(app, phases, total: int, streamer) -> None:
    while streamer.is_alive() or len(phases.items) < total:
        time.sleep(1.0)
        status = app.details()
        latency = status["latency"]
        print("  frames {:5d}/{} published, in {:4.0f} Hz, out {:4.0f} Hz, latency p50 {} p99 {}, dropped {}".format(
            status["published"], total, status["rate_in_hz"], status["rate_out_hz"], _ms(latency["p50_ms"]),
            _ms(latency["p99_ms"]), status["dropped_total"]), flush=True)
        if not streamer.is_alive() and status["published"] + status["dropped_total"] >= total:
            break


def _ms(value) -> str:
    return "-" if value is None else "{:.1f} ms".format(value)


def offline_mosaic(received, pixel_size: float, window_kind: str = "gaussian", sigma_px: float = 8.0):
    """The mosaic computed here from the published phases (with the appliance's defaults): the live one must equal it."""
    from appliance.mosaic import Mosaic, make_window

    mosaic = Mosaic(pixel_size, make_window(received[0].image.shape, window_kind, sigma_px))
    for item in sorted(received, key=lambda item: item.unique_id):  # merged output: late frames come out of order
        mosaic.add(item.image, item.meta.position, item.unique_id)
    return mosaic.snapshot()


def accuracy(sim, picture) -> Dict[str, float]:
    """SSIM and RMSE of the stitched phase against the truth over the scanned area.

    The scanned area is where the summed stitching weight reaches a quarter of
    its peak (the definition docs/model.md uses): the scan's rim, seen by few
    patches, is left out. The model predicts absolute phase, so no offset is removed.
    """
    from appliance.sim.metrics import phase_rmse, ssim

    truth = sim.phase_on_grid(picture.origin_m, picture.pixel_size_m, picture.phase.shape)
    scanned = picture.weights >= 0.25 * picture.weights.max()
    return {
        "ssim": ssim(picture.phase, truth, scanned),
        "rmse": phase_rmse(picture.phase, truth, scanned),
        "truth_range": float(truth[scanned].max() - truth[scanned].min()),
        "pixels": int(scanned.sum()),
    }, truth, picture.phase, scanned


def _report(args, sim, frames, received, status, final_mosaic, code, latency) -> int:
    ids = [item.unique_id for item in received]
    lost = len(frames) - len(set(ids))
    duration = received[-1].arrived - received[0].arrived if len(received) > 1 else float("nan")
    print("\nresults")
    print("  frames: sent {}, published {}, lost {}, dropped {} (appliance exit code {})".format(
        len(frames), len(received), lost, status["dropped_total"], code))
    print("  rate out: {:.1f} Hz over {:.1f} s".format((len(received) - 1) / duration, duration))
    print("  latency, detector timestamp to viewer: p50 {:.1f} ms, p99 {:.1f} ms, max {:.1f} ms".format(
        np.percentile(latency, 50), np.percentile(latency, 99), latency.max()))
    picture = offline_mosaic(received, sim.pixel_size_m)
    if final_mosaic is not None and final_mosaic.image.shape == picture.phase.shape:
        live_equal = float(np.abs(final_mosaic.image - picture.phase).max())
        print("  live P:Mosaic vs offline stitching of the same phases: max difference {:.2e} rad".format(live_equal))
    scores, truth, estimate, scanned = accuracy(sim, picture)
    print("  mosaic vs ground truth over the scanned area ({} pixels): SSIM {:.3f}, phase RMSE {:.3f} rad "
          "(truth spans {:.2f} rad)".format(scores["pixels"], scores["ssim"], scores["rmse"], scores["truth_range"]))
    path = _picture(args.out, frames, received, truth, estimate, scanned, scores)
    print("  picture: {}".format(path))
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump({"appliances": args.appliances, "sent": len(frames), "published": len(received), "lost": lost,
                   "ssim": scores["ssim"], "rmse": scores["rmse"], "exit_code": code}, handle, indent=1)
    return 0 if lost == 0 and code == 0 else 1


def _picture(out: str, frames, received, truth, estimate, scanned, scores) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    middle = len(received) // 2
    rows, cols = np.nonzero(scanned)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    shown = np.where(scanned, estimate, np.nan)[box]
    truth_shown = np.where(scanned, truth, np.nan)[box]
    low, high = np.nanmin(truth_shown), np.nanmax(truth_shown)
    figure, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    panels: List = [
        (truth_shown, "ground truth phase (rad)", dict(vmin=low, vmax=high, cmap="viridis")),
        (shown, "live mosaic: SSIM {:.2f}, RMSE {:.2f} rad".format(scores["ssim"], scores["rmse"]),
         dict(vmin=low, vmax=high, cmap="viridis")),
        (np.log10(1.0 + frames[middle][0].astype(np.float64)), "diffraction frame {} (log10 counts)".format(middle + 1),
         dict(cmap="magma")),
        (received[middle].image, "its inferred phase patch (rad)", dict(cmap="viridis")),
    ]
    for axis, (image, title, style) in zip(axes, panels):
        shown_image = axis.imshow(image, **style)
        axis.set_title(title, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
        figure.colorbar(shown_image, ax=axis, fraction=0.046, pad=0.04)
    figure.suptitle("ptychonn-edge demo: {} frames, unseen test shapes".format(len(received)))
    figure.tight_layout()
    path = os.path.join(out, "demo.png")
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
