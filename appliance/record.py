"""Record a live scan from the detector PV to an HDF5 file (frames, positions, uniqueIds).

Its own pvAccess client, in its own process: the appliance serving the same PV
is not touched (the IOC's PVA plugin serves every monitor). The file is bounded:
recording stops, saying why, at ``--max-frames``, before ``--max-gib`` would be
passed, when the scan ends (no frame for ``--idle-s``), when a new acquisition
starts (uniqueId going back) or on Ctrl-C / SIGTERM. Each uniqueId is written
once: a reconnect's re-sent frame is skipped, ids the detector skipped are
counted as missing. Needs h5py (extra ``record``).

    ptychonn-edge record scan.h5 --config /etc/ptychonn-edge/config.yaml --max-frames 2000
"""
from __future__ import annotations

import argparse
import queue
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import Any, Dict, Optional, Tuple

import numpy as np

from appliance.config import DetectorConfig, load_config
from appliance.ntndarray import FrameError, decode, header
from appliance.positions import PositionTransform

_QUEUE_FRAMES = 256  # between the pvAccess thread and the writer; beyond it frames are counted as lost


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="HDF5 file to write (replaced if it exists)")
    parser.add_argument("--config", help="the appliance's config: its detector PV, position attributes and mapping")
    parser.add_argument("--pv", help="detector PV (default: the config's detector.pv)")
    parser.add_argument("--max-frames", type=int, default=100000, help="stop after this many frames")
    parser.add_argument("--max-gib", type=float, default=8.0, help="stop before the frames pass this many GiB")
    parser.add_argument("--idle-s", type=float, default=10.0, help="stop when no frame came for this long (after the first)")
    parser.add_argument("--connect-timeout", type=float, default=60.0, help="give up when no frame came in this long")


class ScanFile:
    """The HDF5 layout: datasets grown frame by frame, one chunk per frame.

    ``frames`` (n, rows, cols) in the detector's dtype, ``unique_id`` (n,),
    ``positions_m`` (n, 2) x, y after detector.positions (NaN where a frame had
    none), ``timestamp`` (n,) POSIX seconds from the NTNDArray's timeStamp.
    """

    def __init__(self, path: str) -> None:
        import h5py

        self.path = path
        self._handle = h5py.File(path, "w")
        self.count = 0
        self.nbytes = 0
        self._frames: Any = None

    def append(self, image: np.ndarray, unique_id: int, position: Optional[Tuple[float, float]], stamp: float) -> None:
        if self._frames is None:
            self._create(image)
        elif image.shape != self._frames.shape[1:] or image.dtype != self._frames.dtype:
            raise FrameError("shape", "uniqueId {}: frame {}x{} {} in a scan of {}x{} {}".format(
                unique_id, image.shape[0], image.shape[1], image.dtype.name,
                self._frames.shape[1], self._frames.shape[2], self._frames.dtype.name))
        n = self.count + 1
        for name in ("frames", "unique_id", "positions_m", "timestamp"):
            self._handle[name].resize(n, axis=0)
        self._frames[self.count] = image
        self._handle["unique_id"][self.count] = unique_id
        self._handle["positions_m"][self.count] = position if position is not None else (np.nan, np.nan)
        self._handle["timestamp"][self.count] = stamp
        self.count = n
        self.nbytes += image.nbytes

    def _create(self, image: np.ndarray) -> None:
        rows, cols = image.shape
        self._frames = self._handle.create_dataset("frames", (0, rows, cols), image.dtype, maxshape=(None, rows, cols),
                                                   chunks=(1, rows, cols))
        self._handle.create_dataset("unique_id", (0,), np.int64, maxshape=(None,), chunks=(1024,))
        self._handle.create_dataset("positions_m", (0, 2), np.float64, maxshape=(None, 2), chunks=(1024, 2))
        self._handle.create_dataset("timestamp", (0,), np.float64, maxshape=(None,), chunks=(1024,))

    def close(self, attributes: Dict[str, Any]) -> None:
        for key, value in attributes.items():
            self._handle.attrs[key] = value
        self._handle.close()


