"""Deployed ONNX models become TensorRT engines here: in the background, once per content.

On a TensorRT device an ``.onnx`` file copied into the engines directory serves at
once on ONNX Runtime (or the previous engine keeps serving), while a child process
at the lowest CPU priority builds its engine, which takes minutes on a Jetson. The
engine manager then validates the result and swaps it in like any other file.

Results are cached by the ONNX file's content key (model and manifest), the build
settings, the TensorRT version, the GPU and, on a Jetson, the board, so a restart
or a redeploy of the same model costs nothing, and a JetPack upgrade, another GPU
or board (a Xavier NX's card moved to an AGX Xavier: the same sm72) or a new batch
setting builds afresh. One build runs at a time: the device's memory and cores belong to
the live stream, and a build is the first thing the kernel may kill for memory.
A build that fails, or whose engine is rejected, is not tried again for the same
content until a rescan.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from appliance.engines.tensorrt import board_model

log = logging.getLogger(__name__)

_LOG_TAIL_LINES = 3
_STOP_GRACE_S = 5.0
_OOM_SCORE_FIRST_TO_GO = "1000"


@dataclass(frozen=True)
class BuildSettings:
    """What the engines are built for and on; all of it is part of the cache key."""

    precision: str  # fp32, fp16 or int8 (int8 only works for Q/DQ models: there are no frames to calibrate on)
    max_batch: int  # pipeline.max_batch
    profiles: int  # pipeline.in_flight: one optimization profile per in-flight slot
    tensorrt_version: str
    gpu: str  # name and compute capability: engines run only on the GPU model that built them
    board: str = field(default_factory=lambda: board_model() or "")  # a Jetson's; "" elsewhere

    def suffix(self) -> str:
        device = "-".join(_name_part(part) for part in (self.gpu, self.board) if part)
        return "{}-b{}x{}-trt{}-{}".format(self.precision, self.max_batch, self.profiles, self.tensorrt_version, device)


@dataclass
class _Build:
    onnx: str
    key: str
    engine: str
    process: subprocess.Popen
    started: float


def default_cache_directory() -> str:
    """Under the service's StateDirectory when systemd runs it, else the user's cache."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return os.path.join(state.split(":")[0], "engine-cache")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ptychonn-edge", "engines")


