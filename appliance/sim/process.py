"""Run the appliance as a separate process, exactly as systemd starts it, and watch it.

The demo, the benchmarks and the tests start ``ptychonn-edge run`` this way:
its own process holds its own PVA server, as on the device.
"""
from __future__ import annotations

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

from appliance.sim.child_client import ChildMonitor, stop_with_parent


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
    """P:Status as it changes, through one monitor in a child process.

    Waiting on its updates replaces polling with gets, and the child keeps
    pvapy's client out of this process: pvapy 5.6 has crashed test runs in
    ``Channel.get`` and in ``Channel.monitor``. A child that crashes is started
    again; the next update it reports is the record's current value.
    """

    def __init__(self, pv_name: str) -> None:
        self.pv_name = pv_name
        self._latest: Optional[Dict[str, Any]] = None
        self._changed = threading.Condition()
        # The child connects whenever the record appears.
        self.monitor = ChildMonitor(pv_name, ["monitor", "status", pv_name], self._on_message)

    def _on_message(self, message: Dict[str, Any], first: bool) -> None:
        with self._changed:
            self._latest = message["status"]
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
        self.monitor.close()


class ApplianceProcess:
    """``ptychonn-edge run`` in a subprocess, and its P:Status as it changes."""

    def __init__(self, config_path: str, env: Dict[str, str], prefix: str, log_path: Optional[str] = None,
                 command: str = "run") -> None:
        """``command``: ``run`` (an appliance) or ``collect`` (the collector, whose P:Status reads the same way)."""
        self.prefix = prefix
        # A file, not a pipe: a full pipe nobody reads would block the appliance's logging.
        self._log = open(log_path, "w+") if log_path else tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", command, "--config", config_path],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, text=True, preexec_fn=stop_with_parent,
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

    def wait_details(self, done: Callable[[Dict[str, Any]], bool], timeout: float = 10.0) -> Dict[str, Any]:
        """The first full status snapshot for which ``done`` holds, or the latest one after ``timeout``."""
        reached = self._status.wait_for(lambda s: done(json.loads(s["json"])), timeout)
        return json.loads((reached or self.status())["json"])

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
