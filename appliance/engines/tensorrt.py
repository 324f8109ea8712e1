"""TensorRT engines on the GPU, through the named-tensor API (TensorRT 8.5 and newer).

An engine file only runs on the TensorRT version and GPU model that built it,
and TensorRT says why not only through its logger: deserialization returns None
and logs e.g. "Version tag does not match". The logger here keeps those lines,
so a rejected file is reported with TensorRT's own reason.

Each CUDA stream that enqueues work gets its own execution context (a context
holds the activations of one batch in flight). With a dynamic batch axis each
concurrently used context needs its own optimization profile (TensorRT 8.5
enforces it), so engines are built with one identical profile per in-flight
slot; see ``appliance.engines.build``.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple

import numpy as np

from appliance import cuda
from appliance.engines.base import BatchSpec, Engine, EngineError, EngineIO, TensorSpec, assign_output_roles
from appliance.engines.manifest import Manifest

MIN_VERSION = (8, 5)
BACKENDS = ("auto", "onnxruntime", "tensorrt")

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


def make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps recent warnings and errors, numbered, for error messages."""

    class Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            severity = trt.ILogger.Severity
            self._kept = {severity.INTERNAL_ERROR, severity.ERROR, severity.WARNING}
            self._errors = {severity.INTERNAL_ERROR, severity.ERROR}
            self._messages: Deque[Tuple[int, Any, str]] = collections.deque(maxlen=50)
            self._count = 0

        def log(self, severity: Any, msg: str) -> None:
            if severity in self._kept:
                self._messages.append((self._count, severity, str(msg)))
                self._count += 1

        def mark(self) -> int:
            """A position in the log; :meth:`errors_since` reports what came after it."""
            return self._count

        def errors_since(self, mark: int) -> str:
            recent = [(s, m) for n, s, m in list(self._messages) if n >= mark]
            lines = [m for s, m in recent if s in self._errors] or [m for _, m in recent]
            return "; ".join(lines)

    return Logger()


class _Context:
    """An execution context bound to one stream (and, for a dynamic batch, one profile)."""

    def __init__(self, context: Any, profile: Optional[int], scratch: List[cuda.DeviceBuffer]) -> None:
        self.context = context
        self.profile = profile
        self.scratch = scratch  # device memory for outputs the pipeline has no role for
        self.batch = -1  # input shape last set


