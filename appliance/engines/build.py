"""ONNX -> TensorRT engine, on the device that will run it (``ptychonn-edge build-engine``).

Engines are not portable across TensorRT versions or GPU models, and the
version-compatible kind needs Ampere or newer, so an engine for a Jetson AGX
Xavier is built on that Xavier from the ONNX model. The result is written with
its manifest (TensorRT version, GPU, compute capability, precision, sha256, and
what the ONNX model's own manifest said), first as ``.part`` files so the
engines directory watcher never sees half an engine.

Precision: ``fp16``; or ``int8``, calibrated from real detector frames passed
through the same crop/bin preprocessing as the live stream (with a calibration
cache, so a rebuild needs no frames), or taken from a Q/DQ (explicitly
quantized) ONNX model, which needs no calibration. The cache records the model
and the frames it was made from: scales are never taken from another model, nor
kept when other frames are given.

A dynamic batch axis gets one identical optimization profile per in-flight
slot: TensorRT 8.5 lets concurrently running execution contexts share none.

``--dla-core N`` also builds the model for a Jetson's DLA (fixed batch, FP16 or
INT8, ``--gpu-fallback`` for layers the DLA cannot run) into ``<engine>.dla``,
which the manifest names: the appliance serves it on ``engine.dla_cores`` next
to the GPU engine.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from appliance import cuda
from appliance.engines.errors import EngineError
from appliance.engines.files import file_sha256
from appliance.engines.manifest import DlaPlan, GoldenPair, Manifest, TrainedPreprocess, load_manifest, write_manifest
from appliance.engines.onnx_external import check_external_data
from appliance.engines.tensorrt import device_model, import_tensorrt, tensorrt_process, version_tuple
from appliance.preprocess import Preprocessor

PRECISIONS = ("fp32", "fp16", "int8")
DLA_PRECISIONS = ("fp16", "int8")
INPUT_DTYPES = ("float32", "float16")
DLA_SUFFIX = ".dla"  # the DLA plan beside the engine: not an engine suffix, so it is never served alone
H5_DATASET_GUESSES = ("/entry/data/data", "/entry/instrument/detector/data", "/data")


class BuildError(RuntimeError):
    """The engine cannot be built; the message says why and what to change."""


@dataclass(frozen=True)
class BuildOptions:
    onnx: str
    output: str
    precision: str = "fp16"
    max_batch: int = 8
    opt_batch: Optional[int] = None  # default: max_batch
    profiles: int = 2  # one per in-flight slot (pipeline.in_flight)
    input_dtype: str = "float32"  # float16 halves the copy-in; the ring then holds float16
    calibration: Optional[str] = None  # .npy or .h5 of raw detector frames
    calibration_dataset: Optional[str] = None  # HDF5 dataset path
    calibration_frames: int = 512
    calibration_cache: Optional[str] = None  # default: <output>.calib
    crop: Optional[Tuple[int, int, int, int]] = None  # default: the ONNX manifest's preprocess
    bin: Optional[int] = None
    workspace_mb: int = 1024
    expect_sha256: Optional[str] = None  # build only this content of the ONNX file (it may be replaced meanwhile)
    dla_core: Optional[int] = None  # also build a DLA plan, on this core
    gpu_fallback: bool = False  # DLA: layers it cannot run go to the GPU

    @property
    def cache_path(self) -> str:
        return self.calibration_cache or self.output + ".calib"

    @property
    def cache_key_path(self) -> str:
        """What the calibration cache was made from (TensorRT's cache itself says nothing of it)."""
        return self.cache_path + ".key"


def build_engine(options: BuildOptions, say: Callable[[str], None] = print) -> str:
    """Build, write the engine (and its DLA plan) and its manifest; returns the engine path."""
    _check_options(options)
    try:
        trt = import_tensorrt()
    except EngineError as exc:
        raise BuildError(str(exc)) from exc
    usable, device = cuda.available()
    if not usable:
        raise BuildError("building a TensorRT engine needs the CUDA device it will run on: {}".format(device))
    source_manifest = _source_manifest(options.onnx)
    os.makedirs(os.path.dirname(os.path.abspath(options.output)), exist_ok=True)  # the calibration cache goes there
    logger = tensorrt_process(trt).logger
    builder = trt.Builder(logger)
    network, onnx_sha256 = _parse(trt, builder, logger, options.onnx, options.expect_sha256)
    tensor = network.get_input(0)
    dims = tuple(int(d) for d in tensor.shape)
    _check_dla(builder, options, dims)
    if options.input_dtype == "float16":
        tensor.dtype = trt.DataType.HALF
    quantization = _quantization(trt, builder, network, options, onnx_sha256, say)
    calibrator = None
    if quantization == "calibration":
        calibrator = _calibrator(trt, options, dims, _preprocess(options, source_manifest), onnx_sha256, say)
    try:
        config = _config(trt, builder, options, tensor.name, dims, calibrator)
        say("building {} engine from {} on {} (TensorRT {}); this takes a while".format(
            options.precision, options.onnx, device, trt.__version__))
        serialized = _build(trt, builder, network, config, logger, calibrator, options.onnx, say)
        dla_serialized = None
        if options.dla_core is not None:
            dla_config = _config(trt, builder, options, tensor.name, dims, calibrator)
            _on_dla(trt, dla_config, options)
            say("building its DLA plan for DLA core {}{}".format(
                options.dla_core, " with GPU fallback" if options.gpu_fallback else ""))
            dla_serialized = _build(trt, builder, network, dla_config, logger, calibrator, options.onnx + " for DLA",
                                    say)
        manifest = _engine_manifest(options, source_manifest, trt, dims, quantization, calibrator, onnx_sha256)
    finally:
        if calibrator is not None:
            calibrator.close()
    return _write(options.output, serialized, manifest, dla_serialized, options)


def _config(trt: Any, builder: Any, options: BuildOptions, input_name: str, dims: Tuple[int, ...],
            calibrator: Any) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    profiles = _add_profiles(builder, config, input_name, dims, options) if dims[0] == -1 else []
    if options.precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16)  # also the fallback for layers INT8 does not cover
    if options.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if calibrator is not None:
        config.int8_calibrator = calibrator
        if profiles:
            config.set_calibration_profile(profiles[0])
    return config


