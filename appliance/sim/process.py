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
import time
from typing import Any, Dict, Optional

import yaml

from appliance.pva import read_once


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


class ApplianceProcess:
    """``ptychonn-edge run`` in a subprocess; waits until its status PV answers."""

    def __init__(self, config_path: str, env: Dict[str, str], prefix: str, log_path: Optional[str] = None) -> None:
        self.prefix = prefix
        # A file, not a pipe: a full pipe nobody reads would block the appliance's logging.
        self._log = open(log_path, "w+") if log_path else tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "run", "--config", config_path],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, text=True, preexec_fn=_stop_with_parent,
        )
        self.output = ""

    def wait_ready(self, timeout: float = 30.0) -> Dict[str, Any]:
        """The first P:Status whose state is 'serving' (or the process's output if it died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("appliance exited {}:\n{}".format(self.process.returncode, self.finish()))
            try:
                status = read_once(self.prefix + ":Status", 1.0)
            except Exception:  # pvapy's timeout type: not connected yet, the get itself waited
                continue
            if status["state"] == "serving" and status["detector_connected"]:
                return status
            time.sleep(0.05)  # polling a remote state that has no event to await
        raise RuntimeError("appliance not serving after {} s".format(timeout))

    def status(self) -> Dict[str, Any]:
        return read_once(self.prefix + ":Status", 2.0)

    def wait_counts(self, timeout: float = 10.0, **minimum: int) -> Dict[str, Any]:
        """Poll P:Status until each named counter reaches its minimum (the status has no event)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if all(status[name] >= value for name, value in minimum.items()) or time.monotonic() > deadline:
                return status
            time.sleep(0.05)

    def details(self) -> Dict[str, Any]:
        """The full status snapshot (the JSON field of P:Status)."""
        return json.loads(self.status()["json"])

    def wait_verdict(self, file_name: str, timeout: float = 10.0) -> Dict[str, Any]:
        """The engine manager's verdict on ``file_name``, once P:Status shows it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for verdict in self.details().get("engine_verdicts", []):
                if verdict["file"] == file_name:
                    return verdict
            time.sleep(0.05)
        raise RuntimeError("no verdict on {} within {} s".format(file_name, timeout))

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
        self._log.seek(0)
        self.output = self._log.read()
        return self.output
