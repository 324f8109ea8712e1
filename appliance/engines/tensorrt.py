"""TensorRT engines on the GPU (and a Jetson's DLA cores), through the named-tensor API (TensorRT 8.5+).

An engine file only runs on the TensorRT version and device that built it. The
manifest says what that was, so a file built elsewhere is refused before it is
deserialized, with the reason; TensorRT itself would tell a Xavier NX engine
from an AGX Xavier one not at all (both are sm72), and anything else only
through its logger: deserialization returns None and logs e.g. "Version tag
does not match". The process-wide logger here keeps those lines, so a rejected
file is reported with TensorRT's own reason.

Each CUDA stream that enqueues work gets its own execution context (a context
holds the activations of one batch in flight). With a dynamic batch axis each
concurrently used context needs its own optimization profile (TensorRT 8.5
enforces it), so engines are built with one identical profile per in-flight
slot; see ``appliance.engines.build``. Every context is made, given its profile
and scratch memory and run once when the engine is loaded; a stream's first
batch only binds it to one that is free.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from appliance import cuda
from appliance.engines.base import BatchSpec, Engine, EngineIO, TensorSpec, assign_output_roles
from appliance.engines.errors import EngineError
from appliance.engines.manifest import Manifest, read_dla_plan

log = logging.getLogger(__name__)

MIN_VERSION = (8, 5)
BACKENDS = ("auto", "onnxruntime", "tensorrt")
DEVICE_TREE_MODEL = "/proc/device-tree/model"  # a Jetson's board name, NUL-terminated
GPU_CONTEXTS = 2  # of a fixed-batch engine, made at load: pipeline.in_flight's default
# Manifest build keys that must match this machine, and how a message names them.
_BUILT_FOR = (("tensorrt", "TensorRT"), ("compute_capability", "compute capability"), ("device_model", "device"))

# TensorRT DataType member name -> numpy dtype, for the types an image model's I/O can have.
_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT32": np.int32,
}
_INPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def import_tensorrt() -> Any:
    """The ``tensorrt`` module if it is new enough; EngineError saying what is missing otherwise."""
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or OSError from a broken libnvinfer install
        raise EngineError(
            "TensorRT's Python module does not import ({}: {}); on a Jetson install python3-libnvinfer "
            "and create the virtualenv with --system-site-packages".format(type(exc).__name__, exc)
        ) from exc
    version = str(getattr(tensorrt, "__version__", "0"))
    if version_tuple(version) < MIN_VERSION:
        raise EngineError(
            "TensorRT {} is too old: the appliance needs TensorRT {}.{} or newer (JetPack 5.1+) for the "
            "named-tensor API (num_io_tensors, set_tensor_address, execute_async_v3)".format(version, *MIN_VERSION)
        )
    return tensorrt


def version_tuple(version: str) -> Tuple[int, int]:
    parts = (version.split(".") + ["0", "0"])[:2]
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return 0, 0


def choose_backend(requested: str) -> Tuple[str, str]:
    """(backend, why) for ``engine.backend``: ``auto`` takes TensorRT when it and a CUDA device work.

    ``tensorrt`` insists: where it cannot run, starting fails with the reason
    rather than quietly serving from the CPU.
    """
    if requested not in BACKENDS:
        raise ValueError("engine backend {!r}; expected one of {}".format(requested, ", ".join(BACKENDS)))
    if requested == "onnxruntime":
        return requested, "engine.backend is onnxruntime in the configuration"
    usable, why = _tensorrt_usable()
    if requested == "tensorrt":
        if not usable:
            raise EngineError("engine.backend is tensorrt, but {}".format(why))
        return requested, "engine.backend is tensorrt: {}".format(why)
    return ("tensorrt" if usable else "onnxruntime"), "auto: {}".format(why)


def _tensorrt_usable() -> Tuple[bool, str]:
    try:
        tensorrt = import_tensorrt()
    except EngineError as exc:
        return False, str(exc)
    usable, device = cuda.available()
    if not usable:
        return False, "TensorRT {} is installed but CUDA is not usable: {}".format(tensorrt.__version__, device)
    return True, "TensorRT {} on {}".format(tensorrt.__version__, device)


def board_model() -> Optional[str]:
    """The board a Jetson's device tree names (None elsewhere).

    An AGX Xavier and a Xavier NX have the same GPU and compute capability, but
    their engines are tuned for their own clocks and memory, so engines are
    keyed and checked by the board as well.
    """
    try:
        with open(DEVICE_TREE_MODEL, "rb") as handle:
            text = handle.read(256)
    except OSError:
        return None
    return text.split(b"\0", 1)[0].decode("utf-8", "replace").strip() or None


def device_model() -> str:
    """What an engine is built for besides TensorRT and the compute capability: the board, else the GPU."""
    return board_model() or cuda.device_info().name


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps recent warnings and errors, numbered, for error messages."""

    class Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            severity = trt.ILogger.Severity
            self._kept = {severity.INTERNAL_ERROR, severity.ERROR, severity.WARNING}
            self._errors = {severity.INTERNAL_ERROR, severity.ERROR}
            self._messages: Deque[Tuple[int, Any, str]] = collections.deque(maxlen=50)
            self._count = 0
            self._lock = threading.Lock()  # TensorRT calls it from any thread that uses it

        def log(self, severity: Any, msg: str) -> None:
            if severity in self._kept:
                with self._lock:
                    self._messages.append((self._count, severity, str(msg)))
                    self._count += 1

        def mark(self) -> int:
            """A position in the log; :meth:`errors_since` reports what came after it."""
            return self._count

        def errors_since(self, mark: int) -> str:
            with self._lock:
                recent = [(s, m) for n, s, m in self._messages if n >= mark]
            lines = [m for s, m in recent if s in self._errors] or [m for _, m in recent]
            return "; ".join(lines)

    return Logger()


