"""Several appliances on one detector plus the collector, each its own process, as at a beamline.

For the demo (``--appliances N``), the tests and the benchmark: every process
serves on ports of its own (loopback only), the appliances share the detector
through the data distributor, and all of them (and this process's clients)
find each other on the run's one UDP search port (appliance.sim.loopback).
"""
from __future__ import annotations

import os
import signal
from typing import Any, Dict, List, Optional

import yaml

from appliance.sim.loopback import Ports, free_ports, loopback_env
from appliance.sim.process import ApplianceProcess, write_config


class ScaleOut:
    def __init__(self, work: str, detector_pv: str, engine_path: str, count: int,
                 prefix: str = "SCALE", updates: int = 1, per_instance: Optional[List[Dict[str, Any]]] = None,
                 collector: Optional[Dict[str, Any]] = None, log_dir: Optional[str] = None,
                 **sections: Dict[str, Any]) -> None:
        """``per_instance[i]``: config sections of appliance i only (a slow one); ``collector``: its config keys."""
        self.work = work
        self.prefixes = ["{}{}".format(prefix, index + 1) for index in range(count)]
        self.collector_prefix = prefix
        self.ports = [free_ports() for _ in range(count)]
        self.collector_ports = free_ports()
        self._log_dir = log_dir
        self.configs = []
        for index, instance_prefix in enumerate(self.prefixes):
            instance = dict((name, dict(values)) for name, values in sections.items())
            for name, values in ((per_instance or [{}] * count)[index]).items():
                instance.setdefault(name, {}).update(values)
            instance.setdefault("detector", {})["distributor"] = {"enabled": True, "group": prefix.lower(),
                                                                  "updates": updates}
            self.configs.append(write_config(os.path.join(work, "{}.yaml".format(instance_prefix.lower())),
                                             detector_pv, instance_prefix, engine_path=engine_path, **instance))
        settings: Dict[str, Any] = {"appliances": self.prefixes,
                                    "publish": {"prefix": prefix, "status_period_s": 0.2,
                                                "state_directory": os.path.join(work, "collector-state")}}
        for name, values in (collector or {}).items():
            if isinstance(values, dict):
                settings.setdefault(name, {}).update(values)
            else:
                settings[name] = values
        os.makedirs(settings["publish"]["state_directory"], exist_ok=True)
        self.collector_config = os.path.join(work, "collect.yaml")
        with open(self.collector_config, "w") as handle:
            yaml.safe_dump(settings, handle)
        self.appliances: List[Optional[ApplianceProcess]] = [None] * count
        self.collector: Optional[ApplianceProcess] = None

    def _env(self, own: Ports) -> Dict[str, str]:
        """For a process serving on ``own``."""
        env = dict(os.environ)
        env.update(loopback_env(own))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _log(self, name: str) -> Optional[str]:
        return os.path.join(self._log_dir, name + ".log") if self._log_dir else None

    def start_appliance(self, index: int, timeout: float = 60.0) -> ApplianceProcess:
        app = ApplianceProcess(self.configs[index], self._env(self.ports[index]),
                               self.prefixes[index], log_path=self._log(self.prefixes[index].lower()))
        self.appliances[index] = app
        app.wait_ready(timeout)
        return app

    def start_collector(self, timeout: float = 120.0) -> ApplianceProcess:
        """The collector (again after a crash: on a fresh TCP port, as pvAccess serves on a random one when
        its old port is still taken); ready once connected to every appliance."""
        if self.collector is not None:
            self.collector_ports = free_ports()
        self.collector = ApplianceProcess(self.collector_config, self._env(self.collector_ports),
                                          self.collector_prefix, log_path=self._log("collector"), command="collect")
        self.collector.wait_ready(timeout)
        return self.collector

    def start(self, timeout: float = 60.0) -> None:
        for index in range(len(self.prefixes)):
            self.start_appliance(index, timeout)
        self.start_collector(2 * timeout)

    def kill(self, index: int) -> str:
        """SIGKILL appliance ``index`` (a crash: nothing drained); returns what it wrote."""
        app = self.appliances[index]
        assert app is not None
        app.process.send_signal(signal.SIGKILL)
        return app.finish()

    def restart_appliance(self, index: int, timeout: float = 60.0) -> ApplianceProcess:
        """Appliance ``index`` again after a crash, on a fresh TCP port (as for the collector)."""
        self.ports[index] = free_ports()
        return self.start_appliance(index, timeout)

    def stop(self) -> Dict[str, int]:
        """SIGTERM every process still running, appliances first (the collector then merges their last frames)."""
        codes = {}
        for prefix, app in zip(self.prefixes, self.appliances):
            if app is not None and app.process.returncode is None:
                codes[prefix] = app.stop()
        if self.collector is not None and self.collector.process.returncode is None:
            codes[self.collector_prefix] = self.collector.stop()
        return codes