class TensorRtEngine(Engine):
    backend = "tensorrt"

    def __init__(self, path: str, sha256: str, manifest: Optional[Manifest], dynamic_batch: int) -> None:
        trt = import_tensorrt()
        usable, why = cuda.available()
        if not usable:
            raise EngineError("{}: TensorRT engines need a CUDA device: {}".format(path, why))
        self._trt = trt
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._deserialize(path)
        io, extra = self._read_io(path, manifest, dynamic_batch)
        super().__init__(path, io, sha256, manifest)
        self._input_name = io.input.name
        self._output_names = {role: spec.name for role, spec in io.outputs.items()}
        self._extra_outputs = extra  # name -> bytes per frame
        self._dynamic = not io.batch.fixed
        self._contexts: Dict[int, _Context] = {}
        self._free_profiles = list(range(self._engine.num_optimization_profiles)) if self._dynamic else []
        self._lock = threading.Lock()

    def _deserialize(self, path: str) -> Any:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise EngineError("{}: cannot read: {}".format(path, exc)) from exc
        mark = self._logger.mark()
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            reason = self._logger.errors_since(mark) or "no reason logged"
            raise EngineError(
                "{}: TensorRT {} cannot load this engine on {}: {} (engines only run on the TensorRT version "
                "and GPU model that built them: rebuild it from the ONNX here)".format(
                    path, self._trt.__version__, cuda.device_info().name, reason
                )
            )
        return engine

    # -- I/O -----------------------------------------------------------------------
    def _read_io(self, path: str, manifest: Optional[Manifest], dynamic_batch: int) -> Tuple[EngineIO, Dict[str, int]]:
        trt, engine = self._trt, self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if len(inputs) != 1:
            raise EngineError(
                "{}: engine has {} inputs ({}); expected exactly one image input".format(path, len(inputs), inputs)
            )
        input_spec, input_batch = self._tensor_spec(path, inputs[0])
        if np.dtype(input_spec.dtype) not in _INPUT_DTYPES:
            raise EngineError("{}: input {} is {}; expected float32 or float16".format(
                path, input_spec.name, np.dtype(input_spec.dtype).name))
        batch = self._batch_spec(path, inputs[0], input_batch, dynamic_batch)
        roles = assign_output_roles(outputs, manifest.outputs if manifest else None, path)
        output_specs = {role: self._tensor_spec(path, name)[0] for role, name in roles.items()}
        io = EngineIO(input=input_spec, outputs=output_specs, batch=batch)
        io.image_shape  # raises a clear error for a non-image input
        for role in output_specs:
            io.output_image_shape(role)
        extra = {}
        for name in outputs:
            if name not in roles.values():
                spec = self._tensor_spec(path, name)[0]
                extra[name] = int(np.prod(spec.frame_shape)) * np.dtype(spec.dtype).itemsize
        return io, extra

    def _tensor_spec(self, path: str, name: str) -> Tuple[TensorSpec, int]:
        engine = self._engine
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

    def _batch_spec(self, path: str, name: str, batch_dim: int, dynamic_batch: int) -> BatchSpec:
        if batch_dim > 0:
            return BatchSpec(fixed=True, size=batch_dim)
        engine = self._engine
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

    # -- execution ---------------------------------------------------------------------
    @property
    def runs_on_gpu(self) -> bool:
        return True

    def enqueue(self, input_ptr: int, output_ptrs: Mapping[str, int], batch: int, stream: int) -> None:
        mark = self._logger.mark()
        state = self._contexts.get(stream) or self._open_context(stream)
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
            raise EngineError("{}: execute_async_v3 failed: {}".format(self.name, self._log(mark)))

    def _open_context(self, stream: int) -> _Context:
        """A context for ``stream``; with a dynamic batch it takes a profile no other live context has."""
        mark = self._logger.mark()
        with self._lock:
            profile = None
            if self._dynamic:
                if not self._free_profiles:
                    raise EngineError(
                        "{}: all {} optimization profiles are in use: a dynamic-batch engine needs one profile "
                        "per in-flight slot (rebuild it with build-engine --profiles N, or lower "
                        "pipeline.in_flight)".format(self.name, self._engine.num_optimization_profiles)
                    )
                profile = self._free_profiles.pop(0)
            context = self._engine.create_execution_context()
            if context is None:
                if profile is not None:
                    self._free_profiles.insert(0, profile)
                raise EngineError("{}: cannot create an execution context: {}".format(self.name, self._log(mark)))
            if profile is not None and not context.set_optimization_profile_async(profile, stream):
                self._free_profiles.insert(0, profile)
                raise EngineError("{}: cannot select optimization profile {}: {}".format(
                    self.name, profile, self._log(mark)))
            scratch = [cuda.DeviceBuffer(self.io.batch.size * nbytes) for nbytes in self._extra_outputs.values()]
            state = _Context(context, profile, scratch)
            self._contexts[stream] = state
            return state

    def _close_context(self, stream: int) -> None:
        with self._lock:
            state = self._contexts.pop(stream)
            state.context = None  # destroys the TensorRT context, which frees its profile
            for buffer in state.scratch:
                buffer.close()
            if state.profile is not None:
                self._free_profiles.insert(0, state.profile)

    def _log(self, mark: int) -> str:
        return self._logger.errors_since(mark) or "TensorRT logged no reason"

    def run(self, frames: np.ndarray) -> Dict[str, np.ndarray]:
        """Synchronous inference for validation: its own stream, buffers and context, freed afterwards."""
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
            if stream.handle in self._contexts:
                self._close_context(stream.handle)
            for buffer in [device_in] + list(device_out.values()):
                buffer.close()
            stream.close()
        return {role: np.concatenate(parts) for role, parts in results.items()}

    def close(self) -> None:
        for stream in list(self._contexts):
            self._close_context(stream)
        self._engine = None
        self._runtime = None
