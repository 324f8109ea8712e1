"""The engines directory: watch it, validate what lands there, serve the newest good file.

Deployment is ``scp model.onnx host:/var/lib/ptychonn-edge/engines/``, possibly in
the middle of a scan, so this stage must never disturb the stream: files are
looked at only once written (closed, then quiet for ``engine.settle_s``),
validated on this thread, and handed to the pipeline, which swaps between
batches. A file that fails is remembered by content and not tried again until it
changes; whatever the directory holds, the engine that serves keeps serving.

On a TensorRT device an ONNX model has a better form: the engine built from it
(:mod:`appliance.engines.autobuild`). The manager serves that once it is built
and valid, and the ONNX model itself on ONNX Runtime until then, or after the
built engine fails.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple

import numpy as np

from appliance.config import EngineConfig
from appliance.engines import ONNX_SUFFIXES, is_engine_file, open_engine
from appliance.engines.autobuild import EngineBuilds
from appliance.engines.base import Engine, run_padded
from appliance.engines.errors import BackendUnavailable, EngineError, first_line
from appliance.engines.files import SizeLimit, file_sha256, regular_file_size
from appliance.engines.manifest import load_golden, manifest_path, read_manifest_bytes
from appliance.ntndarray import published_dtype
from appliance.schema import excerpt

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".part", ".tmp")
_POLL_S = 1.0  # rescan period where inotify is not available
_TIMED_BATCHES = 3  # the fastest of these full batches is the candidate's throughput


@dataclass(frozen=True)
class StreamSpec:
    """What the stream feeds an engine: fixed once the ring exists.

    ``input_rate_hz``: the stream's current frames/s (0 while not known); a
    candidate slower than that would drop frames from its first batch on.
    """

    image_shape: Tuple[int, int]
    dtype: np.dtype
    input_rate_hz: Optional[Callable[[], float]] = None


@dataclass(frozen=True)
class Verdict:
    name: str
    sha256: str
    accepted: bool
    reason: str
    at: float

    def describe(self) -> str:
        return "{} ({}): {}".format(self.name, self.sha256[:12], self.reason)


def is_candidate(name: str) -> bool:
    """Engine files, minus hidden and partial ones (renamed into place when complete)."""
    return not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES) and is_engine_file(name)


def validate(path: str, engine_config: EngineConfig, dynamic_batch: int, stream: Optional[StreamSpec],
             sha256: Optional[str] = None, in_flight: int = 2) -> Engine:
    """Load ``path`` and prove it can serve this stream; raises EngineError saying why not.

    ``sha256``: the file's, when the caller has just hashed it (engines can be large).
    ``in_flight``: pipeline.in_flight, the batches the engine must be able to run at once.
    """
    try:
        size = regular_file_size(path, file_limit(engine_config))
    except OSError as exc:
        raise EngineError("{}: cannot read: {}".format(path, exc.strerror or exc)) from exc
    if size == 0:
        raise EngineError("{}: empty file".format(path))
    if engine_config.backend == "onnxruntime" and not path.lower().endswith(ONNX_SUFFIXES):
        raise EngineError("{}: a TensorRT engine, but engine.backend is onnxruntime".format(path))
    engine = open_engine(path, dynamic_batch, engine_config.cpu_threads, sha256, engine_config.dla_cores, in_flight)
    try:
        _check_fits_stream(engine, stream)
        frame = _warm_up(engine)
        _check_golden(engine)
        _check_throughput(engine, frame, stream)
    except Exception:
        engine.close()
        raise
    return engine


def file_limit(engine_config: EngineConfig) -> SizeLimit:
    """engine.max_file_mb: larger files are refused before a byte of them is read."""
    return SizeLimit(engine_config.max_file_mb << 20, "engine.max_file_mb ({} MiB)".format(engine_config.max_file_mb))


def _check_fits_stream(engine: Engine, stream: Optional[StreamSpec]) -> None:
    if stream is None:
        return
    if engine.io.image_shape != stream.image_shape or np.dtype(engine.io.input.dtype) != stream.dtype:
        raise EngineError(
            "{}: takes {} {}x{} frames; the stream delivers {} {}x{} (a different input needs a restart)".format(
                engine.path, np.dtype(engine.io.input.dtype).name, engine.io.image_shape[0], engine.io.image_shape[1],
                stream.dtype.name, stream.image_shape[0], stream.image_shape[1],
            )
        )


def _warm_up(engine: Engine) -> np.ndarray:
    """One inference before serving: a model's first run is slow, and may fail. Returns the frame it ran."""
    frames = np.zeros((1,) + engine.io.image_shape, dtype=engine.io.input.dtype)
    try:
        outputs = run_padded(engine, frames)
    except Exception as exc:
        raise EngineError("{}: warm-up inference failed: {}: {}".format(engine.path, type(exc).__name__, exc)) from exc
    for role in engine.io.outputs:
        if role not in outputs or outputs[role].shape[0] != 1:
            raise EngineError("{}: warm-up produced no {} output".format(engine.path, role))
    check_outputs(engine, outputs, "warm-up")
    return frames[0]


