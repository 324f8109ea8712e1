"""The CUDA runtime, as far as the appliance needs it: memory, streams, events, copies.

This is the only module that imports cuda-python. Its module layout changed
between releases: 12.6.1+ and 13.x have ``cuda.bindings.runtime``, while 11.8
(the newest wheel for Python 3.8 on aarch64, i.e. a Jetson on JetPack 5) only
has ``cuda.cudart``. Both return ``(error, value...)`` tuples; every call here
is checked and a failure raises :class:`CudaError` naming the call, so a CUDA
problem reads as "cudaHostAlloc(1048576 bytes): cudaErrorMemoryAllocation ..."
instead of a bare enum further down the line.

The module is loaded on first use, so importing this file never needs a GPU;
:func:`available` answers "can CUDA be used here, and if not why" without raising.
"""
from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import numpy as np

_DEVICE = 0  # the appliance uses one GPU; CUDA_VISIBLE_DEVICES picks which
POLL_S = 0.00025  # waiting for an event: the pause between two queries, i.e. how late completion is seen


class CudaError(RuntimeError):
    """A CUDA call failed, or CUDA cannot be used at all; the message names the call."""


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: Tuple[int, int]
    integrated: bool  # shares DRAM with the CPU (Jetson): mapped pinned memory needs no copy
    can_map_host_memory: bool

    def describe(self) -> str:
        return "{} (compute capability {}.{}, {})".format(
            self.name, self.compute_capability[0], self.compute_capability[1],
            "integrated" if self.integrated else "discrete",
        )


class _Runtime:
    """The loaded runtime module and the few things derived from it once."""

    def __init__(self, module: Any, native_handle: Callable[[Any], int], layout: str) -> None:
        self.module = module
        self.native_handle = native_handle
        self.layout = layout
        self.success = module.cudaError_t.cudaSuccess
        self.not_ready = module.cudaError_t.cudaErrorNotReady
        self._info: Optional[DeviceInfo] = None
        self._info_lock = threading.Lock()

    def info(self) -> DeviceInfo:
        with self._info_lock:
            if self._info is None:
                self._info = _read_device_info(self)
            return self._info


_RUNTIME: Optional[_Runtime] = None
_LOAD_LOCK = threading.Lock()


def _import_runtime() -> _Runtime:
    """The runtime module of whichever cuda-python layout is installed."""
    try:
        from cuda.bindings import runtime as module  # 12.6.1+ and 13.x
    except ImportError:
        try:
            from cuda import cudart as module  # 11.8.x, older 12.x
        except ImportError as exc:
            raise CudaError(
                "cuda-python is not installed (neither cuda.bindings.runtime nor cuda.cudart imports): {}".format(exc)
            ) from exc
        return _Runtime(module, int, "cuda.cudart")
    try:
        # 13.x deprecates int(handle) in favour of this accessor.
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return _Runtime(module, int, "cuda.bindings.runtime")
    return _Runtime(module, lambda obj: int(get_cuda_native_handle(obj)), "cuda.bindings.runtime")


def _runtime() -> _Runtime:
    global _RUNTIME
    if _RUNTIME is not None:  # every CUDA call passes here: no lock once loaded
        return _RUNTIME
    with _LOAD_LOCK:
        if _RUNTIME is None:
            runtime = _import_runtime()
            _enable_mapped_memory(runtime)
            _RUNTIME = runtime
        return _RUNTIME


def _enable_mapped_memory(runtime: _Runtime) -> None:
    """Mapped pinned memory needs cudaDeviceMapHost before the context exists (implied on 64-bit UVA systems)."""
    rt = runtime.module
    result = rt.cudaSetDeviceFlags(rt.cudaDeviceMapHost)
    if result[0] not in (runtime.success, rt.cudaError_t.cudaErrorSetOnActiveProcess):
        _raise(runtime, "cudaSetDeviceFlags(cudaDeviceMapHost)", result[0])


def _raise(runtime: _Runtime, call: str, error: Any) -> None:
    rt = runtime.module
    name = _text(rt.cudaGetErrorName(error))
    meaning = _text(rt.cudaGetErrorString(error))
    raise CudaError("{}: {} ({})".format(call, name or error, meaning or "no description"))


def _text(result: Tuple[Any, ...]) -> str:
    value = result[1] if len(result) > 1 else b""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _call(call: str, result: Tuple[Any, ...]) -> Any:
    """The value(s) of a cuda-python result tuple, or CudaError naming ``call``."""
    runtime = _runtime()
    if result[0] != runtime.success:
        _raise(runtime, call, result[0])
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


def _rt() -> Any:
    return _runtime().module


# -- device -------------------------------------------------------------------------
def available() -> Tuple[bool, str]:
    """(True, device description) when CUDA works here, else (False, why); never raises."""
    try:
        rt = _rt()
        count = _call("cudaGetDeviceCount()", rt.cudaGetDeviceCount())
        if not count:
            return False, "CUDA runtime loaded but no CUDA device is visible"
        return True, device_info().describe()
    except CudaError as exc:
        return False, str(exc)
    except Exception as exc:  # a broken driver install raises from inside cuda-python
        return False, "CUDA unusable: {}: {}".format(type(exc).__name__, exc)


def device_info() -> DeviceInfo:
    return _runtime().info()