def _on_dla(trt: Any, config: Any, options: BuildOptions) -> None:
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = options.dla_core
    if options.gpu_fallback:
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)


def _build(trt: Any, builder: Any, network: Any, config: Any, logger: Any, calibrator: Any, what: str,
           say: Callable[[str], None]) -> memoryview:
    started = time.monotonic()
    mark = logger.mark()
    with _progress(trt, config, say):
        serialized = builder.build_serialized_network(network, config)
    if calibrator is not None:
        calibrator.raise_failure()  # TensorRT took it for the end of the data: the scales would be wrong
    if serialized is None:
        reason = logger.errors_since(mark) or "no reason logged"
        raise BuildError("TensorRT could not build {}: {}".format(what, reason))
    say("built in {:.1f} s".format(time.monotonic() - started))
    return memoryview(serialized)


# A build without TensorRT's progress monitor (before TensorRT 10) says this often that it goes on.
STILL_BUILDING_EVERY_S = 30.0


@contextlib.contextmanager
def _progress(trt: Any, config: Any, say: Callable[[str], None]) -> Iterator[None]:
    """Progress while TensorRT builds (minutes on a Jetson): its phases and steps where TensorRT reports
    them (IProgressMonitor, TensorRT 10), else the time so far, so nobody takes a build for a hang."""
    if hasattr(trt, "IProgressMonitor"):
        monitor = _phase_reporter(trt, say)
        config.progress_monitor = monitor
        try:
            yield
        finally:
            config.progress_monitor = None  # TensorRT must not call back into it after the build
        return
    started, done = time.monotonic(), threading.Event()

    def tick() -> None:
        while not done.wait(STILL_BUILDING_EVERY_S):
            say("still building ({:.0f} s)".format(time.monotonic() - started))

    ticker = threading.Thread(target=tick, name="build progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


def _phase_reporter(trt: Any, say: Callable[[str], None]) -> Any:
    """An IProgressMonitor that reports the top-level phases and their steps (TensorRT calls it from
    several threads; nested phases are too many lines to be useful)."""

    class PhaseReporter(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._steps: Dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
            if parent_phase is None:
                with self._lock:
                    self._steps[phase_name] = num_steps
                say("{}: {} steps".format(phase_name, num_steps))

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                total = self._steps.get(phase_name)
            if total is not None:
                say("{}: step {} of {} done".format(phase_name, step + 1, total))
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                self._steps.pop(phase_name, None)

    return PhaseReporter()


def _check_options(options: BuildOptions) -> None:
    problems = []
    if options.precision not in PRECISIONS:
        problems.append("precision {!r}; expected one of {}".format(options.precision, ", ".join(PRECISIONS)))
    if options.input_dtype not in INPUT_DTYPES:
        problems.append("input dtype {!r}; expected one of {}".format(options.input_dtype, ", ".join(INPUT_DTYPES)))
    opt = options.opt_batch or options.max_batch
    if not 1 <= opt <= options.max_batch:
        problems.append("batch sizes: need 1 <= opt ({}) <= max ({})".format(opt, options.max_batch))
    if options.profiles < 1:
        problems.append("profiles {}: need at least 1".format(options.profiles))
    if options.dla_core is not None:
        if options.dla_core < 0:
            problems.append("DLA core {}: need 0 or more".format(options.dla_core))
        if options.precision not in DLA_PRECISIONS:
            problems.append("precision {} on a DLA core; the DLA runs {}".format(
                options.precision, " or ".join(DLA_PRECISIONS)))
    elif options.gpu_fallback:
        problems.append("--gpu-fallback without --dla-core: GPU fallback is for layers a DLA core cannot run")
    if not os.path.isfile(options.onnx):
        problems.append("{}: no such ONNX file".format(options.onnx))
    if problems:
        raise BuildError("; ".join(problems))


def _source_manifest(onnx_path: str) -> Manifest:
    try:
        return load_manifest(onnx_path) or Manifest()
    except EngineError as exc:
        raise BuildError(str(exc)) from exc


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: str, expect_sha256: Optional[str]) -> Tuple[Any, str]:
    """The network, and the sha256 of the very bytes it was parsed from."""
    # 10.x networks are always explicit-batch (the flag is deprecated); 8.x needs it asked for.
    flags = 0
    if version_tuple(trt.__version__) < (10, 0):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH.value)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as handle:
        model = handle.read()
    sha256 = hashlib.sha256(model).hexdigest()
    if expect_sha256 and sha256 != expect_sha256:
        raise BuildError("{} changed before it could be built (sha256 {}, expected {}); its new content is built "
                         "on its own".format(onnx_path, sha256, expect_sha256))
    try:
        check_external_data(onnx_path, model)
    except EngineError as exc:
        raise BuildError(str(exc)) from exc
    if not parser.parse(model):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError("TensorRT cannot parse {}: {}".format(onnx_path, "; ".join(errors) or "no reason given"))
    if network.num_inputs != 1:
        raise BuildError("{}: model has {} inputs; expected exactly one image input".format(
            onnx_path, network.num_inputs))
    dims = tuple(int(d) for d in network.get_input(0).shape)
    if len(dims) < 3 or any(d <= 0 for d in dims[1:]):
        raise BuildError("{}: input shape {}; expected (batch, [1,] H, W) with only the batch axis dynamic".format(
            onnx_path, list(dims)))
    return network, sha256