class TensorRtProcess:
    """What TensorRT holds once per process: the logger, the plugin registry and the runtimes.

    TensorRT keeps the first logger it is given, by a plain pointer, for every
    later Builder and Runtime: a logger per engine would leave every rejection
    after the first without its reason, and TensorRT calling a freed object once
    the first engine is collected. The runtimes live as long for the same reason
    (an engine must not outlive its runtime), one per DLA core since the core is
    a runtime setting. Plugins are registered once, before any engine that may
    have plugin layers is deserialized.
    """

    def __init__(self, trt: Any) -> None:
        self.trt = trt
        self.logger = _make_logger(trt)
        if not trt.init_libnvinfer_plugins(self.logger, ""):
            raise EngineError("TensorRT {} cannot register its plugins: {}".format(
                trt.__version__, self.logger.errors_since(0) or "no reason logged"))
        self._runtimes: Dict[int, Any] = {}
        self._lock = threading.Lock()

    def runtime(self, dla_core: Optional[int] = None) -> Any:
        """The runtime that deserializes engines for the GPU, or for one DLA core."""
        key = -1 if dla_core is None else dla_core
        with self._lock:
            runtime = self._runtimes.get(key)
            if runtime is None:
                runtime = self.trt.Runtime(self.logger)
                if dla_core is not None:
                    runtime.DLA_core = dla_core
                self._runtimes[key] = runtime
            return runtime


_PROCESS: Optional[TensorRtProcess] = None
_PROCESS_LOCK = threading.Lock()


def tensorrt_process(trt: Any) -> TensorRtProcess:
    """This process's TensorRT state, made on first use (a module imported anew, as the tests' fakes are, gets its own)."""
    global _PROCESS
    with _PROCESS_LOCK:
        if _PROCESS is None or _PROCESS.trt is not trt:
            _PROCESS = TensorRtProcess(trt)
        return _PROCESS