def check_outputs(engine: Engine, outputs: Dict[str, np.ndarray], what: str) -> None:
    """Outputs the pipeline could publish: of a type NTNDArray carries, and all finite.

    A model giving NaN would have its frames dropped until the run-time fault
    limit demotes it; better refused before it serves a frame.
    """
    for role, values in outputs.items():
        try:
            published_dtype(values.dtype)
        except ValueError as exc:
            raise EngineError("{}: {} output {} cannot be published: {}".format(engine.path, what, role, exc)) from exc
        bad = int(values.size - np.count_nonzero(np.isfinite(values))) if values.dtype.kind == "f" else 0
        if bad:
            raise EngineError("{}: {} output {} is not finite: {} of {} values NaN or Inf".format(
                engine.path, what, role, bad, values.size))


def _check_throughput(engine: Engine, frame: np.ndarray, stream: Optional[StreamSpec]) -> None:
    """Measure frames/s of a full batch (kept on the engine); refuse one slower than the stream now is."""
    batch = np.repeat(frame[np.newaxis], engine.io.batch.size, axis=0)
    fastest = float("inf")
    for _ in range(_TIMED_BATCHES):
        started = time.perf_counter()
        run_padded(engine, batch)
        fastest = min(fastest, time.perf_counter() - started)
    engine.frames_per_s = len(batch) / max(fastest, 1e-9)
    rate = stream.input_rate_hz() if stream is not None and stream.input_rate_hz is not None else 0.0
    if rate > 0 and engine.frames_per_s < rate:
        raise EngineError(
            "{}: too slow for the stream: {:.4g} frames/s (fastest of {} full batches of {}); the stream brings "
            "{:.4g} frames/s".format(engine.path, engine.frames_per_s, _TIMED_BATCHES, len(batch), rate)
        )


def _check_golden(engine: Engine) -> None:
    manifest = engine.manifest
    if manifest is None or manifest.golden is None:
        return
    frames, expected = load_golden(engine.path, manifest.golden)
    frames = _golden_frames(engine, frames)
    outputs = run_padded(engine, frames)
    for role, want in expected.items():
        if role not in outputs:
            raise EngineError("{}: golden pair has {} but the model has no such output".format(engine.path, role))
        got = outputs[role]
        if want.size != got.size or not _is_numeric(want):
            raise EngineError("{}: golden {} is {} {}; the model gives {} {} for the {} golden frames".format(
                engine.path, role, want.dtype, list(want.shape), got.dtype, list(got.shape), len(frames)))
        got = got.reshape(want.shape)
        check_outputs(engine, {role: got}, "golden")
        close = np.isclose(got, want, rtol=manifest.golden.rtol, atol=manifest.golden.atol)
        if not close.all():
            worst = float(np.max(np.abs(got - want)))
            raise EngineError(
                "{}: golden check failed: {} of {} {} values outside atol {} / rtol {} (largest difference {:.3g})".format(
                    engine.path, int((~close).sum()), close.size, role, manifest.golden.atol, manifest.golden.rtol, worst
                )
            )