def _check_dla(builder: Any, options: BuildOptions, dims: Tuple[int, ...]) -> None:
    """A DLA plan needs a fixed batch and a core this device has: said before minutes of building."""
    if options.dla_core is None:
        return
    if dims[0] == -1:
        raise BuildError("{}: dynamic batch axis; a DLA core runs a fixed batch only: export the ONNX model with a "
                         "fixed batch (e.g. 8) for --dla-core".format(options.onnx))
    cores = int(builder.num_DLA_cores)
    if options.dla_core >= cores:
        raise BuildError("--dla-core {}: this device has {} DLA core(s){}".format(
            options.dla_core, cores, " (0..{})".format(cores - 1) if cores else ""))


def _add_profiles(builder: Any, config: Any, name: str, dims: Tuple[int, ...], options: BuildOptions) -> List[Any]:
    frame = dims[1:]
    opt = options.opt_batch or options.max_batch
    profiles = []
    for _ in range(options.profiles):
        profile = builder.create_optimization_profile()
        profile.set_shape(name, (1,) + frame, (opt,) + frame, (options.max_batch,) + frame)
        config.add_optimization_profile(profile)
        profiles.append(profile)
    return profiles


def _quantization(trt: Any, builder: Any, network: Any, options: BuildOptions, onnx_sha256: str,
                  say: Callable[[str], None]) -> str:
    """How INT8 scales are found: '' (no INT8), 'q/dq' (in the model) or 'calibration'."""
    if options.precision == "fp32":
        return ""
    if not getattr(builder, "platform_has_fast_fp16", True):  # deprecated in 10.x
        say("warning: this GPU has no fast FP16; the engine may not be faster than FP32")
    if options.precision == "fp16":
        return ""
    layer_types = {network.get_layer(i).type for i in range(network.num_layers)}
    if layer_types & {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE}:
        say("the model has Q/DQ nodes: explicit INT8 quantization, no calibration")
        return "q/dq"
    if not options.calibration and not os.path.isfile(options.cache_path):
        raise BuildError(
            "INT8 needs scales: give --calibration frames (.npy/.h5 of detector frames), an existing calibration "
            "cache ({}), or a Q/DQ (explicitly quantized) ONNX model".format(options.cache_path)
        )
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise BuildError("TensorRT {} has no implicit INT8 calibration: use a Q/DQ (explicitly quantized) "
                         "ONNX model".format(trt.__version__))
    if not options.calibration:
        _check_cache_is_for(options, onnx_sha256)
    return "calibration"