class Recorder:
    """Turns monitor updates into rows of a :class:`ScanFile`, keeping the uniqueId accounting."""

    def __init__(self, scan: ScanFile, detector: DetectorConfig, max_frames: int, max_bytes: int) -> None:
        self.scan = scan
        self._names = (detector.positions.x, detector.positions.y)
        self._to_metres = PositionTransform(detector.positions)
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.last_id: Optional[int] = None
        self.counts = {"repeated": 0, "missing": 0, "bad": 0}
        self._held: Optional[Tuple[np.ndarray, int, Any, float]] = None
        self._first = True

    def take(self, frame: Tuple[np.ndarray, int, Any, float]) -> Optional[str]:
        """Write one decoded frame (image, uniqueId, position reading, time); the reason to stop, if any.

        The first update after connecting is the PV's current value, perhaps the
        last frame of an earlier scan: it is held, and written only if the next
        one follows it (uniqueId + 1).
        """
        unique_id = frame[1]
        if self._first:
            self._first = False
            self._held = frame
            return None
        if self._held is not None:
            held, self._held = self._held, None
            if unique_id == held[1] + 1:
                stop = self._write(held)
                if stop:
                    return stop
        if self.last_id is not None:
            if unique_id == self.last_id:
                self.counts["repeated"] += 1
                return None
            if unique_id < self.last_id:
                return "a new acquisition began (uniqueId {} after {})".format(unique_id, self.last_id)
            self.counts["missing"] += unique_id - self.last_id - 1
        return self._write(frame)

    def _write(self, frame: Tuple[np.ndarray, int, Any, float]) -> Optional[str]:
        image, unique_id, reading, stamp = frame
        if self.scan.nbytes + image.nbytes > self.max_bytes:
            return "the next frame would pass --max-gib ({:.3g} GiB written)".format(self.scan.nbytes / 2.0 ** 30)
        self.scan.append(image, unique_id, self._to_metres(reading), stamp)
        self.last_id = unique_id
        if self.scan.count >= self.max_frames:
            return "--max-frames {} reached".format(self.max_frames)
        return None


def _detector(args: argparse.Namespace) -> DetectorConfig:
    detector = load_config(args.config).detector if args.config else DetectorConfig()
    if args.pv:
        detector = replace(detector, pv=args.pv)
    return detector


def main(args: argparse.Namespace) -> int:
    from appliance.pva import FrameSource, exit_without_teardown

    try:
        detector = _detector(args)
    except (OSError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.max_frames < 1 or args.max_gib <= 0:
        print("--max-frames must be at least 1 and --max-gib above 0", file=sys.stderr)
        return 2
    frames: "queue.Queue[Tuple[np.ndarray, int, Any, float]]" = queue.Queue(maxsize=_QUEUE_FRAMES)
    lost = [0]
    names = (detector.positions.x, detector.positions.y)

    def on_update(pv: Any) -> None:
        """pvAccess thread: decode and copy (the image is a view into the update), never block."""
        try:
            unique_id, field = frame_header = header(pv)
            if unique_id == 0 and not field:
                return  # a record never written
            image, meta = decode(pv, names, known_header=frame_header)
            seconds, nanoseconds, _ = meta.timestamp
            frames.put_nowait((image.copy(), unique_id, meta.position, seconds + nanoseconds * 1e-9))
        except queue.Full:
            lost[0] += 1
        except FrameError as exc:
            print("frame skipped: {}".format(exc), file=sys.stderr)

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    scan = ScanFile(args.file)
    recorder = Recorder(scan, detector, args.max_frames, int(args.max_gib * 2 ** 30))
    source = FrameSource(detector.pv, detector.queue_size, on_update, detector.search_interval_s)
    source.start()
    deadline = time.monotonic() + args.connect_timeout
    while not source.connected() and time.monotonic() < deadline and not stopping.is_set():
        time.sleep(0.05)  # the first update says the server now sends us every frame
    if source.connected():
        print("connected to {}; recording to {}".format(detector.pv, args.file), flush=True)
    reason = _record(recorder, frames, stopping, args)
    lost_here = lost[0]  # frames that come after the stop are not the recording's
    scan.close({"detector_pv": detector.pv, "stop_reason": reason, "missing_upstream": recorder.counts["missing"],
                "lost_here": lost_here, "position_scale": detector.positions.scale,
                "position_sign": list(detector.positions.sign), "position_swap": detector.positions.swap})
    print("recorded {} frames ({:.1f} MiB) to {}; {} missing upstream, {} repeated skipped, {} lost here; "
          "stopped: {}".format(scan.count, scan.nbytes / 2.0 ** 20, args.file, recorder.counts["missing"],
                               recorder.counts["repeated"], lost_here, reason), flush=True)
    # The file is closed and the summary out; pvapy's monitor is not torn down while the detector
    # still streams.
    exit_without_teardown(0 if scan.count else 1)


def _record(recorder: Recorder, frames: "queue.Queue[Any]", stopping: threading.Event,
            args: argparse.Namespace) -> str:
    """Write frames until a bound, the end of the scan or a signal; the reason, in words."""
    started = time.monotonic()
    last = None
    try:
        while not stopping.is_set():
            try:
                frame = frames.get(timeout=0.2)
            except queue.Empty:
                now = time.monotonic()
                if last is None and now - started > args.connect_timeout:
                    return "no frame in --connect-timeout {:g} s".format(args.connect_timeout)
                if last is not None and now - last > args.idle_s:
                    return "no frame for --idle-s {:g} s (the scan ended)".format(args.idle_s)
                continue
            try:
                reason = recorder.take(frame)
            except FrameError as exc:
                return str(exc)
            if recorder.last_id is not None:  # not the held current value, perhaps an earlier scan's last frame
                last = time.monotonic()
            if reason:
                return reason
        return "SIGTERM"
    except KeyboardInterrupt:
        return "interrupted (Ctrl-C)"