def _golden_frames(engine: Engine, frames: np.ndarray) -> np.ndarray:
    """The golden input as a batch of the model's frames; EngineError unless it is whole numeric frames."""
    height, width = engine.io.image_shape
    if frames.size == 0 or frames.size % (height * width) or not _is_numeric(frames):
        raise EngineError("{}: golden input is {} {}; expected one or more {}x{} frames of numbers".format(
            engine.path, frames.dtype, list(frames.shape), height, width))
    return frames.reshape((-1, height, width)).astype(engine.io.input.dtype)


def _is_numeric(values: np.ndarray) -> bool:
    return values.dtype.kind in "biuf"


def _stamp(path: str) -> Tuple[Tuple[int, int], ...]:
    """(size, mtime) of a file and its manifest: cheap evidence that neither changed."""
    stamps = []
    for part in (path, manifest_path(path)):
        try:
            info = os.stat(part)
            stamps.append((info.st_size, info.st_mtime_ns))
        except FileNotFoundError:
            stamps.append((-1, 0))
    return tuple(stamps)


def _deployed_ns(path: str) -> int:
    """When ``path`` was put in place: a symlink counts from its own making or its target's change."""
    return max(os.lstat(path).st_mtime_ns, os.stat(path).st_mtime_ns)


@dataclass(frozen=True)
class Content:
    """What a candidate is, by content: the file is read once for both hashes."""

    key: str  # the file's and its sidecar manifest's: either changing makes a new candidate
    sha256: str  # the file's alone: what users compare with sha256sum, and manifests name


def content_of(path: str, limit: Optional[SizeLimit] = None) -> Content:
    """Raises EngineError for what must not be read (see :func:`appliance.engines.files.open_regular_file`)."""
    sha256 = file_sha256(path, limit)
    digest = hashlib.sha256(sha256.encode())
    manifest = read_manifest_bytes(manifest_path(path))
    digest.update(b"\0absent" if manifest is None else manifest)
    return Content(digest.hexdigest(), sha256)