def _read_device_info(runtime: _Runtime) -> DeviceInfo:
    rt = runtime.module
    attr = rt.cudaDeviceAttr

    def attribute(name: str) -> int:
        result = rt.cudaDeviceGetAttribute(getattr(attr, name), _DEVICE)
        return int(_call("cudaDeviceGetAttribute({})".format(name), result))

    props = _call("cudaGetDeviceProperties({})".format(_DEVICE), rt.cudaGetDeviceProperties(_DEVICE))
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode("utf-8", "replace")
    return DeviceInfo(
        name=str(name).strip(),
        compute_capability=(
            attribute("cudaDevAttrComputeCapabilityMajor"), attribute("cudaDevAttrComputeCapabilityMinor")
        ),
        integrated=bool(attribute("cudaDevAttrIntegrated")),
        can_map_host_memory=bool(attribute("cudaDevAttrCanMapHostMemory")),
    )


def runtime_layout() -> str:
    """Which cuda-python module layout was loaded (for logs and the GPU check's report)."""
    return _runtime().layout


# -- memory ---------------------------------------------------------------------------
def _host_view(ptr: int, nbytes: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))


class PinnedBuffer:
    """Page-locked host memory with the attributes of :class:`appliance.ring.HostBuffer`.

    Pinned memory is what lets a copy run asynchronously on a stream. With
    ``mapped`` (the default on an integrated GPU) the buffer also has a device
    pointer through which kernels read it in place: on a Jetson that replaces
    the host-to-device copy altogether. On a discrete GPU ``device_ptr`` stays
    None unless ``mapped=True`` is asked for (zero-copy over PCIe: for tests).
    """

    def __init__(self, nbytes: int, mapped: Optional[bool] = None) -> None:
        rt = _rt()
        if mapped is None:
            mapped = device_info().integrated
        self.nbytes = int(nbytes)
        flags = rt.cudaHostAllocPortable | rt.cudaHostAllocMapped
        self.host_ptr: int = int(
            _call("cudaHostAlloc({} bytes)".format(self.nbytes), rt.cudaHostAlloc(max(self.nbytes, 1), flags))
        )
        self.device_ptr: Optional[int] = None
        try:
            if mapped:
                self.device_ptr = int(_call("cudaHostGetDevicePointer", rt.cudaHostGetDevicePointer(self.host_ptr, 0)))
            self.array = _host_view(self.host_ptr, self.nbytes)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Free the memory; the caller must have dropped every view of ``array`` and finished every copy."""
        if self.host_ptr:
            ptr, self.host_ptr, self.device_ptr = self.host_ptr, 0, None
            _call("cudaFreeHost", _rt().cudaFreeHost(ptr))


class DeviceBuffer:
    """Device memory (cudaMalloc); ``ptr`` is what copies and engines take."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr: int = int(_call("cudaMalloc({} bytes)".format(self.nbytes), _rt().cudaMalloc(max(self.nbytes, 1))))

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            _call("cudaFree", _rt().cudaFree(ptr))


# -- streams and events ---------------------------------------------------------------
class Stream:
    """A non-blocking stream: it never waits for the legacy default stream."""

    def __init__(self) -> None:
        rt = _rt()
        self.native = _call("cudaStreamCreateWithFlags", rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
        self.handle: int = _runtime().native_handle(self.native)

    def synchronize(self) -> None:
        _call("cudaStreamSynchronize", _rt().cudaStreamSynchronize(self.native))

    def close(self) -> None:
        if self.native is not None:
            native, self.native = self.native, None
            _call("cudaStreamDestroy", _rt().cudaStreamDestroy(native))


class Event:
    """Completion marker on a stream. ``timing=False`` (the default) makes record and query cheapest."""

    def __init__(self, timing: bool = False) -> None:
        rt = _rt()
        flags = rt.cudaEventDefault if timing else rt.cudaEventDisableTiming
        self.native = _call("cudaEventCreateWithFlags", rt.cudaEventCreateWithFlags(flags))

    def record(self, stream: Stream) -> None:
        _call("cudaEventRecord", _rt().cudaEventRecord(self.native, stream.native))

    def query(self) -> bool:
        """True once all work before the last record has finished (or nothing was recorded); never blocks."""
        runtime = _runtime()
        result = runtime.module.cudaEventQuery(self.native)
        if result[0] == runtime.not_ready:
            return False
        _call("cudaEventQuery", result)
        return True

    def synchronize(self, poll_s: float = POLL_S) -> None:
        """Block until :meth:`query` is true, leaving the GIL to other threads meanwhile.

        Not cudaEventSynchronize: cuda-python 11.8 and 12.x call it without
        releasing the GIL, so ingest, status and publishing would all stop while
        the GPU works. A query returns at once and the sleep between two releases
        the GIL; completion is noticed at most ``poll_s`` late.
        """
        while not self.query():
            time.sleep(poll_s)

    def elapsed_ms(self, start: "Event") -> float:
        """Milliseconds from ``start`` to this event; both must be timing events that completed."""
        return float(_call("cudaEventElapsedTime", _rt().cudaEventElapsedTime(start.native, self.native)))

    def close(self) -> None:
        if self.native is not None:
            native, self.native = self.native, None
            _call("cudaEventDestroy", _rt().cudaEventDestroy(native))


# -- copies -----------------------------------------------------------------------------
def copy_host_to_device(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    """Queue a copy; asynchronous only when ``src`` is pinned (pageable memory is staged by the driver)."""
    rt = _rt()
    _call(
        "cudaMemcpyAsync(host->device, {} bytes)".format(nbytes),
        rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.native),
    )


def copy_device_to_host(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    rt = _rt()
    _call(
        "cudaMemcpyAsync(device->host, {} bytes)".format(nbytes),
        rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.native),
    )


def memset(dst: int, value: int, nbytes: int, stream: Stream) -> None:
    _call("cudaMemsetAsync({} bytes)".format(nbytes), _rt().cudaMemsetAsync(dst, value, nbytes, stream.native))
