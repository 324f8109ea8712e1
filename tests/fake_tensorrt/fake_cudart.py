"""FAKE cuda-python runtime (``cudart``) for CPU-only machines. Not NVIDIA's code.

It follows cuda-python's calling convention (every call returns a tuple whose
first element is a ``cudaError_t``) for the calls ``appliance.cuda`` makes, and
behaves like a GPU where it matters for correctness:

- device memory lives at addresses no host code can dereference, so a host
  pointer passed where a device pointer belongs (or the reverse) fails;
- mapped pinned memory has a device alias that reads the same bytes;
- work queued on a stream runs later, not at the call: only event queries,
  event/stream synchronization make it progress, and a query that finds work
  pending returns ``cudaErrorNotReady`` (so "done" can never be assumed);
- work can be given a gate (:func:`launch`): it stands for a kernel still
  computing until the gate opens, however often the stream is asked;
- ``cudaEventSynchronize`` holds the GIL while it waits, as cuda-python 11.8 and
  12.x call it (no ``nogil``): no other Python thread runs meanwhile. Stream and
  device synchronization release it, as those bindings do;
- allocations are aligned as CUDA's are (at least 256 bytes; pinned host memory
  by the page);
- bounds are checked on every copy and kernel access.

Each install loads this file as a fresh module, so its state is per test.
"""
import collections
import ctypes
import enum
import time

import numpy as np


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevicePointer = 17
    cudaErrorInvalidMemcpyDirection = 21
    cudaErrorSetOnActiveProcess = 36
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600
    cudaErrorLaunchTimeout = 702


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaDeviceAttr(enum.IntEnum):
    cudaDevAttrIntegrated = 18
    cudaDevAttrCanMapHostMemory = 19
    cudaDevAttrComputeCapabilityMajor = 75
    cudaDevAttrComputeCapabilityMinor = 76


cudaHostAllocPortable = 1
cudaHostAllocMapped = 2
cudaStreamNonBlocking = 1
cudaEventDefault = 0
cudaEventDisableTiming = 2
cudaDeviceMapHost = 8

OK = cudaError_t.cudaSuccess
DEVICE_BASE = 0x4000_0000_0000_0000  # non-canonical on x86-64 and aarch64: dereferencing it faults
PAGE = 4096  # cudaHostAlloc hands out whole pages
# How long a wait may find its work gated before it gives up with cudaErrorLaunchTimeout. With the
# GIL held (cudaEventSynchronize) a gate that a Python thread opens cannot open: a real GPU would
# finish, the fake reports the starved thread instead of hanging the test.
GATE_LIMIT_S = 2.0
_HOLDING_GIL = ctypes.PyDLL(None)  # calls through it keep the GIL, as a binding without nogil does

# What the fake GPU is; tests change these through fake_tensorrt.FakeGpu.
device = {"name": "Fake GPU", "major": 8, "minor": 6, "integrated": False, "count": 1}
failures = {}  # call name -> cudaError_t returned once by that call
calls = collections.Counter()


class cudaStream_t:
    def __init__(self, handle):
        self._handle = handle

    def __int__(self):
        return self._handle


class cudaEvent_t:
    def __init__(self, handle):
        self._handle = handle

    def __int__(self):
        return self._handle


class _Props:
    def __init__(self):
        self.name = device["name"].encode() + b"\0" * 8  # C char[256]: NUL padded
        self.major = device["major"]
        self.minor = device["minor"]
        self.integrated = int(device["integrated"])
        self.canMapHostMemory = 1


class _Event:
    def __init__(self, timing):
        self.timing = timing
        self.stream = None
        self.token = None  # which record is outstanding
        self.completed = None
        self.time_ms = None


_device_regions = []  # [base, size, backing uint8 array]
_host_allocs = {}  # host ptr -> _HostAlloc
_next_device = [DEVICE_BASE]
_streams = {0: collections.deque()}
_events = {}
_handles = [0]
_clock_ms = [0.0]
_state = {"context_active": False}


def _fail(name):
    calls[name] += 1
    return failures.pop(name, None)


def _new_handle():
    _handles[0] += 1
    return _handles[0]


# -- memory ----------------------------------------------------------------------------
def _device_region(ptr, nbytes):
    for base, size, backing in _device_regions:
        if base <= ptr and ptr + nbytes <= base + size:
            return backing[ptr - base : ptr - base + nbytes]
    return None


def device_view(ptr, nbytes):
    """The bytes behind a device address (for the fake TensorRT's kernels); ValueError if out of bounds."""
    view = _device_region(int(ptr), int(nbytes))
    if view is None:
        raise ValueError("fake CUDA: {:#x}+{} is not inside any device allocation".format(int(ptr), nbytes))
    return view


