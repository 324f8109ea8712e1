"""PVA client work in a child process: a crash in pvapy's client cannot take its user down with it.

pvapy 5.6 has crashed whole test runs with a segfault inside ``Channel.monitor``
and ``Channel.get``: no exception, the process just dies. The demo, the
benchmarks and the tests therefore never open a pvapy client channel in their
own process. A child does it (``python -m appliance.sim.child_client``): it
monitors one PV and writes each update to stdout as one JSON line, which
:class:`ChildMonitor` reads; a child killed by a signal is started again.

pvapy, not p4p, so that one implementation serves everywhere: the demo runs on
Jetsons, where p4p has no wheel, and the viewer decodes with ingest's own code,
which reads pvapy's structures.
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import json
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import numpy as np

from appliance.ntndarray import FrameError, FrameMeta, decode

Message = Dict[str, Any]
_PR_SET_PDEATHSIG = 1
_MAX_RESTARTS = 5  # a child that keeps crashing is a fault to report, not to hide


def stop_with_parent() -> None:
    """In a child: SIGTERM it when the process that started it dies, however that happens.

    A demo or test killed mid-run (or crashing) must not leave children serving on.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _command(*args: str) -> List[str]:
    return [sys.executable, "-m", "appliance.sim.child_client"] + list(args)


def _stderr_tail(log: Any) -> str:
    log.seek(0)
    return log.read()[-2000:]


class ChildMonitor:
    """A child monitoring ``pv_name``; ``on_message(message, first)`` gets each update it reports.

    ``first`` marks a child's first update: the record's current value, which a
    restarted child reports again. A child killed by a signal (a crash in
    pvapy) is started again, up to a limit; one that exits otherwise is a fault
    in this code and is not. ``deaths`` says what happened to each child that died.
    """

    def __init__(self, pv_name: str, child_args: List[str], on_message: Callable[[Message, bool], None]) -> None:
        self.pv_name = pv_name
        self.deaths: List[str] = []
        self._command = _command(*child_args)
        self._on_message = on_message
        self._closing = threading.Event()
        self._process: Optional[subprocess.Popen] = None
        self._children = 0
        self._started = threading.Condition()  # held while a child is being started, so close() sees it
        self._thread = threading.Thread(target=self._run, name="monitor " + pv_name, daemon=True)
        self._thread.start()
        _open_monitors.add(self)

    def _run(self) -> None:
        while not self._closing.is_set():
            with tempfile.TemporaryFile(mode="w+") as log:
                with self._started:
                    if self._closing.is_set():
                        return
                    self._process = subprocess.Popen(self._command, stdout=subprocess.PIPE, stderr=log, text=True,
                                                     preexec_fn=stop_with_parent)
                    self._children += 1
                    self._started.notify_all()
                self._read(self._process)
                code = self._process.wait()
                if self._closing.is_set():
                    return
                self.deaths.append("monitor of {} exited {}:\n{}".format(self.pv_name, code, _stderr_tail(log)))
            sys.stderr.write(self.deaths[-1] + "\n")
            if code >= 0 or len(self.deaths) > _MAX_RESTARTS:
                return

    @property
    def pid(self) -> Optional[int]:
        """The current child's process id."""
        with self._started:
            return self._process.pid if self._process is not None else None

    def wait_for_child(self, number: int, timeout: float) -> bool:
        """Whether the ``number``-th child (1 is the first, 2 the first restart) was started within ``timeout``."""
        with self._started:
            return self._started.wait_for(lambda: self._children >= number, timeout)

    def _read(self, process: subprocess.Popen) -> None:
        first = True
        for line in process.stdout:
            self._on_message(json.loads(line), first)
            first = False

    def close(self) -> None:
        _open_monitors.discard(self)
        self._closing.set()
        with self._started:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        self._thread.join(timeout=10)


_open_monitors: Set[ChildMonitor] = set()


def close_all() -> None:
    """Close every monitor still open (a test's teardown: tests need not close each viewer they make)."""
    for monitor in list(_open_monitors):
        monitor.close()


def put_string(pv_name: str, value: str, timeout_s: float = 5.0) -> None:
    """Write ``value`` to ``pv_name`` from a child; a child that crashed before sending is run again."""
    for _ in range(_MAX_RESTARTS):
        run = subprocess.run(_command("put", pv_name, value, "--timeout", str(timeout_s)), capture_output=True,
                             text=True, timeout=timeout_s + 60, preexec_fn=stop_with_parent)
        if run.returncode == 0:
            return
        if run.returncode > 0 or "sending" in run.stdout:
            break  # an error pvapy reported, or a crash after the put may have reached the server
    raise RuntimeError("put of {!r} to {} failed (exit {}):\n{}".format(value, pv_name, run.returncode, run.stderr))


def frame_message(pv: Any, positions: List[str], keep_image: bool) -> Message:
    """One NTNDArray update as JSON-ready data (the image as base64 of its raw bytes)."""
    try:
        image, meta = decode(pv, (positions[0], positions[1]))
    except FrameError:
        return {"frame": None}  # the empty initial update of a record never written
    kept = np.ascontiguousarray(image if keep_image else image[:1, :1])
    return {"frame": {
        "unique_id": meta.unique_id, "timestamp": meta.timestamp, "data_timestamp": meta.data_timestamp,
        "attributes": meta.attributes, "position": meta.position,
        "dtype": kept.dtype.str, "shape": kept.shape, "data": base64.b64encode(kept.tobytes()).decode("ascii"),
    }}


def frame_from_message(frame: Message) -> Tuple[FrameMeta, np.ndarray]:
    """The metadata and image a :func:`frame_message` carries."""
    image = np.frombuffer(base64.b64decode(frame["data"]), dtype=np.dtype(frame["dtype"])).reshape(frame["shape"])
    position = frame["position"]
    meta = FrameMeta(frame["unique_id"], tuple(frame["timestamp"]), tuple(frame["data_timestamp"]),
                     frame["attributes"], tuple(position) if position is not None else None)
    return meta, image


class _Writer:
    """JSON lines to stdout from pvAccess's callback thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def write(self, message: Message) -> None:
        line = json.dumps(message, default=str)
        with self._lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


def _monitor(args: argparse.Namespace) -> int:
    import time

    from appliance.pva import FrameSource

    writer = _Writer()

    def on_update(pv: Any) -> None:
        arrived = time.time()
        if args.kind == "status":
            writer.write({"status": pv.toDict()})
        else:
            writer.write(dict(frame_message(pv, args.positions, args.kind == "frames"), arrived=arrived,
                              current_value=source.update_is_current_value))

    source = FrameSource(args.pv, args.queue_size, on_update)
    source.start()
    threading.Event().wait()  # until SIGTERM, or the parent's death
    return 0


def _put(args: argparse.Namespace) -> int:
    from appliance.pva import put_string as put

    print("sending", flush=True)
    put(args.pv, args.value, args.timeout)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="a PVA client for a parent that must survive its crashes")
    commands = parser.add_subparsers(dest="command", required=True)
    monitor = commands.add_parser("monitor")
    monitor.add_argument("kind", choices=("status", "frames", "corners"), help="corners: pixel [0, 0] only")
    monitor.add_argument("pv")
    monitor.add_argument("--queue-size", type=int, default=16)
    monitor.add_argument("--positions", nargs=2, default=["SampleX", "SampleY"])
    monitor.set_defaults(handler=_monitor)
    put = commands.add_parser("put")
    put.add_argument("pv")
    put.add_argument("value")
    put.add_argument("--timeout", type=float, default=5.0)
    put.set_defaults(handler=_put)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