def check_built_here(path: str, manifest: Optional[Manifest], trt: Any) -> None:
    """Refuse, saying why, an engine whose manifest says it was built with another TensorRT or for another device.

    Keys the manifest lacks (hand-written, or from before this check) are left
    to TensorRT's own check at deserialization.
    """
    if manifest is None:
        return
    info = cuda.device_info()
    here = {"tensorrt": str(trt.__version__), "compute_capability": "{}.{}".format(*info.compute_capability),
            "device_model": device_model()}
    different = ["{} {} (here: {})".format(label, manifest.build[key], here[key])
                 for key, label in _BUILT_FOR if key in manifest.build and manifest.build[key] != here[key]]
    if different:
        raise EngineError("{}: built for {}: engines only run on the TensorRT version and device that built them: "
                          "rebuild it from the ONNX here".format(path, "; ".join(different)))


class _Context:
    """An execution context ready to serve: profile selected, scratch memory allocated, run once."""

    def __init__(self, context: Any, device: str, profile: Optional[int], scratch: List[cuda.DeviceBuffer]) -> None:
        self.context = context
        self.device = device  # "GPU" or "DLA <core>"
        self.profile = profile
        self.scratch = scratch  # device memory for outputs the pipeline has no role for
        self.batch = -1  # input shape last set

    def close(self) -> None:
        self.context = None  # destroys the TensorRT context, which frees its profile
        for buffer in self.scratch:
            buffer.close()