def _check_cache_is_for(options: BuildOptions, onnx_sha256: str) -> None:
    """Without frames, the cache's scales must be this model's: a retrained model has other activations."""
    made_for = _read_cache_key(options).get("onnx_sha256")
    if made_for != onnx_sha256:
        raise BuildError("the calibration cache {} holds scales for {}, not for {} (sha256 {}): give --calibration "
                         "frames to calibrate this model".format(
                             options.cache_path, "model sha256 {}".format(made_for) if made_for else
                             "an unrecorded model (no {})".format(options.cache_key_path), options.onnx, onnx_sha256))


def _read_cache_key(options: BuildOptions) -> Dict[str, str]:
    """What the calibration cache was made from ({} when that is not recorded, or unreadable)."""
    try:
        with open(options.cache_key_path) as handle:
            key = json.load(handle)
    except (OSError, ValueError):
        return {}
    return key if isinstance(key, dict) else {}


def _preprocess(options: BuildOptions, manifest: Manifest) -> TrainedPreprocess:
    """CLI values first, then what the model's manifest says training used."""
    trained = manifest.preprocess or TrainedPreprocess()
    return TrainedPreprocess(
        crop=tuple(options.crop) if options.crop is not None else trained.crop,  # type: ignore[arg-type]
        bin=options.bin if options.bin is not None else trained.bin,
    )


def load_frames(path: str, dataset: Optional[str], limit: int) -> np.ndarray:
    """Up to ``limit`` raw frames (n, H, W), spread evenly over the file so the whole scan is represented."""
    lowered = path.lower()
    if lowered.endswith(".npy"):
        data = np.load(path, mmap_mode="r")
        return _spread(data, limit, path)
    if lowered.endswith((".h5", ".hdf5", ".nxs")):
        try:
            import h5py
        except ImportError as exc:
            raise BuildError("{}: reading HDF5 needs h5py (pip install h5py)".format(path)) from exc
        with h5py.File(path, "r") as handle:
            name = dataset or _find_dataset(handle, path)
            if name not in handle:
                raise BuildError("{}: no dataset {}".format(path, name))
            return _spread(handle[name], limit, "{}:{}".format(path, name))
    raise BuildError("{}: calibration frames must be .npy or .h5/.hdf5/.nxs".format(path))