class EngineManager:
    """Owns the engines directory and decides which file serves.

    ``serve(engine)`` is called (on this manager's thread) with each newly
    accepted engine; the caller swaps it in between batches.
    """

    def __init__(
        self,
        config: EngineConfig,
        dynamic_batch: int,
        serve: Callable[[Engine], None],
        history: int = 20,
        builds: Optional[EngineBuilds] = None,
        in_flight: int = 2,
    ) -> None:
        self._config = config
        self._in_flight = in_flight
        self._builds = builds
        self._directory = os.path.normpath(config.directory)
        self._dynamic_batch = dynamic_batch
        self._serve = serve
        self.stream: Optional[StreamSpec] = None
        self.active_path: Optional[str] = None  # the file in the directory that serves...
        self._active: Optional[Content] = None
        self._serving: Optional[Tuple[str, Content]] = None  # ...through this file (its built engine, say)
        self._rejected: Dict[str, str] = {}  # content key -> reason
        self._unjudged: Set[str] = set()  # content keys of ONNX models whose runtime is missing: built, not run
        self._contents: Dict[str, Tuple[Tuple[Tuple[int, int], ...], Content]] = {}  # path -> (stamp, content)
        self._last_event: Dict[str, float] = {}  # name -> monotonic time of its last change
        self._writing: Dict[str, bool] = {}  # name -> modified but not yet closed
        self.verdicts: Deque[Verdict] = collections.deque(maxlen=history)
        self.swaps = 0
        self.rejections = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._faults: List[Tuple[str, str]] = []
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._directory_error: Optional[str] = None
        self._rescan_requested = False
        self._death = ""  # why the manager thread ended, if it did on its own

    # -- called from other threads ------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engines", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._builds is not None:
            self._builds.stop()

    def rescan(self) -> None:
        """Look at every file again (SIGHUP / systemctl reload), settled ones at once."""
        with self._lock:
            self._last_event.clear()
            self._writing.clear()
            self._rescan_requested = True
        self._wake.set()

    def report_fault(self, engine: Engine, reason: str) -> None:
        """The pipeline found ``engine`` failing at run time: demote it, serve the previous one."""
        with self._lock:
            self._faults.append((engine.path, reason))
        self._wake.set()

    def select_initial(self) -> Optional[Engine]:
        """The newest valid engine now, before the stream exists (start-up).

        A file changed within ``settle_s`` is judged as it is: no event history
        exists yet, and waiting would start a service just installed with no engine.
        """
        return self._select(wait_for_fresh=False)

    def status(self) -> Dict[str, object]:
        builds = self._builds.status() if self._builds is not None else {}
        verdicts = list(self.verdicts)  # the manager thread appends meanwhile
        with self._lock:
            pending = sorted(self._last_event)
        return {
            **builds,
            "engine_manager": self._thread_state(),
            "engine_pending": pending,
            "engine_swaps": self.swaps,
            "engine_rejections": self.rejections,
            "engine_directory_error": self._directory_error or "",
            "engine_verdicts": [
                {"file": v.name, "sha256": v.sha256, "accepted": v.accepted, "reason": v.reason} for v in verdicts
            ],
            "last_rejection": next((v.describe() for v in reversed(verdicts) if not v.accepted), ""),
        }

    def _thread_state(self) -> str:
        """running, or why not: a manager that died judges nothing more, and P:Status must say so."""
        if self._death:
            return self._death
        if self._thread is None:
            return "not started"
        if self._thread.is_alive():
            return "running"
        return "stopped" if self._stop.is_set() else "died"

    # -- the manager thread ---------------------------------------------------------
    def _run(self) -> None:
        watcher = _Watcher(self._directory)
        try:
            self._reconcile()  # what landed between select_initial() and the watch
            while not self._stop.is_set():
                for name, closed in watcher.events(self._timeout(), self._wake):
                    self._note_event(name, closed)
                self._wake.clear()
                self._handle_faults()
                build_finished = self._builds is not None and self._builds.poll()
                if self._settled_now() or watcher.polling or build_finished:
                    self._reconcile()
        except Exception as exc:  # the service goes on with the engine it has
            self._death = "died: {}: {}".format(type(exc).__name__, excerpt(first_line(exc), 200))
            log.exception("engine manager stopped; the serving engine stays")
        finally:
            watcher.close()

    def _timeout(self) -> float:
        """Until the next closed file settles, or the polling period.

        A file still open for writing does not count: its close is an event that wakes us.
        """
        with self._lock:
            pending = [t + self._config.settle_s for n, t in self._last_event.items() if not self._writing.get(n)]
        if not pending:
            return _POLL_S
        return max(0.01, min(pending) - time.monotonic())

    def _note_event(self, name: str, closed: bool) -> None:
        if not closed and not self._is_regular(name):
            closed = True  # a symlink, directory or FIFO is complete once created: no close will follow
        if name.endswith(".yaml"):
            name = name[: -len(".yaml")]  # a manifest change is a change of its engine
        with self._lock:
            self._last_event[name] = time.monotonic()
            self._writing[name] = not closed

    def _is_regular(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(os.path.join(self._directory, name)).st_mode)
        except OSError:
            return False  # gone already: nothing is left to wait for

    def _settled_now(self) -> bool:
        """True when a changed file has been closed and quiet for settle_s, or a rescan was asked for."""
        now = time.monotonic()
        with self._lock:
            ready = [n for n, t in self._last_event.items() if now - t >= self._config.settle_s and not self._writing.get(n)]
            for name in ready:
                del self._last_event[name]
                self._writing.pop(name, None)
            rescan, self._rescan_requested = self._rescan_requested, False
        if rescan and self._builds is not None:
            self._builds.forget_failures()
        return bool(ready) or rescan

    def _handle_faults(self) -> None:
        with self._lock:
            faults, self._faults = self._faults, []
        for path, reason in faults:
            if self._serving is None or path != self._serving[0]:
                continue
            message = "failed at run time: {}".format(reason)
            self._reject(path, self._serving[1], message)
            if path != self.active_path and self._builds is not None and self.active_path and self._active:
                self._builds.discard(self.active_path, self._active.key, message)
            self.active_path, self._active, self._serving = None, None, None
            self._reconcile()

    def _reconcile(self) -> None:
        engine = self._select(wait_for_fresh=True)
        if engine is not None:
            self._serve(engine)
            self.swaps += 1

    def _select(self, wait_for_fresh: bool) -> Optional[Engine]:
        """The newest file that validates, unless that is the one already serving in its best form.

        Files older than the serving one are not considered while it is there: a
        serving file whose new content (or manifest) fails, or is still being
        written, keeps serving from memory rather than giving way, silently, to an
        older model. Files being written are judged once they have settled.
        """
        for path, pending in self._candidates(wait_for_fresh):
            if path == self.active_path:
                return None if pending else self._active_again(path)
            engine = None if pending else self._judge(path)
            if engine is not None:
                return engine
        if self.active_path and not os.path.exists(self.active_path):
            log.warning("%s was removed and no other engine validates; it keeps serving from memory", self.active_path)
        return None

    def _active_again(self, path: str) -> Optional[Engine]:
        """The serving file once more: its built form, its new content, or (None) the engine in memory."""
        if self._unchanged(path):
            return self._upgrade()
        engine = self._judge(path)
        if engine is None:
            log.warning("%s changed and does not validate; the engine loaded from it keeps serving", path)
        return engine

    def _judge(self, path: str) -> Optional[Engine]:
        """``path``'s engine if it (or its built form) validates; whatever fails is rejected with its reason."""
        try:
            content = self._content(path)
        except FileNotFoundError:
            return None  # vanished since listing
        except OSError as exc:
            self._reject_unread(path, "{}: cannot read: {}".format(path, exc.strerror or exc))
            return None
        except EngineError as exc:
            self._reject_unread(path, str(exc))
            return None
        engine = self._first_valid(path, content, self._built_forms(path, content) + [path])
        if engine is None and content.key in self._unjudged:
            self._request_build(path, content)
        return engine

    def _built_forms(self, path: str, content: Content) -> List[str]:
        """The TensorRT engine built from the ONNX model ``path``, if there is one: it serves before the model."""
        if self._builds is None or not path.lower().endswith(ONNX_SUFFIXES):
            return []
        built = self._builds.built(path, content.key)
        return [built] if built else []

    def _request_build(self, path: str, content: Content) -> None:
        if self._builds is not None and path.lower().endswith(ONNX_SUFFIXES):
            self._builds.request(path, content.key, content.sha256)

    def _upgrade(self) -> Optional[Engine]:
        """The engine built for the ONNX model that ONNX Runtime serves, once the build is done."""
        if self._serving is None or self._serving[0] != self.active_path or self._active is None:
            return None
        path, content = self.active_path, self._active
        engine = self._first_valid(path, content, self._built_forms(path, content))
        if engine is None:
            self._request_build(path, content)  # a build that waited for another one, or one retried on rescan
        return engine

    def _first_valid(self, path: str, content: Content, forms: List[str]) -> Optional[Engine]:
        """The first of ``forms`` (of the directory's file ``path``) that validates; failures are remembered."""
        for form in forms:
            try:
                form_content = content if form == path else self._content(form)
            except (OSError, EngineError):
                continue  # a built engine gone from the cache (or made unreadable): the next form
            if form_content.key in self._rejected:
                continue
            try:
                engine = self._validate(form, form_content)
            except EngineError as exc:
                self._reject(form, form_content, str(exc))
                if form != path and self._builds is not None:
                    self._builds.discard(path, content.key, str(exc))
                elif isinstance(exc, BackendUnavailable):
                    self._unjudged.add(content.key)
                continue
            self.active_path, self._active, self._serving = path, content, (form, form_content)
            self._verdict(form, form_content, True, "accepted: {}; {:.4g} frames/s".format(
                engine.describe(), engine.frames_per_s))
            if form == path:
                self._request_build(path, content)
            return engine
        return None

    def _validate(self, path: str, content: Content) -> Engine:
        """:func:`validate`, with any failure an EngineError: one file must never end the manager thread."""
        try:
            return validate(path, self._config, self._dynamic_batch, self.stream, content.sha256, self._in_flight)
        except EngineError:
            raise
        except Exception as exc:  # a library's (or our) surprise on this file; the next file is judged as usual
            log.exception("validating %s failed unexpectedly", path)
            raise EngineError("{}: validation failed unexpectedly: {}: {}".format(
                path, type(exc).__name__, excerpt(first_line(exc), 200))) from exc

    def _unchanged(self, path: str) -> bool:
        try:
            return self._content(path) == self._active
        except (OSError, EngineError):
            return False

    def _content(self, path: str) -> Content:
        """Hashed again only when the file's or its manifest's size or mtime changed."""
        stamp = _stamp(path)
        cached = self._contents.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        content = content_of(path, file_limit(self._config))
        self._contents[path] = (stamp, content)
        return content

    def _candidates(self, wait_for_fresh: bool) -> List[Tuple[str, bool]]:
        """(path, pending) of the engine files, newest first; pending: being written, or not settled yet.

        ``wait_for_fresh``: a file changed within ``settle_s`` whose events have not
        been read yet (it appeared between the last read and this listing, or a
        rescan forgot what was being written) is pending too, and settles as if its
        change had just been seen: judged at once, it could be read half-written.
        """
        try:
            names = os.listdir(self._directory)
            self._directory_error = None
        except OSError as exc:
            message = "cannot list {}: {}".format(self._directory, exc.strerror or exc)
            if message != self._directory_error:
                log.error("%s; the serving engine stays", message)
            self._directory_error = message
            return []
        with self._lock:
            writing = {n for n, w in self._writing.items() if w} | set(self._last_event)
        present = {os.path.join(self._directory, name) for name in names}
        for gone in [p for p in self._contents if os.path.dirname(p) == self._directory and p not in present]:
            del self._contents[gone]
        fresh_since = time.time_ns() - int(self._config.settle_s * 1e9)
        stamped = []
        for name in names:
            if not is_candidate(name):
                continue
            path = os.path.join(self._directory, name)
            try:
                deployed = _deployed_ns(path)
            except OSError:
                continue
            pending = name in writing
            if wait_for_fresh and not pending and deployed > fresh_since:
                self._note_event(name, closed=True)
                pending = True
            stamped.append((deployed, path, pending))
        return [(path, pending) for _, path, pending in sorted(stamped, reverse=True)]

    def _reject_unread(self, path: str, reason: str) -> None:
        """A file refused before it could be hashed: remembered by name and (size, mtime) instead."""
        key = "unread {} {}".format(path, _stamp(path))
        if key not in self._rejected:
            self._reject(path, Content(key, ""), reason)

    def _reject(self, path: str, content: Content, reason: str) -> None:
        self._rejected[content.key] = reason
        self.rejections += 1
        self._verdict(path, content, False, reason)

    def _verdict(self, path: str, content: Content, accepted: bool, reason: str) -> None:
        verdict = Verdict(os.path.basename(path), content.sha256, accepted, reason, time.time())
        self.verdicts.append(verdict)
        fields = {"ENGINE_FILE": path, "ENGINE_SHA256": content.sha256,
                  "ENGINE_VERDICT": "accepted" if accepted else "rejected"}
        if accepted:
            log.info("engine %s", reason, extra=fields)
        else:
            log.error("engine rejected: %s", reason, extra=fields)


