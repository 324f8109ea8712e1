"""Run the appliance as a separate process, exactly as systemd starts it, and watch it.

The demo, the benchmarks and the tests start ``ptychonn-edge run`` this way:
its own process holds its own PVA server, as on the device.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Optional

import yaml

from appliance.pva import FrameSource


def _stop_with_parent() -> None:
    """In the child: SIGTERM it when the process that started it dies, however that happens.

    A demo or test killed mid-run (or crashing) must not leave an appliance serving on.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def write_config(path: str, detector_pv: str, prefix: str, engine_path: Optional[str] = None,
                 engine_dir: Optional[str] = None, **sections: Dict[str, Any]) -> str:
    config: Dict[str, Any] = {
        "detector": {"pv": detector_pv},
        "engine": {"directory": engine_dir or os.path.dirname(path)},
        "publish": {"prefix": prefix, "status_period_s": 0.2},
    }
    if engine_path:
        config["engine"]["path"] = engine_path
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    return path


class StatusWatch:
    """P:Status as it changes, through one monitor.

    Waiting on its updates replaces polling with gets: pvapy 5.6 sometimes
    crashes the process in ``Channel.get`` when channels are made and dropped
    at a high rate, and a monitor is also told of each change as it happens.
    """

    def __init__(self, pv_name: str) -> None:
        self.pv_name = pv_name
        self._latest: Optional[Dict[str, Any]] = None
        self._changed = threading.Condition()
        self._source = FrameSource(pv_name, 16, self._on_update)  # connects whenever the record appears
        self._source.start()

    def _on_update(self, pv: Any) -> None:
        status = pv.toDict()
        with self._changed:
            self._latest = status
            self._changed.notify_all()

    def wait_for(self, done: Callable[[Dict[str, Any]], bool], timeout: float) -> Optional[Dict[str, Any]]:
        """The first status (the latest one included) for which ``done`` holds; None after ``timeout``."""
        with self._changed:
            self._changed.wait_for(lambda: self._latest is not None and done(self._latest), timeout)
            latest = self._latest
        return latest if latest is not None and done(latest) else None

    def latest(self, timeout: float) -> Dict[str, Any]:
        status = self.wait_for(lambda _: True, timeout)
        if status is None:
            raise TimeoutError("no update of {} within {} s".format(self.pv_name, timeout))
        return status

    def close(self) -> None:
        self._source.stop()


class ApplianceProcess:
    """``ptychonn-edge run`` in a subprocess, and its P:Status as it changes."""

    def __init__(self, config_path: str, env: Dict[str, str], prefix: str, log_path: Optional[str] = None) -> None:
        self.prefix = prefix
        # A file, not a pipe: a full pipe nobody reads would block the appliance's logging.
        self._log = open(log_path, "w+") if log_path else tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "run", "--config", config_path],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, text=True, preexec_fn=_stop_with_parent,
        )
        self.output = ""
        self._status = StatusWatch(prefix + ":Status")

    def wait_ready(self, timeout: float = 30.0) -> Dict[str, Any]:
        """The first P:Status whose state is 'serving' (or the process's output if it died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("appliance exited {}:\n{}".format(self.process.returncode, self.finish()))
            status = self._status.wait_for(lambda s: s["state"] == "serving" and s["detector_connected"],
                                           min(0.5, deadline - time.monotonic()))  # then: is it still alive?
            if status is not None:
                return status
        raise RuntimeError("appliance not serving after {} s".format(timeout))

    def status(self) -> Dict[str, Any]:
        """The latest P:Status (published every publish.status_period_s)."""
        return self._status.latest(2.0)

    def wait_counts(self, timeout: float = 10.0, **minimum: int) -> Dict[str, Any]:
        """P:Status once each named counter reaches its minimum, or the latest one after ``timeout``."""
        reached = self._status.wait_for(lambda s: all(s[name] >= value for name, value in minimum.items()), timeout)
        return reached or self.status()

    def details(self) -> Dict[str, Any]:
        """The full status snapshot (the JSON field of P:Status)."""
        return json.loads(self.status()["json"])

    def wait_verdict(self, file_name: str, timeout: float = 10.0) -> Dict[str, Any]:
        """The engine manager's verdict on ``file_name``, once P:Status shows it."""
        def verdict(status: Dict[str, Any]) -> Optional[Dict[str, Any]]:
            verdicts = json.loads(status["json"]).get("engine_verdicts", [])
            return next((v for v in verdicts if v["file"] == file_name), None)

        status = self._status.wait_for(lambda s: verdict(s) is not None, timeout)
        found = verdict(status) if status is not None else None
        if found is None:
            raise RuntimeError("no verdict on {} within {} s".format(file_name, timeout))
        return found

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (drain, then exit), as systemctl stop does; killed if it does not end in ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.finish(timeout)
        return self.process.returncode

    def finish(self, timeout: float = 30.0) -> str:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._status.close()
        self._log.seek(0)
        self.output = self._log.read()
        return self.output