class TensorRtEngine(Engine):
    """One model on the GPU, and with ``dla_cores`` on those DLA cores too, as one engine.

    Each context is one batch in flight: ``gpu_contexts`` (pipeline.in_flight)
    on the GPU, fewer for a dynamic-batch engine with fewer optimization
    profiles (each context holds one), plus one per DLA
    core, each deserialized from the manifest's DLA plan on its own core. The
    pipeline sees only :attr:`max_in_flight` slots and never which device runs
    a batch.
    """

    backend = "tensorrt"

    def __init__(self, path: str, sha256: str, manifest: Optional[Manifest], dynamic_batch: int,
                 dla_cores: Sequence[int] = (), gpu_contexts: int = GPU_CONTEXTS) -> None:
        trt = import_tensorrt()
        usable, why = cuda.available()
        if not usable:
            raise EngineError("{}: TensorRT engines need a CUDA device: {}".format(path, why))
        self._trt = trt
        self._process = tensorrt_process(trt)
        self._logger = self._process.logger
        check_built_here(path, manifest, trt)
        self._engine = self._deserialize(path, _read(path), self._process.runtime())
        io, extra = self._read_io(self._engine, path, manifest, dynamic_batch)
        super().__init__(path, io, sha256, manifest)
        self._input_name = io.input.name
        self._output_names = {role: spec.name for role, spec in io.outputs.items()}
        self._extra_outputs = extra  # name -> bytes per frame
        self._dynamic = not io.batch.fixed
        self._lock = threading.Lock()
        self._contexts: List[_Context] = []
        self._free: List[_Context] = []
        self._bound: Dict[int, _Context] = {}  # stream handle -> its context
        self._dla_engines = self._load_dla_plan(path, manifest, dla_cores)
        try:
            self._make_contexts(gpu_contexts)
        except BaseException:
            self.close()
            raise

    def _deserialize(self, path: str, data: bytes, runtime: Any) -> Any:
        mark = self._logger.mark()
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            reason = self._logger.errors_since(mark) or "no reason logged"
            raise EngineError(
                "{}: TensorRT {} cannot load this engine on {}: {} (engines only run on the TensorRT version "
                "and GPU model that built them: rebuild it from the ONNX here)".format(
                    path, self._trt.__version__, cuda.device_info().name, reason
                )
            )
        return engine

    def _load_dla_plan(self, path: str, manifest: Optional[Manifest], dla_cores: Sequence[int]) -> Dict[int, Any]:
        """Core -> the manifest's DLA plan deserialized on it, with I/O checked against the GPU engine's."""
        if not dla_cores:
            return {}
        plan = manifest.dla if manifest is not None else None
        if plan is None:
            log.warning("%s has no DLA plan (build it with build-engine --dla-core N): it serves on the GPU only, "
                        "not on DLA cores %s", path, list(dla_cores), extra={"ENGINE_FILE": path})
            return {}
        plan_path, data = read_dla_plan(path, plan)
        engines = {}
        for core in dla_cores:
            runtime = self._process.runtime(core)
            if not 0 <= core < runtime.num_DLA_cores:
                raise EngineError("{}: engine.dla_cores has DLA core {}, but this device has {} DLA core(s)".format(
                    path, core, runtime.num_DLA_cores))
            engine = self._deserialize(plan_path, data, runtime)
            io, extra = self._read_io(engine, plan_path, self.manifest, self.io.batch.size)
            if io != self.io or extra != self._extra_outputs:
                raise EngineError("{}: the DLA plan's I/O ({}; {}) differs from the engine's ({}; {}): build both "
                                  "from the same ONNX with build-engine --dla-core N".format(
                                      plan_path, io.input.describe(), io.batch.describe(),
                                      self.io.input.describe(), self.io.batch.describe()))
            engines[core] = engine
        return engines

    # -- I/O -----------------------------------------------------------------------
    def _read_io(self, engine: Any, path: str, manifest: Optional[Manifest],
                 dynamic_batch: int) -> Tuple[EngineIO, Dict[str, int]]:
        trt = self._trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if len(inputs) != 1:
            raise EngineError(
                "{}: engine has {} inputs ({}); expected exactly one image input".format(path, len(inputs), inputs)
            )
        input_spec, input_batch = self._tensor_spec(engine, path, inputs[0])
        if np.dtype(input_spec.dtype) not in _INPUT_DTYPES:
            raise EngineError("{}: input {} is {}; expected float32 or float16".format(
                path, input_spec.name, np.dtype(input_spec.dtype).name))
        batch = self._batch_spec(engine, path, inputs[0], input_batch, dynamic_batch)
        roles = assign_output_roles(outputs, manifest.outputs if manifest else None, path)
        output_specs = {role: self._tensor_spec(engine, path, name)[0] for role, name in roles.items()}
        io = EngineIO(input=input_spec, outputs=output_specs, batch=batch)
        io.image_shape  # raises a clear error for a non-image input
        for role in output_specs:
            io.output_image_shape(role)
        extra = {}
        for name in outputs:
            if name not in roles.values():
                spec = self._tensor_spec(engine, path, name)[0]
                extra[name] = int(np.prod(spec.frame_shape)) * np.dtype(spec.dtype).itemsize
        return io, extra

    def _tensor_spec(self, engine: Any, path: str, name: str) -> Tuple[TensorSpec, int]:
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        trt_dtype = engine.get_tensor_dtype(name)
        dtypes = {getattr(self._trt.DataType, k): v for k, v in _DTYPES.items() if hasattr(self._trt.DataType, k)}
        if trt_dtype not in dtypes:
            raise EngineError("{}: tensor {} has type {}; expected one of {}".format(
                path, name, trt_dtype, sorted(_DTYPES)))
        if len(shape) < 3 or any(d <= 0 for d in shape[1:]):
            raise EngineError("{}: tensor {} has shape {}; expected (batch, [1,] H, W) where only the batch axis "
                              "may be dynamic".format(path, name, list(shape)))
        return TensorSpec(name, shape[1:], np.dtype(dtypes[trt_dtype])), shape[0]

    def _batch_spec(self, engine: Any, path: str, name: str, batch_dim: int, dynamic_batch: int) -> BatchSpec:
        if batch_dim > 0:
            return BatchSpec(fixed=True, size=batch_dim)
        largest = None
        for profile in range(engine.num_optimization_profiles):
            low, _, high = (tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, profile))
            if low[0] != 1:
                raise EngineError(
                    "{}: optimization profile {} starts at batch {}; expected 1 so that any partial batch runs".format(
                        path, profile, low[0]
                    )
                )
            largest = high[0] if largest is None else min(largest, high[0])
        if largest is None:
            raise EngineError("{}: dynamic batch axis but no optimization profile".format(path))
        return BatchSpec(fixed=False, size=min(largest, dynamic_batch))

    # -- serving contexts ----------------------------------------------------------------
    def _make_contexts(self, gpu_contexts: int) -> None:
        """Every context the engine will serve with, ready: the hot path then only binds a stream to one.

        A profile is selected on a stream (``set_optimization_profile_async``)
        and TensorRT requires that stream synchronized with the one that later
        enqueues; doing it here on a setup stream, synchronized, leaves the
        context usable from any stream. The run here also absorbs the first
        enqueue's resource updates.
        """
        if self._dynamic:
            profiles = range(min(self._engine.num_optimization_profiles, gpu_contexts))
            gpu = [("GPU", self._engine, profile) for profile in profiles]
        else:
            gpu = [("GPU", self._engine, None)] * gpu_contexts
        dla = [("DLA {}".format(core), engine, None) for core, engine in self._dla_engines.items()]
        setup = cuda.Stream()
        try:
            for device, engine, profile in gpu + dla:
                self._contexts.append(self._new_context(engine, device, profile, setup))
            setup.synchronize()
            self._run_each_context(setup)
        finally:
            setup.synchronize()
            setup.close()
        self._free = list(self._contexts)

    def _new_context(self, engine: Any, device: str, profile: Optional[int], stream: cuda.Stream) -> _Context:
        mark = self._logger.mark()
        context = engine.create_execution_context()
        if context is None:
            raise EngineError("{}: cannot create an execution context on the {}: {}".format(
                self.name, device, self._log(mark)))
        if profile is not None and not context.set_optimization_profile_async(profile, stream.handle):
            raise EngineError("{}: cannot select optimization profile {}: {}".format(self.name, profile, self._log(mark)))
        scratch = [cuda.DeviceBuffer(self.io.batch.size * nbytes) for nbytes in self._extra_outputs.values()]
        return _Context(context, device, profile, scratch)

    def _run_each_context(self, stream: cuda.Stream) -> None:
        """One zero batch of the largest size through every context, into buffers freed afterwards."""
        size = self.io.batch.size
        frame_nbytes = int(np.prod(self.io.input.frame_shape)) * np.dtype(self.io.input.dtype).itemsize
        buffers = {role: cuda.DeviceBuffer(size * int(np.prod(s.frame_shape)) * np.dtype(s.dtype).itemsize)
                   for role, s in self.io.outputs.items()}
        frames = cuda.DeviceBuffer(size * frame_nbytes)
        try:
            cuda.memset(frames.ptr, 0, frames.nbytes, stream)
            for state in self._contexts:
                self._execute(state, frames.ptr, {role: b.ptr for role, b in buffers.items()}, size, stream.handle)
            stream.synchronize()
        finally:
            stream.synchronize()
            for buffer in [frames] + list(buffers.values()):
                buffer.close()

    @property
    def max_in_flight(self) -> Optional[int]:
        """How many batches can be in flight at once: one per serving context."""
        return len(self._contexts)

    @property
    def devices(self) -> List[str]:
        """Where each serving context runs, e.g. ["GPU", "GPU", "DLA 0", "DLA 1"]."""
        return [state.device for state in self._contexts]

    def _bind(self, stream: int) -> _Context:
        """The context ``stream`` runs on from now on: a free one, made at load (nothing is allocated here)."""
        with self._lock:
            if not self._free:
                raise EngineError(self._all_in_use())
            state = self._free.pop(0)
            self._bound[stream] = state
            return state

    def _release(self, stream: int) -> None:
        with self._lock:
            state = self._bound.pop(stream, None)
            if state is not None:
                self._free.insert(0, state)

    def _all_in_use(self) -> str:
        if self._dynamic:
            return ("{}: all {} optimization profiles are in use: a dynamic-batch engine needs one profile per "
                    "in-flight slot (rebuild it with build-engine --profiles N, or lower pipeline.in_flight)".format(
                        self.name, len(self._contexts)))
        return "{}: all {} execution contexts ({}) are in use: lower pipeline.in_flight to {}".format(
            self.name, len(self._contexts), ", ".join(self.devices), len(self._contexts))

    # -- execution ---------------------------------------------------------------------
    @property
    def runs_on_gpu(self) -> bool:
        return True

    def enqueue(self, input_ptr: int, output_ptrs: Mapping[str, int], batch: int, stream: int) -> None:
        state = self._bound.get(stream) or self._bind(stream)
        self._execute(state, input_ptr, output_ptrs, batch, stream)

    def _execute(self, state: _Context, input_ptr: int, output_ptrs: Mapping[str, int], batch: int,
                 stream: int) -> None:
        mark = self._logger.mark()
        context = state.context
        if self._dynamic and state.batch != batch:
            if not context.set_input_shape(self._input_name, (batch,) + tuple(self.io.input.frame_shape)):
                raise EngineError("{}: set_input_shape(batch {}) refused: {}".format(self.name, batch, self._log(mark)))
            state.batch = batch
        addresses = [(self._input_name, input_ptr)]
        addresses += [(self._output_names[role], ptr) for role, ptr in output_ptrs.items()]
        addresses += [(name, buffer.ptr) for name, buffer in zip(self._extra_outputs, state.scratch)]
        for name, ptr in addresses:
            if not context.set_tensor_address(name, ptr):
                raise EngineError("{}: set_tensor_address({}) refused: {}".format(self.name, name, self._log(mark)))
        if not context.execute_async_v3(stream):
            raise EngineError("{}: execute_async_v3 on the {} failed: {}".format(
                self.name, state.device, self._log(mark)))

    def _log(self, mark: int) -> str:
        return self._logger.errors_since(mark) or "TensorRT logged no reason"

    def run(self, frames: np.ndarray) -> Dict[str, np.ndarray]:
        """Synchronous inference for validation: its own stream and buffers, on a serving context it gives back."""
        frames = np.ascontiguousarray(frames, dtype=self.io.input.dtype)
        spec = self.io.batch
        frame_nbytes = int(np.prod(self.io.input.frame_shape)) * frames.dtype.itemsize
        results: Dict[str, List[np.ndarray]] = {
            role: [np.empty((0,) + self.io.output_image_shape(role), s.dtype)] for role, s in self.io.outputs.items()
        }
        stream = cuda.Stream()
        device_in = cuda.DeviceBuffer(spec.size * frame_nbytes)
        device_out = {
            role: cuda.DeviceBuffer(spec.size * int(np.prod(s.frame_shape)) * np.dtype(s.dtype).itemsize)
            for role, s in self.io.outputs.items()
        }
        try:
            for start in range(0, len(frames), spec.size):
                chunk = frames[start : start + spec.size]
                run_size = spec.size if spec.fixed else len(chunk)
                cuda.memset(device_in.ptr, 0, spec.size * frame_nbytes, stream)
                cuda.copy_host_to_device(device_in.ptr, chunk.ctypes.data, chunk.nbytes, stream)
                self.enqueue(device_in.ptr, {r: b.ptr for r, b in device_out.items()}, run_size, stream.handle)
                for role, buffer in device_out.items():
                    out = np.empty((len(chunk),) + self.io.output_image_shape(role), self.io.outputs[role].dtype)
                    cuda.copy_device_to_host(out.ctypes.data, buffer.ptr, out.nbytes, stream)
                    results[role].append(out)
                stream.synchronize()
        finally:
            stream.synchronize()
            self._release(stream.handle)
            for buffer in [device_in] + list(device_out.values()):
                buffer.close()
            stream.close()
        return {role: np.concatenate(parts) for role, parts in results.items()}

    def describe(self) -> str:
        devices = self.devices
        if devices.count("GPU") == len(devices):
            return super().describe()
        return "{}; on {}".format(super().describe(), ", ".join(devices))

    def close(self) -> None:
        with self._lock:
            contexts, self._contexts, self._free, self._bound = self._contexts, [], [], {}
        for state in contexts:
            state.close()
        self._dla_engines = {}
        self._engine = None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise EngineError("{}: cannot read: {}".format(path, exc)) from exc
