"""A detector stand-in: serves frames as an areaDetector NTNDArray PV.

It behaves like an areaDetector IOC with the PVA plugin: increasing uniqueId,
timestamps, motor positions as NTAttributes (as an attributes XML file would
add them), optionally a codec plugin's compression. Frames are paced against
an absolute schedule so the mean rate holds even when one update is slow.

:class:`DetectorServer` serves from the calling process (``sim serve``, the
demo); :class:`DetectorProcess` serves the same from a child process of its
own, as a real IOC is: the tests use it, so that a crash in pvapy's server
(one killed a whole CI run with a segfault) fails only the test whose frames
it was sending, with the child's exit status, instead of the run.
"""
from __future__ import annotations

import abc
import multiprocessing.connection
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from appliance import ntndarray
from appliance.ntndarray import TimeStamp, now_stamp
from appliance.pva import Server, attributes

Position = Optional[Tuple[float, float]]
_CLOSE_TIMEOUT_S = 30.0


class _Paced(abc.ABC):
    """``stream``: the schedule both stand-ins keep, around their own ``send``."""

    @abc.abstractmethod
    def send(self, image: np.ndarray, unique_id: int, position: Position = None, codec: Optional[str] = None,
             extra: Optional[Mapping[str, Any]] = None) -> TimeStamp:
        """Publish one frame; returns the timestamp it carries."""

    def stream(
        self,
        frames: Iterable[Tuple[np.ndarray, Position]],
        rate_hz: float,
        first_id: int = 1,
        codec: Optional[str] = None,
    ) -> int:
        """Send every frame at ``rate_hz``; returns the next unused uniqueId."""
        period = 1.0 / rate_hz
        start = time.perf_counter()
        unique_id = first_id
        for index, (image, position) in enumerate(frames):
            delay = start + index * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.send(image, unique_id, position, codec)
            unique_id += 1
        return unique_id


class DetectorServer(_Paced):
    def __init__(self, pv_name: str, position_names: Tuple[str, str] = ("SampleX", "SampleY")) -> None:
        self.pv_name = pv_name
        self.position_names = position_names
        self._server = Server()
        self.record = self._server.add_image(pv_name)
        self.sent = 0

    def send(
        self,
        image: np.ndarray,
        unique_id: int,
        position: Position = None,
        codec: Optional[str] = None,
        extra: Optional[Mapping[str, Any]] = None,
    ) -> TimeStamp:
        values: Dict[str, Any] = {"ColorMode": 0}
        if position is not None:
            values[self.position_names[0]] = float(position[0])
            values[self.position_names[1]] = float(position[1])
        if extra:
            values.update(extra)
        stamp = now_stamp()
        self.record.publish(image, unique_id, stamp, stamp, attributes(values), codec=codec)
        self.sent += 1
        return stamp

    def send_raw(self, unique_id: int, field: str, data: np.ndarray, width: int, height: int, codec: str = "",
                 codec_type: int = 6, uncompressed: int = 0) -> None:
        """A hand-built NTNDArray, for frames a well-behaved IOC would never send: ``field`` of the
        value union ('' leaves it empty), dimensions that need not fit the data, any codec name."""
        import pvaccess

        pv = pvaccess.NtNdArray()
        if field:
            pv["value"] = {field: data}
        pv["dimension"] = ntndarray.dimensions(height, width)
        pv["uniqueId"] = unique_id
        if codec:
            pv["codec"] = {"name": codec, "parameters": pvaccess.PvObject({"value": pvaccess.INT}, {"value": codec_type})}
            pv["uncompressedSize"] = uncompressed
        self.record.publish_raw(pv)
        self.sent += 1

    def close(self) -> None:
        self._server.close()


class DetectorProcessDied(RuntimeError):
    """The child serving the detector PV is gone: what it was asked to send was not sent."""


class DetectorProcess(_Paced):
    """A :class:`DetectorServer` in a child process; ``send`` and ``send_raw`` return once it has sent.

    The child is ``python -m appliance.sim.detector`` (not a multiprocessing spawn, which re-runs
    the caller's main script), talking over a socket pair. Calls may come from several threads (a
    test's pacing thread and its body): one at a time.
    """

    def __init__(self, pv_name: str, position_names: Tuple[str, str] = ("SampleX", "SampleY")) -> None:
        self.pv_name = pv_name
        self.sent = 0
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "appliance.sim.detector", str(theirs.fileno()), pv_name] + list(position_names),
                pass_fds=(theirs.fileno(),))
        self._connection = multiprocessing.connection.Connection(ours.detach())
        self._lock = threading.Lock()
        self.pid = self._process.pid
        self._call("started")

    def send(self, image: np.ndarray, unique_id: int, position: Position = None, codec: Optional[str] = None,
             extra: Optional[Mapping[str, Any]] = None) -> TimeStamp:
        stamp = self._call("send", image, unique_id, position, codec, dict(extra) if extra else None)
        self.sent += 1
        return stamp

    def send_raw(self, unique_id: int, field: str, data: np.ndarray, width: int, height: int, codec: str = "",
                 codec_type: int = 6, uncompressed: int = 0) -> None:
        self._call("send_raw", unique_id, field, data, width, height, codec, codec_type, uncompressed)
        self.sent += 1

    def close(self) -> None:
        """Stop serving (the PV disappears, as when the IOC exits) and wait for the child to end."""
        if self._process.poll() is None:
            try:
                self._call("close")
            except DetectorProcessDied:
                pass
        try:
            self._process.wait(_CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._connection.close()

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            try:
                self._connection.send((method, args))
                outcome, value = self._connection.recv()
            except (EOFError, OSError):
                try:
                    code: Optional[int] = self._process.wait(_CLOSE_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    code = None
                raise DetectorProcessDied("the detector stand-in serving {} died (exit code {}) during {}".format(
                    self.pv_name, code, method)) from None
        if outcome == "error":
            raise RuntimeError("the detector stand-in serving {} failed in {}:\n{}".format(self.pv_name, method, value))
        return value


def _serve_requests(connection: Any, pv_name: str, position_names: Tuple[str, str]) -> None:
    """The child of a :class:`DetectorProcess`: one reply per request, until ``close``."""
    from appliance.sim.child_client import stop_with_parent

    stop_with_parent()
    server = DetectorServer(pv_name, position_names)
    methods = {"send": server.send, "send_raw": server.send_raw, "started": lambda: None, "close": server.close}
    while True:
        method, args = connection.recv()
        try:
            connection.send(("ok", methods[method](*args)))
        except Exception:
            connection.send(("error", traceback.format_exc()))
        if method == "close":
            return


if __name__ == "__main__":
    _serve_requests(multiprocessing.connection.Connection(int(sys.argv[1])), sys.argv[2], (sys.argv[3], sys.argv[4]))
