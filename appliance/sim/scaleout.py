"""Several appliances on one detector plus the collector, each its own process, as at a beamline.

For the demo (``--appliances N``), the tests and the benchmark: every process
serves on ports of its own (loopback only), the appliances share the detector
through the data distributor, and the collector finds them by TCP name servers.
This process's PVA clients (viewers, status watches) are children that read
the environment when they start, so the name servers of every process are put
into it here, and restored on close.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Dict, List, Optional

import yaml

from appliance.sim.loopback import Ports, free_ports, loopback_env
from appliance.sim.process import ApplianceProcess, write_config

_NAME_SERVERS = "EPICS_PVA_NAME_SERVERS"


class ScaleOut:
    def __init__(self, work: str, detector_pv: str, detector_ports: Ports, engine_path: str, count: int,
                 prefix: str = "SCALE", updates: int = 1, per_instance: Optional[List[Dict[str, Any]]] = None,
                 collector: Optional[Dict[str, Any]] = None, log_dir: Optional[str] = None,
                 **sections: Dict[str, Any]) -> None:
        """``per_instance[i]``: config sections of appliance i only (a slow one); ``collector``: its config keys."""
        self.work = work
        self.detector_ports = detector_ports
        self.prefixes = ["{}{}".format(prefix, index + 1) for index in range(count)]
        self.collector_prefix = prefix
        self.ports = [free_ports() for _ in range(count)]
        self.collector_ports = free_ports()
        self._log_dir = log_dir
        self._saved = os.environ.get(_NAME_SERVERS)
        self._set_name_servers()
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

    def _set_name_servers(self) -> None:
        os.environ[_NAME_SERVERS] = " ".join("127.0.0.1:{}".format(p["tcp"]) for p in
                                             [self.detector_ports] + self.ports + [self.collector_ports])

    def _env(self, own: Ports, other: Ports, *more: Ports) -> Dict[str, str]:
        """For a process serving on ``own`` that searches ``other`` and ``more`` (and its own) by name server."""
        env = dict(os.environ)
        env.update(loopback_env(own, other, *more))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _log(self, name: str) -> Optional[str]:
        return os.path.join(self._log_dir, name + ".log") if self._log_dir else None

    def start_appliance(self, index: int, timeout: float = 60.0) -> ApplianceProcess:
        app = ApplianceProcess(self.configs[index], self._env(self.ports[index], self.detector_ports),
                               self.prefixes[index], log_path=self._log(self.prefixes[index].lower()))
        self.appliances[index] = app
        app.wait_ready(timeout)
        return app

    def start_collector(self, timeout: float = 120.0) -> ApplianceProcess:
        """The collector, on fresh ports: after a SIGKILL pvAccess found its old port taken and served on a
        random one, which no name server entry points at. Its name servers are the appliances' and its own
        (not the detector's): each more slows its search (see appliance.pva.channel_life_s). It is ready
        once connected to every appliance, which on two busy cores took up to ~48 s: hence the timeout."""
        if self.collector is not None:
            self.collector_ports = free_ports()
            self._set_name_servers()
        self.collector = ApplianceProcess(self.collector_config, self._env(self.collector_ports, *self.ports),
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
        """Appliance ``index`` again after a crash, on fresh ports (its old TCP port may still be taken,
        and pvAccess would then serve on a random one); start the collector again after it, as only a
        collector started later has the new ports among its name servers."""
        self.ports[index] = free_ports()
        self._set_name_servers()
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

    def close(self) -> None:
        self.stop()
        if self._saved is None:
            os.environ.pop(_NAME_SERVERS, None)
        else:
            os.environ[_NAME_SERVERS] = self._saved
