"""An engine stand-in for GPU checks: a CUDA kernel compiled with NVRTC behind the Engine interface.

The CUDA test machine has no TensorRT, so the GPU path (pinned ring, mapped
pointers, streams, events, overlap) is exercised with this instead: it enqueues
a known elementwise transform on the given stream exactly where a TensorRT
engine would, phase = scale * x + offset and amplitude = x * x, after spinning
for a set time to stand for a network's compute. Test and benchmark code only:
it imports cuda-python directly, which the appliance itself leaves to
``appliance.cuda``.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from appliance import cuda
from appliance.engines.base import BatchSpec, Engine, EngineIO, TensorSpec
from appliance.engines.manifest import AMPLITUDE, PHASE

SOURCE = r"""
static __device__ long long cycles()  /* the SM clock, read without any header */
{
    long long now;
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(now));
    return now;
}

extern "C" __global__ void standin_f32(const float* x, float* phase, float* amplitude, long long n,
                                       float scale, float offset, long long spin)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (spin > 0) {
        long long start = cycles();
        while (cycles() - start < spin) { }
    }
    if (i < n) {
        float v = x[i];
        phase[i] = v * scale + offset;
        amplitude[i] = v * v;
    }
}

extern "C" __global__ void standin_f16(const unsigned short* x, float* phase, float* amplitude, long long n,
                                       float scale, float offset, long long spin)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (spin > 0) {
        long long start = cycles();
        while (cycles() - start < spin) { }
    }
    if (i < n) {
        float v;
        asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(x[i]));
        phase[i] = v * scale + offset;
        amplitude[i] = v * v;
    }
}
"""
_ARG_TYPES = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_float, ctypes.c_float,
              ctypes.c_longlong)
BLOCK = 256


def _modules() -> Tuple[Any, Any, Any]:
    """(driver, nvrtc, runtime) of whichever cuda-python layout is installed."""
    try:
        from cuda.bindings import driver, nvrtc, runtime
    except ImportError:
        from cuda import cuda as driver  # type: ignore[no-redef]
        from cuda import cudart as runtime
        from cuda import nvrtc
    return driver, nvrtc, runtime


def _check(call: str, result: Tuple[Any, ...]) -> Any:
    if result[0].value != 0:
        raise RuntimeError("{} failed: {}".format(call, result[0]))
    return result[1] if len(result) == 2 else result[1:]


def compile_cubin(compute_capability: Tuple[int, int]) -> bytes:
    """The stand-in kernels as machine code for one GPU architecture (NVRTC needs no GPU for this)."""
    nvrtc = _modules()[1]
    program = _check("nvrtcCreateProgram", nvrtc.nvrtcCreateProgram(SOURCE.encode(), b"standin.cu", 0, [], []))
    options = ["--gpu-architecture=sm_{}{}".format(*compute_capability).encode()]
    result = nvrtc.nvrtcCompileProgram(program, len(options), options)
    if result[0].value != 0:
        size = _check("nvrtcGetProgramLogSize", nvrtc.nvrtcGetProgramLogSize(program))
        log = b" " * size
        _check("nvrtcGetProgramLog", nvrtc.nvrtcGetProgramLog(program, log))
        raise RuntimeError("NVRTC could not compile the stand-in kernel:\n" + log.decode(errors="replace"))
    size = _check("nvrtcGetCUBINSize", nvrtc.nvrtcGetCUBINSize(program))
    cubin = b" " * size
    _check("nvrtcGetCUBIN", nvrtc.nvrtcGetCUBIN(program, cubin))
    _check("nvrtcDestroyProgram", nvrtc.nvrtcDestroyProgram(program))
    return cubin


@functools.lru_cache(maxsize=None)
def _kernels() -> Tuple[Any, Dict[str, Any]]:
    """Compiled and loaded once per process: (the primary context, kernel name -> CUfunction)."""
    driver, _, runtime = _modules()
    _check("cudaFree(0)", runtime.cudaFree(0))  # makes the primary context current for the driver calls
    context = _check("cuCtxGetCurrent", driver.cuCtxGetCurrent())
    cubin = compile_cubin(cuda.device_info().compute_capability)
    module = _check("cuModuleLoadData", driver.cuModuleLoadData(cubin))
    return context, {name: _check("cuModuleGetFunction", driver.cuModuleGetFunction(module, name.encode()))
                     for name in ("standin_f32", "standin_f16")}


@functools.lru_cache(maxsize=None)
def clock_cycles_per_us() -> float:
    """The SM clock as clock64() counts it, measured: the spin is set in microseconds."""
    probe = NvrtcEngine(size=16, batch=BatchSpec(False, 1))
    stream, start, end = cuda.Stream(), cuda.Event(timing=True), cuda.Event(timing=True)
    buffers = [cuda.DeviceBuffer(16 * 16 * 4) for _ in range(3)]
    cycles = 20_000_000
    try:
        probe.launch(buffers[0].ptr, buffers[1].ptr, buffers[2].ptr, 1, stream.handle, cycles)  # warm-up
        start.record(stream)
        probe.launch(buffers[0].ptr, buffers[1].ptr, buffers[2].ptr, 1, stream.handle, cycles)
        end.record(stream)
        end.synchronize()
        return cycles / (end.elapsed_ms(start) * 1e3)
    finally:
        for resource in buffers + [start, end, stream]:
            resource.close()


class NvrtcEngine(Engine):
    backend = "nvrtc-standin"

    def __init__(self, size: int = 128, batch: BatchSpec = BatchSpec(False, 8), dtype: Any = np.float32,
                 scale: float = 2.0, offset: float = 1.0, spin_us: float = 0.0) -> None:
        frame = (1, size, size)
        io = EngineIO(
            input=TensorSpec("x", frame, np.dtype(dtype)),
            outputs={PHASE: TensorSpec("phase", frame, np.dtype(np.float32)),
                     AMPLITUDE: TensorSpec("amplitude", frame, np.dtype(np.float32))},
            batch=batch,
        )
        super().__init__("standin-{}x{}.nvrtc".format(size, size), io, "0" * 64)
        self.scale, self.offset = scale, offset
        self._context, kernels = _kernels()
        self._kernel = kernels["standin_f16" if np.dtype(dtype) == np.float16 else "standin_f32"]
        self.spin_cycles = int(spin_us * clock_cycles_per_us()) if spin_us > 0 else 0

    @property
    def runs_on_gpu(self) -> bool:
        return True

    def expected(self, frames: np.ndarray) -> Dict[str, np.ndarray]:
        x = frames.astype(np.float32)
        return {PHASE: x * np.float32(self.scale) + np.float32(self.offset), AMPLITUDE: x * x}

    def enqueue(self, input_ptr: int, output_ptrs: Mapping[str, int], batch: int, stream: int) -> None:
        self.launch(input_ptr, output_ptrs[PHASE], output_ptrs[AMPLITUDE], batch, stream, self.spin_cycles)

    def launch(self, x: int, phase: int, amplitude: int, batch: int, stream: int, spin: int) -> None:
        driver = _modules()[0]
        n = batch * int(np.prod(self.io.input.frame_shape))
        args = ((x, phase, amplitude, n, self.scale, self.offset, spin), _ARG_TYPES)
        grid = (n + BLOCK - 1) // BLOCK
        # The driver API needs the context current on this thread (the pipeline's), which no runtime
        # call may have done yet there: on an integrated GPU no copy precedes the launch.
        _check("cuCtxSetCurrent", driver.cuCtxSetCurrent(self._context))
        launch = driver.cuLaunchKernel(self._kernel, grid, 1, 1, BLOCK, 1, 1, 0, driver.CUstream(stream), args, 0)
        _check("cuLaunchKernel", launch)

    def run(self, frames: np.ndarray) -> Dict[str, np.ndarray]:
        frames = np.ascontiguousarray(frames, dtype=self.io.input.dtype)
        count = len(frames)
        stream = cuda.Stream()
        buffers = {"x": cuda.DeviceBuffer(frames.nbytes)}
        buffers.update({role: cuda.DeviceBuffer(count * frames[0].size * 4) for role in (PHASE, AMPLITUDE)})
        results = {role: np.empty((count,) + self.io.output_image_shape(role), np.float32) for role in (PHASE, AMPLITUDE)}
        try:
            cuda.copy_host_to_device(buffers["x"].ptr, frames.ctypes.data, frames.nbytes, stream)
            self.launch(buffers["x"].ptr, buffers[PHASE].ptr, buffers[AMPLITUDE].ptr, count, stream.handle, 0)
            for role, out in results.items():
                cuda.copy_device_to_host(out.ctypes.data, buffers[role].ptr, out.nbytes, stream)
            stream.synchronize()
        finally:
            for buffer in buffers.values():
                buffer.close()
            stream.close()
        return results
