"""appliance.cuda against the FAKE cuda-python runtime (tests/fake_tensorrt): layouts, errors, memory, events."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from appliance import cuda

import fake_tensorrt


@pytest.fixture
def cudart(monkeypatch):
    return fake_tensorrt.install_cuda(monkeypatch)


@pytest.mark.parametrize("layout", ["cuda.bindings.runtime", "cuda.cudart"])
def test_either_module_layout_is_loaded(monkeypatch, layout):
    fake_tensorrt.install_cuda(monkeypatch, layout=layout, name="Fake Xavier", integrated=True, compute=(7, 2))
    assert cuda.available() == (True, "Fake Xavier (compute capability 7.2, integrated)")
    assert cuda.runtime_layout() == layout


def test_new_layout_wins_when_both_are_installed(monkeypatch):
    cudart = fake_tensorrt.install_cuda(monkeypatch, layout="cuda.bindings.runtime")
    monkeypatch.setitem(sys.modules, "cuda.cudart", cudart)
    monkeypatch.setattr(sys.modules["cuda"], "cudart", cudart, raising=False)
    assert cuda.runtime_layout() == "cuda.bindings.runtime"


def test_without_cuda_python_nothing_raises_until_memory_is_asked_for(monkeypatch):
    fake_tensorrt.remove_cuda(monkeypatch)
    usable, why = cuda.available()
    assert not usable
    assert "cuda-python is not installed" in why
    with pytest.raises(cuda.CudaError, match="cuda-python is not installed"):
        cuda.PinnedBuffer(1024)


def test_without_a_device_available_says_why(monkeypatch):
    fake_tensorrt.install_cuda(monkeypatch, count=0)
    usable, why = cuda.available()
    assert not usable
    assert "cudaSetDeviceFlags" in why and "cudaErrorNoDevice" in why


def test_every_failure_names_the_call_and_the_error(cudart):
    cudart.failures["cudaMalloc"] = cudart.cudaError_t.cudaErrorMemoryAllocation
    with pytest.raises(cuda.CudaError) as raised:
        cuda.DeviceBuffer(1 << 20)
    assert "cudaMalloc(1048576 bytes)" in str(raised.value)
    assert "cudaErrorMemoryAllocation" in str(raised.value)


def test_device_flags_already_set_by_an_active_context_are_accepted(monkeypatch, cudart):
    buffer = cuda.DeviceBuffer(16)  # the context is active now
    monkeypatch.setattr(cuda, "_RUNTIME", None)  # a second load meets cudaErrorSetOnActiveProcess
    assert cuda.available()[0]
    buffer.close()


def test_device_name_drops_the_nul_padding(monkeypatch):
    fake_tensorrt.install_cuda(monkeypatch, name="Xavier", integrated=True, compute=(7, 2))
    info = cuda.device_info()
    assert info == cuda.DeviceInfo("Xavier", (7, 2), integrated=True, can_map_host_memory=True)


@pytest.mark.parametrize("integrated", [False, True])
def test_pinned_memory_is_mapped_only_on_integrated_gpus(monkeypatch, integrated):
    cudart = fake_tensorrt.install_cuda(monkeypatch, integrated=integrated)
    buffer = cuda.PinnedBuffer(4096)
    assert buffer.array.dtype == np.uint8 and buffer.array.shape == (4096,)
    assert buffer.host_ptr == buffer.array.ctypes.data
    assert (buffer.device_ptr is not None) == integrated
    if integrated:
        buffer.array[:4] = [1, 2, 3, 4]
        assert list(cudart.device_view(buffer.device_ptr, 4)) == [1, 2, 3, 4]  # same bytes, no copy
    buffer.close()
    assert cudart.live_allocations() == (0, 0)


def test_mapping_can_be_forced_on_a_discrete_gpu(cudart):
    buffer = cuda.PinnedBuffer(64, mapped=True)
    assert buffer.device_ptr is not None
    buffer.close()
    buffer.close()  # idempotent
    assert cudart.live_allocations() == (0, 0)


def test_copies_run_on_the_stream_and_the_event_says_when(cudart):
    stream = cuda.Stream()
    event = cuda.Event()
    source = cuda.PinnedBuffer(256)
    target = cuda.PinnedBuffer(256)
    device = cuda.DeviceBuffer(256)
    source.array[:] = np.arange(256)
    cuda.copy_host_to_device(device.ptr, source.host_ptr, 256, stream)
    cuda.memset(device.ptr + 128, 7, 128, stream)
    cuda.copy_device_to_host(target.host_ptr, device.ptr, 256, stream)
    event.record(stream)
    assert not event.query()  # queued, not done: query never waits
    assert not target.array.any()
    event.synchronize()
    assert event.query()
    np.testing.assert_array_equal(target.array[:128], np.arange(128))
    assert (target.array[128:] == 7).all()
    for resource in (source, target, device, event, stream):
        resource.close()
    assert cudart.live_allocations() == (0, 0)


def test_a_host_pointer_is_no_device_pointer(cudart):
    stream = cuda.Stream()
    host = cuda.PinnedBuffer(64)
    with pytest.raises(cuda.CudaError, match=r"cudaMemcpyAsync\(host->device, 64 bytes\).*cudaErrorInvalidValue"):
        cuda.copy_host_to_device(host.host_ptr, host.host_ptr, 64, stream)


def test_timing_events_measure_between_marks(cudart):
    stream = cuda.Stream()
    start, end = cuda.Event(timing=True), cuda.Event(timing=True)
    device = cuda.DeviceBuffer(16)
    start.record(stream)
    cuda.memset(device.ptr, 0, 16, stream)
    end.record(stream)
    stream.synchronize()
    assert end.elapsed_ms(start) > 0
    with pytest.raises(cuda.CudaError, match="cudaEventElapsedTime"):
        cuda.Event().elapsed_ms(start)  # a non-timing event has no time