class _Watcher:
    """inotify on the directory when available (Linux), else a periodic rescan."""

    def __init__(self, directory: str) -> None:
        self._directory = directory
        self._inotify = None
        self.polling = True
        try:
            from inotify_simple import INotify, flags

            self._flags = flags
            self._inotify = INotify()
            mask = flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.DELETE | flags.MODIFY | flags.CREATE
            self._inotify.add_watch(directory, mask)
            self.polling = False
        except ImportError:
            log.warning("inotify_simple not installed: rescanning %s every %.0f s", directory, _POLL_S)
        except OSError as exc:
            log.error("cannot watch %s (%s): rescanning every %.0f s", directory, exc.strerror or exc, _POLL_S)
            self.close()

    def events(self, timeout: float, wake: threading.Event) -> List[Tuple[str, bool]]:
        """(name, closed) for each change; waits at most ``timeout`` (or until ``wake``)."""
        if self._inotify is None:
            wake.wait(timeout)
            return []
        changes = []
        deadline = time.monotonic() + timeout
        while not wake.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Short reads keep wake() responsive without a second file descriptor.
            for event in self._inotify.read(timeout=int(min(remaining, 0.2) * 1000)):
                if not event.name:
                    continue
                closed = not (event.mask & self._flags.MODIFY or event.mask & self._flags.CREATE)
                changes.append((event.name, closed))
            if changes:
                break
        return changes

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