def _host_view(ptr, nbytes):
    if ptr >= DEVICE_BASE:
        raise ValueError("fake CUDA: {:#x} is a device address used as a host pointer".format(ptr))
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))


def _allocate_device(nbytes, backing=None):
    base = _next_device[0]
    _next_device[0] += (nbytes + 0xFFFF) & ~0xFFFF
    if backing is None:
        backing = np.full(nbytes, 0xA5, dtype=np.uint8)  # cudaMalloc memory is not zeroed
    _device_regions.append([base, nbytes, backing])
    _state["context_active"] = True
    return base


def cudaMalloc(nbytes):
    error = _fail("cudaMalloc")
    if error:
        return error, 0
    return OK, _allocate_device(int(nbytes))


def cudaFree(ptr):
    for region in _device_regions:
        if region[0] == int(ptr):
            _device_regions.remove(region)
            return (OK,)
    return (cudaError_t.cudaErrorInvalidDevicePointer,)


class _HostAlloc:
    """Pinned host memory: a page-aligned window of a ctypes buffer, and whether it is mapped."""

    def __init__(self, nbytes, mapped):
        self.raw = (ctypes.c_uint8 * (nbytes + PAGE))()
        self.ptr = -(-ctypes.addressof(self.raw) // PAGE) * PAGE
        self.backing = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(self.ptr))
        self.mapped = mapped


def cudaHostAlloc(nbytes, flags):
    error = _fail("cudaHostAlloc")
    if error:
        return error, 0
    alloc = _HostAlloc(int(nbytes), bool(flags & cudaHostAllocMapped))
    _host_allocs[alloc.ptr] = alloc
    _state["context_active"] = True
    return OK, alloc.ptr


def cudaHostGetDevicePointer(host_ptr, flags):
    alloc = _host_allocs.get(int(host_ptr))
    if alloc is None or not alloc.mapped:
        return cudaError_t.cudaErrorInvalidValue, 0
    for base, size, existing in _device_regions:
        if existing is alloc.backing:
            return OK, base
    return OK, _allocate_device(len(alloc.backing), alloc.backing)


def cudaFreeHost(ptr):
    alloc = _host_allocs.pop(int(ptr), None)
    if alloc is None:
        return (cudaError_t.cudaErrorInvalidValue,)
    _device_regions[:] = [r for r in _device_regions if r[2] is not alloc.backing]
    return (OK,)


def live_allocations():
    """(device allocations, pinned host allocations) still held: for leak checks."""
    aliases = sum(1 for r in _device_regions if any(r[2] is a.backing for a in _host_allocs.values()))
    return len(_device_regions) - aliases, len(_host_allocs)


# -- streams, events and queued work -----------------------------------------------------
def cudaStreamCreateWithFlags(flags):
    handle = _new_handle()
    _streams[handle] = collections.deque()
    return OK, cudaStream_t(handle)


def cudaStreamDestroy(stream):
    queue = _streams.pop(int(stream), None)
    if queue is None:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    while queue:
        queue.popleft().run()
    return (OK,)


class _Work:
    """One operation queued on a stream; ``gate`` (anything with ``is_set()``) holds it back."""

    def __init__(self, run, gate=None):
        self.run = run
        self.gate = gate

    def ready(self):
        return self.gate is None or self.gate.is_set()


def _queue(stream):
    return _streams.get(int(stream) if stream is not None else 0)


def launch(stream, work, gate=None):
    """Queue ``work`` (a callable) on ``stream`` as a kernel would be: it runs when the stream progresses.

    With a ``gate`` (a threading.Event, or any object with ``is_set()``) the kernel
    is still computing until the gate opens: queries answer cudaErrorNotReady and
    synchronization waits (see :data:`GATE_LIMIT_S`).
    """
    queue = _queue(stream)
    if queue is None:
        raise ValueError("fake CUDA: unknown stream {}".format(int(stream)))
    queue.append(_Work(work, gate))


def _step(queue):
    """Run the next operation on ``queue`` if its gate is open; False when it is still computing."""
    if not queue[0].ready():
        return False
    work = queue.popleft()
    _clock_ms[0] += 0.01
    work.run()
    return True


def _wait_releasing_gil(queue, finished):
    """Run ``queue`` until ``finished()``, sleeping (without the GIL) while its head is gated."""
    limit = time.monotonic() + GATE_LIMIT_S
    while not finished():
        if not _step(queue):
            if time.monotonic() > limit:
                return (cudaError_t.cudaErrorLaunchTimeout,)
            time.sleep(0.0001)
    return (OK,)