class EngineBuilds:
    """The cache of engines built from deployed ONNX models, and the one build in progress.

    Called from the engine manager's thread, and ``stop`` from the one that stops
    it; ``status`` reads plain fields from the status thread. Raises OSError when
    the directory cannot be used, so the caller can run without builds.
    """

    def __init__(self, directory: str, settings: BuildSettings, keep: int = 4, niceness: int = 19) -> None:
        self.directory = directory
        self.settings = settings
        self.keep = keep
        self.niceness = niceness
        self.succeeded = 0
        self.failed = 0
        self.last_result = ""
        self._running: Optional[_Build] = None
        self._failures: Dict[str, str] = {}  # content key -> reason
        self._closed = False
        self._lock = threading.Lock()  # _running and _closed, between the manager thread and stop()
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, ".writable")
        with open(probe, "w"):
            pass
        os.remove(probe)
        self._remove_leftover_parts()

    def engine_path(self, onnx_path: str, key: str) -> str:
        stem = os.path.splitext(os.path.basename(onnx_path))[0]
        return os.path.join(self.directory, "{}-{}-{}.engine".format(stem, key[:16], self.settings.suffix()))

    def built(self, onnx_path: str, key: str) -> Optional[str]:
        """The engine built from this ONNX content, if there is one."""
        engine = self.engine_path(onnx_path, key)
        return engine if os.path.isfile(engine) else None

    def request(self, onnx_path: str, key: str, sha256: str) -> None:
        """Build this content unless it is built, has failed, or another build is running (then later)."""
        engine = self.engine_path(onnx_path, key)
        with self._lock:
            if self._closed or self._running is not None or key in self._failures or os.path.isfile(engine):
                return
            try:
                process = self._spawn(onnx_path, sha256, engine)
            except OSError as exc:
                self._fail(onnx_path, key, "cannot start the engine build: {}".format(exc.strerror or exc))
                return
            self._running = _Build(onnx_path, key, engine, process, time.monotonic())
        log.info("building a %s TensorRT engine for %s in the background (pid %d)", self.settings.precision,
                 onnx_path, process.pid, extra={"ENGINE_FILE": onnx_path})

    def discard(self, onnx_path: str, key: str, reason: str) -> None:
        """The engine built for this content was rejected: remove it, and build it again only after a rescan."""
        engine = self.engine_path(onnx_path, key)
        self._remove_build_files(engine)
        self._failures[key] = reason

    def poll(self) -> bool:
        """Reap a finished build; True when one finished (an engine is ready, or another build may start)."""
        build = self._running
        if build is None or build.process.poll() is None:
            return False
        self._running = None
        seconds = time.monotonic() - build.started
        if build.process.returncode == 0:
            self.succeeded += 1
            self.last_result = "built {} from {} in {:.0f} s".format(
                os.path.basename(build.engine), os.path.basename(build.onnx), seconds)
            log.info("%s", self.last_result, extra={"ENGINE_FILE": build.engine})
        else:
            self._fail(build.onnx, build.key, "engine build failed ({}): {} (log: {})".format(
                _exit_description(build.process.returncode), _tail(build.engine + ".log"), build.engine + ".log"))
        self._prune()
        return True

    def forget_failures(self) -> None:
        """A rescan (systemctl reload, P:Control rescan) tries failed builds again: the cause may have been memory."""
        self._failures.clear()

    def stop(self) -> None:
        with self._lock:
            self._closed = True
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
        return {"engine_build": state, "engine_builds": self.succeeded, "engine_build_failures": self.failed,
                "engine_build_last": self.last_result}

    def _spawn(self, onnx_path: str, sha256: str, engine: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "appliance.engines.build", onnx_path, "--output", engine,
                   "--precision", self.settings.precision, "--max-batch", str(self.settings.max_batch),
                   "--profiles", str(self.settings.profiles), "--expect-sha256", sha256]
        nice = shutil.which("nice")
        if nice and self.niceness:  # a low CPU priority: the live stream keeps its cores
            command = [nice, "-n", str(self.niceness)] + command
        with open(engine + ".log", "w") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:  # short of memory, the kernel kills the build, not the service
            with open("/proc/{}/oom_score_adj".format(process.pid), "w") as handle:
                handle.write(_OOM_SCORE_FIRST_TO_GO)
        except OSError as exc:
            log.warning("engine build (pid %d) keeps the service's OOM score: %s", process.pid, exc.strerror or exc)
        return process

    def _fail(self, onnx_path: str, key: str, reason: str) -> None:
        self._failures[key] = reason
        self.failed += 1
        self.last_result = "{}: {}".format(onnx_path, reason)
        log.error("%s; its ONNX model serves meanwhile if it can", self.last_result, extra={"ENGINE_FILE": onnx_path})

    def _prune(self) -> None:
        """Keep the files of the newest ``keep`` builds (engine, manifest, log; failed ones too)."""
        newest: Dict[str, float] = {}
        for name in self._names():
            stem = name.split(".engine")[0]
            try:
                newest[stem] = max(newest.get(stem, 0.0), os.path.getmtime(os.path.join(self.directory, name)))
            except OSError:
                continue
        ranked = sorted(newest, key=lambda stem: newest[stem], reverse=True)
        for stem in ranked[self.keep:]:
            self._remove_build_files(os.path.join(self.directory, stem + ".engine"))

    def _remove_leftover_parts(self) -> None:
        """A build killed with the service leaves .part files; its engine is built again when needed."""
        for name in self._names():
            if name.endswith((".part", ".part.yaml")):
                _remove(os.path.join(self.directory, name))

    def _remove_build_files(self, engine: str) -> None:
        for suffix in ("", ".yaml", ".log", ".calib", ".calib.key"):
            _remove(engine + suffix)

    def _names(self) -> List[str]:
        return [name for name in os.listdir(self.directory) if ".engine" in name]


def _name_part(text: str) -> str:
    """``text`` as part of a file name: runs of anything but letters, digits and dots become one '_'."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror or exc)


def _exit_description(returncode: int) -> str:
    if returncode >= 0:
        return "exit {}".format(returncode)
    name = signal.Signals(-returncode).name
    if -returncode == signal.SIGKILL:
        return "killed by {}: out of memory?".format(name)
    return "killed by {}".format(name)


def _tail(path: str) -> str:
    """The last lines a failed build printed: its own error message comes last."""
    try:
        with open(path, errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError as exc:
        return "no log ({})".format(exc.strerror or exc)
    return " | ".join(lines[-_LOG_TAIL_LINES:]) or "it printed nothing"