def _find_dataset(handle: Any, path: str) -> str:
    for guess in H5_DATASET_GUESSES:
        if guess in handle and getattr(handle[guess], "ndim", 0) == 3:
            return guess
    found: List[str] = []
    handle.visititems(lambda name, item: found.append("/" + name) if getattr(item, "ndim", 0) == 3 else None)
    if not found:
        raise BuildError("{}: no 3-D dataset of frames; name one with --calibration-dataset".format(path))
    return found[0]


def _spread(data: Any, limit: int, where: str) -> np.ndarray:
    if data.ndim != 3 or data.shape[0] == 0:
        raise BuildError("{}: shape {}; expected frames (n, H, W)".format(where, tuple(data.shape)))
    indices = np.unique(np.linspace(0, data.shape[0] - 1, min(limit, data.shape[0])).astype(int))
    return np.asarray(data[indices.tolist()])


def _calibrator(trt: Any, options: BuildOptions, dims: Tuple[int, ...], preprocess: TrainedPreprocess,
                onnx_sha256: str, say: Callable[[str], None]) -> Any:
    batch = (options.opt_batch or options.max_batch) if dims[0] == -1 else dims[0]
    frames = np.zeros((0,) + dims[1:], np.float32)
    key = {"onnx_sha256": onnx_sha256}
    if options.calibration:
        raw = load_frames(options.calibration, options.calibration_dataset, options.calibration_frames)
        frames = _preprocessed(raw, dims, preprocess, options.calibration)
        if len(frames) < batch:
            raise BuildError("{}: {} frames; calibration needs at least one batch of {}".format(
                options.calibration, len(frames), batch))
        key["frames_sha256"] = _frames_sha256(frames)
        say("calibrating INT8 on {} frames of {} (crop {}, bin {})".format(
            len(frames), options.calibration, list(preprocess.crop), preprocess.bin))
    else:
        say("INT8 scales from the calibration cache {}".format(options.cache_path))
    return make_calibrator(trt, frames, batch, np.dtype(options.input_dtype), options, key)


def _frames_sha256(frames: np.ndarray) -> str:
    """Of the preprocessed frames: the file, dataset, frame count, crop and bin all change it."""
    digest = hashlib.sha256(repr(frames.shape).encode())
    digest.update(np.ascontiguousarray(frames, np.float32).tobytes())
    return digest.hexdigest()


def _preprocessed(raw: np.ndarray, dims: Tuple[int, ...], preprocess: TrainedPreprocess, where: str) -> np.ndarray:
    """Raw frames through the stream's own crop/bin into float32, shaped like the network input."""
    try:
        transform = Preprocessor(raw.shape[1:], preprocess.crop, preprocess.bin)
    except ValueError as exc:  # FrameError
        raise BuildError("{}: {}".format(where, exc)) from exc
    image = dims[-2:]
    if transform.output_shape != tuple(image):
        raise BuildError("{}: frames {}x{} preprocess (crop {}, bin {}) to {}x{}, but the model takes {}x{}".format(
            where, raw.shape[1], raw.shape[2], list(preprocess.crop), preprocess.bin,
            transform.output_shape[0], transform.output_shape[1], image[0], image[1]))
    frames = np.empty((len(raw),) + tuple(image), np.float32)
    for index, frame in enumerate(raw):
        transform(frame, frames[index])
    return frames.reshape((len(raw),) + dims[1:])