def cudaStreamSynchronize(stream):
    queue = _queue(stream)
    if queue is None:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    return _wait_releasing_gil(queue, lambda: not queue)


def cudaDeviceSynchronize():
    for queue in list(_streams.values()):
        result = _wait_releasing_gil(queue, lambda: not queue)
        if result[0] != OK:
            return result
    return (OK,)


def cudaEventCreateWithFlags(flags):
    handle = _new_handle()
    _events[handle] = _Event(timing=not (flags & cudaEventDisableTiming))
    return OK, cudaEvent_t(handle)


def cudaEventDestroy(event):
    return (OK,) if _events.pop(int(event), None) else (cudaError_t.cudaErrorInvalidResourceHandle,)


def cudaEventRecord(event, stream):
    state = _events.get(int(event))
    queue = _queue(stream)
    if state is None or queue is None:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    token = _new_handle()
    state.stream, state.token = queue, token

    def complete():
        state.completed = token
        state.time_ms = _clock_ms[0]

    queue.append(_Work(complete))
    return (OK,)


def cudaEventQuery(event):
    state = _events.get(int(event))
    if state is None:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    if state.token is None or state.completed == state.token:
        return (OK,)
    _step(state.stream)  # the GPU moves on a little each time someone looks
    return (cudaError_t.cudaErrorNotReady,)


def cudaEventSynchronize(event):
    """Waits as cuda-python 11.8 and 12.x do: in one C call that keeps the GIL."""
    state = _events.get(int(event))
    if state is None:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    while state.token is not None and state.completed != state.token:
        if not _step(state.stream):
            _HOLDING_GIL.usleep(int(GATE_LIMIT_S * 1e6))  # no Python thread runs meanwhile
            if not state.stream[0].ready():
                return (cudaError_t.cudaErrorLaunchTimeout,)
    return (OK,)


def cudaEventElapsedTime(start, end):
    first, second = _events.get(int(start)), _events.get(int(end))
    if first is None or second is None or not (first.timing and second.timing):
        return cudaError_t.cudaErrorInvalidResourceHandle, 0.0
    if first.completed is None or second.completed is None:
        return cudaError_t.cudaErrorNotReady, 0.0
    return OK, second.time_ms - first.time_ms


# -- copies ------------------------------------------------------------------------------
def cudaMemcpyAsync(dst, src, nbytes, kind, stream):
    error = _fail("cudaMemcpyAsync")
    if error:
        return (error,)
    dst, src, nbytes = int(dst), int(src), int(nbytes)
    if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
        target, source = _device_region(dst, nbytes), (_host_view(src, nbytes) if src < DEVICE_BASE else None)
    elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
        target, source = (_host_view(dst, nbytes) if dst < DEVICE_BASE else None), _device_region(src, nbytes)
    else:
        return (cudaError_t.cudaErrorInvalidMemcpyDirection,)
    if target is None or source is None:
        return (cudaError_t.cudaErrorInvalidValue,)
    queue = _queue(stream)
    if queue is None:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    queue.append(_Work(lambda: np.copyto(target, source)))
    return (OK,)


def cudaMemsetAsync(dst, value, nbytes, stream):
    target = _device_region(int(dst), int(nbytes))
    queue = _queue(stream)
    if target is None or queue is None:
        return (cudaError_t.cudaErrorInvalidValue,)
    queue.append(_Work(lambda: target.fill(value)))
    return (OK,)


# -- device --------------------------------------------------------------------------------
def cudaGetDeviceCount():
    if not device["count"]:
        return cudaError_t.cudaErrorNoDevice, 0
    return OK, device["count"]


def cudaGetDeviceProperties(index):
    return OK, _Props()


def cudaDeviceGetAttribute(attribute, index):
    values = {
        cudaDeviceAttr.cudaDevAttrIntegrated: int(device["integrated"]),
        cudaDeviceAttr.cudaDevAttrCanMapHostMemory: 1,
        cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor: device["major"],
        cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor: device["minor"],
    }
    return OK, values[attribute]


def cudaSetDeviceFlags(flags):
    if not device["count"]:
        return (cudaError_t.cudaErrorNoDevice,)
    if _state["context_active"]:
        return (cudaError_t.cudaErrorSetOnActiveProcess,)
    return (OK,)


def cudaGetErrorName(error):
    return OK, cudaError_t(error).name.encode()


def cudaGetErrorString(error):
    return OK, "fake CUDA error {}".format(int(error)).encode()
