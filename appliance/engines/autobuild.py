"""Deployed ONNX models become TensorRT engines here: in the background, once per content.

On a TensorRT device an ``.onnx`` file copied into the engines directory serves at
once on ONNX Runtime (or the previous engine keeps serving), while a child process
at the lowest CPU priority builds its engine, which takes minutes on a Jetson. The
engine manager then validates the result and swaps it in like any other file.

Results are cached by the ONNX file's content key (model and manifest), the build
settings and the TensorRT version, so a restart or a redeploy of the same model
costs nothing, and a JetPack upgrade or a new batch setting builds afresh. One
build runs at a time: the device's memory and cores belong to the live stream.
A build that fails is not retried for the same content until a rescan.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

log = logging.getLogger(__name__)

_LOG_TAIL_LINES = 3
_STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class BuildSettings:
    """What the engines are built for; all of it is part of the cache key."""

    precision: str  # fp32, fp16 or int8 (int8 only works for Q/DQ models: there are no frames to calibrate on)
    max_batch: int  # pipeline.max_batch
    profiles: int  # pipeline.in_flight: one optimization profile per in-flight slot
    tensorrt_version: str

    def suffix(self) -> str:
        return "{}-b{}x{}-trt{}".format(self.precision, self.max_batch, self.profiles, self.tensorrt_version)


@dataclass
class _Build:
    onnx: str
    key: str
    engine: str
    process: subprocess.Popen
    started: float

    @property
    def log_path(self) -> str:
        return self.engine + ".log"


def default_cache_directory() -> str:
    """Under the service's StateDirectory when systemd runs it, else the user's cache."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return os.path.join(state.split(":")[0], "engine-cache")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ptychonn-edge", "engines")


class EngineBuilds:
    """The cache of engines built from deployed ONNX models, and the one build in progress.

    Used from the engine manager's thread only (``status`` reads plain fields).
    """

    def __init__(self, directory: str, settings: BuildSettings, keep: int = 4) -> None:
        self.directory = directory
        self.settings = settings
        self.keep = keep
        self.built = 0
        self.failed = 0
        self.last_result = ""
        self._running: Optional[_Build] = None
        self._failures: Dict[str, str] = {}  # content key -> reason
        os.makedirs(directory, exist_ok=True)
        self._remove_leftover_parts()

    def engine_path(self, onnx_path: str, key: str) -> str:
        stem = os.path.splitext(os.path.basename(onnx_path))[0]
        return os.path.join(self.directory, "{}-{}-{}.engine".format(stem, key[:16], self.settings.suffix()))

    def engine_for(self, onnx_path: str, key: str) -> Optional[str]:
        """The built engine for this ONNX content if there is one; else see that one gets built."""
        engine = self.engine_path(onnx_path, key)
        if os.path.isfile(engine):
            return engine
        if key not in self._failures and self._running is None:
            self._start(onnx_path, key, engine)
        return None

    def poll(self) -> bool:
        """Reap a finished build; True when one finished (an engine is ready, or another build may start)."""
        build = self._running
        if build is None or build.process.poll() is None:
            return False
        self._running = None
        seconds = time.monotonic() - build.started
        if build.process.returncode == 0 and os.path.isfile(build.engine):
            self.built += 1
            self.last_result = "built {} from {} in {:.0f} s".format(
                os.path.basename(build.engine), os.path.basename(build.onnx), seconds)
            log.info("%s", self.last_result, extra={"ENGINE_FILE": build.engine})
            self._prune()
        else:
            reason = "{}: engine build failed (exit {}): {} (log: {})".format(
                build.onnx, build.process.returncode, _tail(build.log_path), build.log_path)
            self._failures[build.key] = reason
            self.failed += 1
            self.last_result = reason
            log.error("%s; its ONNX model serves meanwhile if it can", reason, extra={"ENGINE_FILE": build.onnx})
        return True

    def forget_failures(self) -> None:
        """A rescan (systemctl reload) tries failed builds again: the cause may have been memory."""
        self._failures.clear()

    def stop(self) -> None:
        build, self._running = self._running, None
        if build is None or build.process.poll() is not None:
            return
        build.process.send_signal(signal.SIGTERM)
        try:
            build.process.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            build.process.kill()
            build.process.wait()
        log.info("engine build of %s stopped with the service", build.onnx)

    def status(self) -> Dict[str, object]:
        build = self._running
        state = "idle"
        if build is not None:
            state = "building {} ({}, pid {}) for {:.0f} s".format(
                os.path.basename(build.onnx), self.settings.precision, build.process.pid,
                time.monotonic() - build.started)
        return {"engine_build": state, "engine_builds": self.built, "engine_build_failures": self.failed,
                "engine_build_last": self.last_result}

    def _start(self, onnx_path: str, key: str, engine: str) -> None:
        command = [sys.executable, "-m", "appliance.engines.build", onnx_path, "--output", engine,
                   "--precision", self.settings.precision, "--max-batch", str(self.settings.max_batch),
                   "--profiles", str(self.settings.profiles)]
        nice = shutil.which("nice")
        if nice:  # the lowest CPU priority: the live stream keeps its cores
            command = [nice, "-n", "19"] + command
        with open(engine + ".log", "w") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._running = _Build(onnx_path, key, engine, process, time.monotonic())
        log.info("building a %s TensorRT engine for %s in the background (pid %d)",
                 self.settings.precision, onnx_path, process.pid, extra={"ENGINE_FILE": onnx_path})

    def _prune(self) -> None:
        """Keep the newest ``keep`` engines (with their manifests and logs)."""
        engines = sorted((os.path.getmtime(p), p) for p in self._files(".engine"))
        for _, engine in engines[: -self.keep]:
            for path in (engine, engine + ".yaml", engine + ".log", engine + ".calib"):
                if os.path.exists(path):
                    os.remove(path)

    def _remove_leftover_parts(self) -> None:
        """A build killed with the service leaves .part files; its engine is built again when needed."""
        for path in self._files((".part", ".part.yaml")):
            os.remove(path)

    def _files(self, suffixes: Union[str, Tuple[str, ...]]) -> List[str]:
        return [os.path.join(self.directory, n) for n in os.listdir(self.directory) if n.endswith(suffixes)]


def _tail(path: str) -> str:
    """The last lines a failed build printed: its own error message comes last."""
    try:
        with open(path, errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError as exc:
        return "no log ({})".format(exc.strerror or exc)
    return " | ".join(lines[-_LOG_TAIL_LINES:]) or "it printed nothing"