def make_calibrator(trt: Any, frames: np.ndarray, batch: int, dtype: np.dtype, options: BuildOptions,
                    key: Dict[str, str]) -> Any:
    """An IInt8EntropyCalibrator2 feeding ``frames`` (network-shaped) ``batch`` at a time, as ``dtype``.

    ``key`` says what the scales are made from (the ONNX sha256, and the
    frames' unless only the cache is used): the cache is read only when it was
    made from the same, and written with it.
    """

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.frames = frames
            self.batches = 0
            self.failure = ""  # what get_batch raised: TensorRT's wrapper only logs it and ends the data
            self._next = 0
            self._device = cuda.DeviceBuffer(batch * int(np.prod(frames.shape[1:])) * dtype.itemsize)
            self._stream = cuda.Stream()

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: Sequence[str], *unused: Any) -> Optional[List[int]]:
            try:
                return self._next_batch()
            except Exception as exc:
                self.failure = "{}: {}".format(type(exc).__name__, exc)
                return None

        def _next_batch(self) -> Optional[List[int]]:
            if self._next + batch > len(self.frames):
                return None
            chunk = np.ascontiguousarray(self.frames[self._next : self._next + batch], dtype=dtype)
            cuda.copy_host_to_device(self._device.ptr, chunk.ctypes.data, chunk.nbytes, self._stream)
            self._stream.synchronize()
            self._next += batch
            self.batches += 1
            return [self._device.ptr]

        def raise_failure(self) -> None:
            if self.failure:
                raise BuildError("INT8 calibration failed reading batch {} of {}: {}; no engine was written".format(
                    self.batches + 1, options.calibration, self.failure))

        def read_calibration_cache(self) -> Optional[bytes]:
            stored = _read_cache_key(options)
            if not os.path.isfile(options.cache_path) or any(stored.get(k) != v for k, v in key.items()):
                return None
            with open(options.cache_path, "rb") as handle:
                return handle.read()

        def write_calibration_cache(self, cache: Any) -> None:
            if os.path.exists(options.cache_key_path):
                os.remove(options.cache_key_path)  # no moment where the old key names the new scales
            with open(options.cache_path, "wb") as handle:
                handle.write(bytes(cache))
            with open(options.cache_key_path, "w") as handle:
                json.dump(key, handle)

        def close(self) -> None:
            self._device.close()
            self._stream.close()

    return Calibrator()


def _engine_manifest(options: BuildOptions, source: Manifest, trt: Any, dims: Tuple[int, ...], quantization: str,
                     calibrator: Any, onnx_sha256: str) -> Manifest:
    info = cuda.device_info()
    opt = options.opt_batch or options.max_batch
    if dims[0] == -1:
        batch = "dynamic 1..{} (opt {}), {} profile(s)".format(options.max_batch, opt, options.profiles)
    else:
        batch = "fixed {}".format(dims[0])
    build = {
        "tensorrt": str(trt.__version__),
        "gpu": info.name,
        "compute_capability": "{}.{}".format(*info.compute_capability),
        "device_model": device_model(),
        "precision": options.precision,
        "input_dtype": options.input_dtype,
        "batch": batch,
        "source": "{} sha256 {}".format(os.path.basename(options.onnx), onnx_sha256),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if quantization == "q/dq":
        build["int8_scales"] = "Q/DQ nodes in the model"
    elif calibrator is not None:
        used = "{} batches of {}".format(calibrator.batches, os.path.basename(options.calibration or ""))
        build["int8_scales"] = "calibration cache {}".format(options.cache_path) if not calibrator.batches else used
    preprocess = source.preprocess
    if options.crop is not None or options.bin is not None:
        preprocess = _preprocess(options, source)
    return dataclasses.replace(
        source, preprocess=preprocess, golden=_golden_beside(source.golden, options.onnx, options.output),
        sha256=None, build=build, dla=None,
    )


def _golden_beside(golden: Optional[GoldenPair], onnx_path: str, engine_path: str) -> Optional[GoldenPair]:
    """The golden files' paths, which are relative to the model file, made relative to the engine file."""
    if golden is None:
        return None
    source_dir = os.path.dirname(os.path.abspath(onnx_path))
    target_dir = os.path.dirname(os.path.abspath(engine_path))

    def moved(name: Optional[str]) -> Optional[str]:
        return None if name is None else os.path.relpath(os.path.join(source_dir, name), target_dir)

    return dataclasses.replace(golden, input=moved(golden.input), phase=moved(golden.phase),
                               amplitude=moved(golden.amplitude))


def _write(path: str, serialized: memoryview, manifest: Manifest, dla_serialized: Optional[memoryview],
           options: BuildOptions) -> str:
    """Engine, DLA plan and manifest as .part files first, renamed into place, the engine last: a watcher never
    sees half of any, nor an engine whose manifest or plan is still missing."""
    part = _write_part(path, serialized)
    manifest = dataclasses.replace(manifest, sha256=file_sha256(part))
    dla_part = None
    if dla_serialized is not None:
        dla_part = _write_part(path + DLA_SUFFIX, dla_serialized)
        plan = DlaPlan(file=os.path.basename(path) + DLA_SUFFIX, sha256=file_sha256(dla_part),
                       core=int(options.dla_core or 0), gpu_fallback=options.gpu_fallback)
        manifest = dataclasses.replace(manifest, dla=plan)
    manifest_part = write_manifest(part, manifest)
    if dla_part is not None:
        os.replace(dla_part, path + DLA_SUFFIX)
    os.replace(manifest_part, path + ".yaml")
    os.replace(part, path)
    return path


def _write_part(path: str, data: memoryview) -> str:
    part = path + ".part"
    with open(part, "wb") as handle:
        handle.write(data)
    return part


# -- command line ----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx", help="the ONNX model")
    parser.add_argument("-o", "--output", help="engine file to write (default: beside the model, .engine)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16", help="default: fp16")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch of a dynamic-batch model (default 8)")
    parser.add_argument("--opt-batch", type=int, help="batch TensorRT tunes for (default: --max-batch)")
    parser.add_argument("--profiles", type=int, default=2,
                        help="optimization profiles, one per in-flight slot (pipeline.in_flight; default 2)")
    parser.add_argument("--input-dtype", choices=INPUT_DTYPES, default="float32",
                        help="engine input type; float16 halves the copy-in (default float32)")
    parser.add_argument("--calibration", metavar="FRAMES", help="INT8: .npy or .h5 of raw detector frames")
    parser.add_argument("--calibration-dataset", metavar="PATH", help="HDF5 dataset of the frames (default: found)")
    parser.add_argument("--calibration-frames", type=int, default=512, help="frames to calibrate on (default 512)")
    parser.add_argument("--calibration-cache", metavar="FILE", help="INT8 scales cache (default: <output>.calib)")
    parser.add_argument("--crop", type=int, nargs=4, metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                        help="crop of the calibration frames (default: the model manifest's preprocess)")
    parser.add_argument("--bin", type=int, help="binning of the calibration frames (default: the model manifest's)")
    parser.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace limit (default 1024 MiB)")
    parser.add_argument("--expect-sha256", metavar="HEX",
                        help="build only if the ONNX file has this sha256 (it may be replaced while waiting)")
    parser.add_argument("--dla-core", type=int, metavar="N",
                        help="also build the model for DLA core N (fixed batch, fp16/int8) into <output>.dla, "
                             "served next to the GPU on engine.dla_cores")
    parser.add_argument("--gpu-fallback", action="store_true",
                        help="with --dla-core: layers the DLA cannot run go to the GPU")


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    output = args.output or os.path.splitext(args.onnx)[0] + ".engine"
    return BuildOptions(
        onnx=args.onnx, output=output, precision=args.precision, max_batch=args.max_batch, opt_batch=args.opt_batch,
        profiles=args.profiles, input_dtype=args.input_dtype, calibration=args.calibration,
        calibration_dataset=args.calibration_dataset, calibration_frames=args.calibration_frames,
        calibration_cache=args.calibration_cache, crop=tuple(args.crop) if args.crop else None, bin=args.bin,
        workspace_mb=args.workspace_mb, expect_sha256=args.expect_sha256, dla_core=args.dla_core,
        gpu_fallback=args.gpu_fallback,
    )


def main(args: argparse.Namespace) -> int:
    try:
        path = build_engine(options_from_args(args))
    except (BuildError, cuda.CudaError) as exc:
        print("build-engine: {}".format(exc), file=sys.stderr)
        return 1
    print("wrote {} and {}".format(path, path + ".yaml"))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptychonn-edge build-engine", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(_parser().parse_args()))
