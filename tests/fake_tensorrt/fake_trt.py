"""FAKE TensorRT Python module for CPU-only machines. Not NVIDIA's code.

It follows the public ``tensorrt`` Python API of 8.5 and 10.x for the parts the
appliance uses (runtime and named-tensor execution, builder, ONNX parser, INT8
calibrator), and enforces the rules that matter for correctness:

- an engine file only deserializes with the same TensorRT version and compute
  capability that built it; failures return None and are explained through the
  logger only, as TensorRT does;
- the logger is process-wide: the first one handed to a Runtime or Builder is
  the one TensorRT keeps, later ones are ignored, and it is held without a
  reference (a collected first logger is a crash in the real library: here an
  error that says so);
- engines with plugin layers only deserialize after ``init_libnvinfer_plugins``,
  and a second call finds the creators registered already;
- tensor addresses must be 256-byte aligned;
- DLA: ``DeviceType``, ``IBuilderConfig.default_device_type``/``DLA_core``,
  ``BuilderFlag.GPU_FALLBACK``, ``num_DLA_cores``; a DLA engine is built for a
  fixed batch in FP16/INT8 and runs only on a runtime whose ``DLA_core`` is a
  core of this device;
- a dynamic-batch engine's concurrently used execution contexts need distinct
  optimization profiles, and shapes must lie inside the active profile;
- ``execute_async_v3`` queues its work on the given (fake) CUDA stream; the
  outputs appear only when that stream progresses; a profile selected with
  ``set_optimization_profile_async`` is only in effect once that stream has
  progressed, so enqueueing on another stream before it did is refused (undefined
  behaviour in TensorRT);
- INT8 calibration reads the batches in the network input's dtype, and an
  exception raised by the calibrator's ``get_batch`` is logged and taken as the
  end of the data, as TensorRT's Python wrapper does.

"Engines" are JSON descriptions of I/O plus the op to apply: an affine map per
output, or the ONNX model itself run by ONNX Runtime. The version it pretends
to be is set by ``fake_tensorrt.install_tensorrt``; 10.x drops the APIs that
10.0 removed (``get_profile_shape``, ``execute_async_v2``, ``num_bindings``).
"""
import enum
import json
import os
import struct
import time
import weakref

import numpy as np
import onnxruntime as _onnxruntime  # the fake "GPU" runs ONNX engines with it; held here, so a test can hide

                                    # onnxruntime from the appliance alone (as on a Jetson without it)

__version__ = "8.5.2.2"
cudart = None  # the fake CUDA runtime this fake TensorRT's "GPU" is; set on install
MAGIC = b"FAKETRT\x01"
ALIGNMENT = 256  # bytes, of every address given to set_tensor_address
calibration_log = []  # what each build's INT8 calibration did, for tests
dla_cores = 0  # DLA engines on this fake device (an AGX Xavier has 2); set on install
_process = {"logger": None, "plugins": False}  # TensorRT's process-wide state
counters = {"init_libnvinfer_plugins": 0, "deserialize_cuda_engine": 0, "create_execution_context": 0}


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5


float32, float16, int8, int32 = DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32
_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
          DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8}


def nptype(dtype):
    return _NUMPY[dtype]


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ILogger:
    class Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self):
        pass

    def log(self, severity, msg):
        raise NotImplementedError


class Logger(ILogger):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = list(ILogger.Severity)

    def __init__(self, min_severity=ILogger.Severity.WARNING):
        ILogger.__init__(self)
        self.min_severity = min_severity

    def log(self, severity, msg):
        if severity.value <= self.min_severity.value:
            print("[fake TRT] {}: {}".format(severity.name, msg))


def _keep_logger(logger):
    """TensorRT keeps the first logger of the process, by a plain pointer: later ones are ignored."""
    if _process["logger"] is None:
        _process["logger"] = weakref.ref(logger)


def _error(logger, msg, severity=ILogger.Severity.ERROR):
    """Log through the process's logger, whatever object the message came from (``logger`` is ignored)."""
    kept = _process["logger"]() if _process["logger"] is not None else None
    if kept is None:
        if _process["logger"] is not None:
            raise RuntimeError("fake TensorRT: the process's logger (the first one given to TensorRT) has been "
                               "garbage collected; TensorRT would call through a dangling pointer here")
        return
    kept.log(severity, msg)


def init_libnvinfer_plugins(logger, namespace):
    counters["init_libnvinfer_plugins"] += 1
    _keep_logger(logger)
    if _process["plugins"]:
        _error(logger, "Plugin creator already registered - {}::FakePlugin version 1".format(namespace),
               ILogger.Severity.WARNING)
    _process["plugins"] = True
    return True


class DeviceType(enum.Enum):
    GPU = 0
    DLA = 1


def _gpu():
    return cudart.device


# -- engine files ---------------------------------------------------------------------------
def serialize(description, payload=b""):
    """Engine bytes: magic, header length, JSON description, payload (an ONNX model or nothing)."""
    header = json.dumps(description).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + struct.pack("<I", len(payload)) + payload


def engine_description(tensors, profiles=(), op=None, version=None, gpu=None, **extra):
    """An engine as this fake stores it. ``tensors``: (name, "INPUT"/"OUTPUT", shape, "FLOAT"/"HALF").

    ``profiles``: one ``{name: (min, opt, max)}`` per optimization profile.
    ``op``: {"kind": "affine", "outputs": {name: [scale, offset]}} (default scale 1, offset 0).
    ``extra``: e.g. ``plugins=["Name"]`` (plugin layers), ``dla_core=0`` (a DLA engine).
    """
    device = gpu or _gpu()
    description = {
        "version": version or __version__,
        "gpu": device["name"],
        "compute": "{}.{}".format(device["major"], device["minor"]),
        "tensors": [{"name": n, "mode": m, "shape": list(s), "dtype": d} for n, m, s, d in tensors],
        "profiles": [{k: [list(v) for v in shapes] for k, shapes in p.items()} for p in profiles],
        "op": op or {"kind": "affine", "outputs": {}},
    }
    description.update(extra)
    return description


class Runtime:
    def __init__(self, logger):
        _keep_logger(logger)
        self.logger = logger
        self.DLA_core = -1

    @property
    def num_DLA_cores(self):
        return dla_cores

    def deserialize_cuda_engine(self, data):
        counters["deserialize_cuda_engine"] += 1
        data = bytes(data)
        fail = "Engine deserialization failed."
        if not data.startswith(MAGIC):
            _error(self.logger, "1: [fake stdArchiveReader] Error Code 1: Serialization (Magic tag does not match)")
            _error(self.logger, "4: [fake runtime] Error Code 4: Internal Error ({})".format(fail))
            return None
        try:
            (length,) = struct.unpack_from("<I", data, len(MAGIC))
            start = len(MAGIC) + 4
            description = json.loads(data[start : start + length].decode())
            (payload_length,) = struct.unpack_from("<I", data, start + length)
            payload = data[start + length + 4 :]
            if len(payload) != payload_length:
                raise ValueError("payload")
        except (ValueError, struct.error, UnicodeDecodeError):
            _error(self.logger, "1: [fake stdArchiveReader] Error Code 1: Serialization (stream truncated: "
                                "the file ends before the engine does)")
            return None
        if description["version"] != __version__:
            _error(self.logger, "1: [fake stdArchiveReader] Error Code 1: Serialization (Serialization assertion "
                                "failed. Version tag does not match. Note: Current Version: {}, Serialized Engine "
                                "Version: {})".format(__version__, description["version"]))
            return None
        device = _gpu()
        compute = "{}.{}".format(device["major"], device["minor"])
        if description["compute"] != compute:
            _error(self.logger, "6: The engine plan file is generated on an incompatible device, expecting compute "
                                "{} got compute {}, please rebuild.".format(compute, description["compute"]))
            return None
        for plugin in description.get("plugins", []):
            if not _process["plugins"]:
                _error(self.logger, "1: [pluginV2Runner.cpp::load::300] Error Code 1: Serialization (getPluginCreator "
                                    "could not find plugin: {} version: 1)".format(plugin))
                return None
        if description.get("dla_core") is not None and not 0 <= self.DLA_core < dla_cores:
            _error(self.logger, "1: [fake runtime] Error Code 1: Serialization (the engine has DLA layers, but the "
                                "runtime's DLA core is {} and this device has {} DLA core(s))".format(
                                    self.DLA_core, dla_cores))
            return None
        engine = ICudaEngine(description, payload, self.logger)
        engine.dla_core = self.DLA_core if description.get("dla_core") is not None else None
        return engine


class ICudaEngine:
    def __init__(self, description, payload, logger):
        self._description = description
        self._tensors = {t["name"]: t for t in description["tensors"]}
        self._order = [t["name"] for t in description["tensors"]]
        self._profiles = description["profiles"]
        self._logger = logger
        self._op = description["op"]
        self._session = None
        if self._op["kind"] == "onnx":
            self._session = _onnxruntime.InferenceSession(payload, providers=["CPUExecutionProvider"])
        self.profiles_in_use = set()
        self.dla_core = None  # the core it runs on, for a DLA engine
        self.executions = []  # (batch, input frames) of every execution, for tests
        self.description = description

    # named-tensor API (8.5+)
    @property
    def num_io_tensors(self):
        return len(self._order)

    @property
    def num_optimization_profiles(self):
        return max(1, len(self._profiles))

    def get_tensor_name(self, index):
        return self._order[index]

    def get_tensor_mode(self, name):
        return TensorIOMode[self._tensors[name]["mode"]] if name in self._tensors else TensorIOMode.NONE

    def get_tensor_shape(self, name):
        return tuple(self._tensors[name]["shape"])

    def get_tensor_dtype(self, name):
        return DataType[self._tensors[name]["dtype"]]

    def get_tensor_profile_shape(self, name, profile_index):
        if not self._profiles:
            shape = self.get_tensor_shape(name)
            return [shape, shape, shape]
        return [tuple(s) for s in self._profiles[profile_index][name]]

    # binding-index API, deprecated in 8.5 and removed in 10.0
    @property
    def num_bindings(self):
        return len(self._order)

    def get_profile_shape(self, profile_index, binding):
        name = binding if isinstance(binding, str) else self._order[binding]
        return self.get_tensor_profile_shape(name, profile_index)

    def create_execution_context(self):
        counters["create_execution_context"] += 1
        return IExecutionContext(self)

    @property
    def dynamic(self):
        return any(-1 in t["shape"] for t in self._tensors.values())

    def _run(self, name_to_frames, batch):
        inputs = [n for n in self._order if self._tensors[n]["mode"] == "INPUT"]
        x = name_to_frames[inputs[0]]
        if self._session is not None:
            feed_name = self._session.get_inputs()[0].name
            results = self._session.run(None, {feed_name: x.astype(np.float32)})
            names = [o.name for o in self._session.get_outputs()]
            return dict(zip(names, results))
        outputs = {}
        for name in self._order:
            if self._tensors[name]["mode"] == "OUTPUT":
                scale, offset = self._op["outputs"].get(name, [1.0, 0.0])
                outputs[name] = x.astype(np.float32) * scale + offset
        return outputs


class IExecutionContext:
    def __init__(self, engine):
        self.engine = engine
        self._shapes = {}
        self._addresses = {}
        self.profile = None
        self._profile_stream = None  # the stream a profile switch was queued on, until it has run
        if engine.dynamic:
            if 0 in engine.profiles_in_use:
                _error(engine._logger, "Profile 0 has been chosen by another IExecutionContext. Use another "
                                       "profileIndex or destroy the IExecutionContext that use this profile.")
                _error(engine._logger, "Could not set default profile 0 for execution context. Profile index "
                                       "must be set explicitly.", ILogger.Severity.WARNING)
            else:
                self._take(0)

    def _take(self, index):
        if self.profile is not None:
            self.engine.profiles_in_use.discard(self.profile)
        self.profile = index
        self.engine.profiles_in_use.add(index)
        self._shapes = {}

    def __del__(self):
        if self.profile is not None:
            self.engine.profiles_in_use.discard(self.profile)

    def set_optimization_profile_async(self, profile_index, stream_handle):
        engine = self.engine
        if not 0 <= profile_index < engine.num_optimization_profiles:
            _error(engine._logger, "profile index {} out of range".format(profile_index))
            return False
        if profile_index != self.profile and profile_index in engine.profiles_in_use:
            _error(engine._logger, "Profile {} has been chosen by another IExecutionContext.".format(profile_index))
            return False
        self._take(profile_index)
        self._profile_stream = stream_handle

        def switched():
            self._profile_stream = None

        cudart.launch(stream_handle, switched)
        return True

    def set_input_shape(self, name, shape):
        engine = self.engine
        shape = tuple(int(d) for d in shape)
        declared = engine.get_tensor_shape(name)
        if engine.get_tensor_mode(name) != TensorIOMode.INPUT or len(shape) != len(declared):
            _error(engine._logger, "set_input_shape: {} is not an input of rank {}".format(name, len(shape)))
            return False
        if engine.dynamic:
            if self.profile is None:
                _error(engine._logger, "set_input_shape: no optimization profile selected")
                return False
            low, _, high = engine.get_tensor_profile_shape(name, self.profile)
            if any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
                _error(engine._logger, "set_input_shape: {} is outside profile {} [{}, {}]".format(
                    shape, self.profile, low, high))
                return False
        elif shape != declared:
            _error(engine._logger, "set_input_shape: {} differs from the static shape {}".format(shape, declared))
            return False
        self._shapes[name] = shape
        return True

    def set_tensor_address(self, name, memory):
        if name not in self.engine._tensors:
            _error(self.engine._logger, "set_tensor_address: no tensor {}".format(name))
            return False
        if int(memory) % ALIGNMENT:
            _error(self.engine._logger, "3: [executionContext.cpp::setTensorAddress] Error Code 3: API Usage Error "
                                        "(tensor {} address 0x{:x} is not {}-byte aligned)".format(
                                            name, int(memory), ALIGNMENT))
            return False
        self._addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle):
        engine, logger = self.engine, self.engine._logger
        tensors = engine._tensors
        missing = [n for n in engine._order if n not in self._addresses]
        if missing:
            _error(logger, "execute_async_v3: no address set for {}".format(missing))
            return False
        input_name = next(n for n in engine._order if tensors[n]["mode"] == "INPUT")
        shape = self._shapes.get(input_name) or (None if engine.dynamic else engine.get_tensor_shape(input_name))
        if shape is None:
            _error(logger, "execute_async_v3: input shape of {} not specified".format(input_name))
            return False
        batch = shape[0]
        if self._profile_stream is not None and int(self._profile_stream) != int(stream_handle):
            _error(logger, "execute_async_v3: the optimization profile was set on stream {} which has not been "
                           "synchronized with stream {}".format(int(self._profile_stream), int(stream_handle)))
            return False

        def view(name, dims):
            dtype = np.dtype(_NUMPY[DataType[tensors[name]["dtype"]]])
            count = int(np.prod(dims))
            return cudart.device_view(self._addresses[name], count * dtype.itemsize).view(dtype).reshape(dims)

        try:
            frames = view(input_name, shape)
            outputs = {n: view(n, (batch,) + tuple(tensors[n]["shape"][1:]))
                       for n in engine._order if tensors[n]["mode"] == "OUTPUT"}
        except ValueError as exc:  # an address that is not (enough) device memory
            _error(logger, "execute_async_v3: {}".format(exc))
            return False

        def kernel():
            engine.executions.append((batch, frames.copy()))
            results = engine._run({input_name: frames}, batch)
            for name, out in outputs.items():
                out[...] = results[name].reshape(out.shape).astype(out.dtype)

        cudart.launch(stream_handle, kernel)
        return True

    def execute_async_v2(self, bindings, stream_handle, input_consumed=None):  # removed in 10.0
        raise AssertionError("fake TensorRT: the appliance must not use the binding-index API")


# -- builder ----------------------------------------------------------------------------
class NetworkDefinitionCreationFlag(enum.Enum):
    EXPLICIT_BATCH = 0
    EXPLICIT_PRECISION = 1


class BuilderFlag(enum.Enum):
    FP16 = 0
    INT8 = 1
    OBEY_PRECISION_CONSTRAINTS = 2
    GPU_FALLBACK = 3


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class LayerType(enum.Enum):
    ELEMENTWISE = 0
    CONVOLUTION = 1
    ACTIVATION = 2
    QUANTIZE = 3
    DEQUANTIZE = 4
    OTHER = 5


_LAYER_TYPES = {"Add": LayerType.ELEMENTWISE, "Mul": LayerType.ELEMENTWISE, "Conv": LayerType.CONVOLUTION,
                "Relu": LayerType.ACTIVATION, "Tanh": LayerType.ACTIVATION,
                "QuantizeLinear": LayerType.QUANTIZE, "DequantizeLinear": LayerType.DEQUANTIZE}


class ITensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class ILayer:
    def __init__(self, name, layer_type):
        self.name, self.type = name, layer_type


class INetworkDefinition:
    def __init__(self, explicit_batch):
        self.explicit_batch = explicit_batch
        self.inputs, self.outputs, self.layers = [], [], []
        self.onnx = None

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))
    num_layers = property(lambda self: len(self.layers))

    def get_input(self, index):
        return self.inputs[index]

    def get_output(self, index):
        return self.outputs[index]

    def get_layer(self, index):
        return self.layers[index]


class _ParserError:
    def __init__(self, message):
        self.message = message

    def desc(self):
        return self.message

    def __str__(self):
        return "In node -1 (fake parser): {}".format(self.message)


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.logger, self._errors = network, logger, []

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, index):
        return self._errors[index]

    def parse(self, model):
        import onnx
        from onnx import TensorProto

        if not self.network.explicit_batch:
            self._errors.append(_ParserError("The ONNX parser only supports networks with an explicit batch dimension"))
            return False
        try:
            proto = onnx.load_from_string(bytes(model))
            onnx.checker.check_model(proto)
        except Exception as exc:  # the real parser reports any protobuf problem as a parser error
            self._errors.append(_ParserError("cannot parse the model: {}".format(exc)))
            return False
        types = {TensorProto.FLOAT: DataType.FLOAT, TensorProto.FLOAT16: DataType.HALF}
        initializers = {i.name for i in proto.graph.initializer}

        def tensor(value):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
            return ITensor(value.name, dims, types.get(value.type.tensor_type.elem_type, DataType.INT32))

        self.network.inputs = [tensor(v) for v in proto.graph.input if v.name not in initializers]
        self.network.outputs = [tensor(v) for v in proto.graph.output]
        self.network.layers = [ILayer(n.name or n.op_type, _LAYER_TYPES.get(n.op_type, LayerType.OTHER))
                               for n in proto.graph.node]
        self.network.onnx = bytes(model)
        return True


class IOptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, input, min, opt, max):
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


class IInt8Calibrator:
    def __init__(self):
        pass


class IInt8EntropyCalibrator2(IInt8Calibrator):
    pass


class IBuilderConfig:
    def __init__(self):
        self.flags = set()
        self.profiles = []
        self.pool_limits = {}
        self.int8_calibrator = None
        self.calibration_profile = None
        self.default_device_type = DeviceType.GPU
        self.DLA_core = -1
        self.progress_monitor = None  # TensorRT 10: an IProgressMonitor told of the build's phases

    def set_flag(self, flag):
        self.flags.add(flag)

    def get_flag(self, flag):
        return flag in self.flags

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def set_memory_pool_limit(self, pool, pool_size):
        self.pool_limits[pool] = pool_size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_calibration_profile(self, profile):
        self.calibration_profile = profile
        return True


BUILD_GATE_VARIABLE = "FAKE_TENSORRT_BUILD_GATE"


class IProgressMonitor:
    """TensorRT 10's build progress interface (the fake of TensorRT 8.5 has none: see install_tensorrt)."""

    def __init__(self):
        pass


def _wait_for_gate():
    """A real build takes minutes; a test holds this one until the file named by the variable exists."""
    gate = os.environ.get(BUILD_GATE_VARIABLE)
    while gate and not os.path.exists(gate):
        time.sleep(0.02)


class Builder:
    platform_has_fast_fp16 = True
    platform_has_fast_int8 = True

    def __init__(self, logger):
        _keep_logger(logger)
        self.logger = logger

    @property
    def num_DLA_cores(self):
        return dla_cores

    def create_network(self, flags=0):
        explicit = bool(flags & (1 << NetworkDefinitionCreationFlag.EXPLICIT_BATCH.value)) or _major() >= 10
        return INetworkDefinition(explicit)

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        monitor = config.progress_monitor
        if monitor is not None:  # as TensorRT 10 does: phases, nested ones with a parent, steps
            monitor.phase_start("Building engine", None, 2)
            monitor.phase_start("Tactic selection", "Building engine", 3)
            for step in range(3):
                monitor.step_complete("Tactic selection", step)
            monitor.phase_finish("Tactic selection")
            monitor.step_complete("Building engine", 0)
        _wait_for_gate()
        if monitor is not None:
            monitor.step_complete("Building engine", 1)
            monitor.phase_finish("Building engine")
        logger = self.logger
        profiles = []
        for tensor in network.inputs:
            if -1 in tensor.shape and not config.profiles:
                _error(logger, "Network has dynamic or shape inputs, but no optimization profile has been defined.")
                return None
        for profile in config.profiles:
            for tensor in network.inputs:
                shapes = profile.shapes.get(tensor.name)
                if shapes is None or not all(
                    len(s) == len(tensor.shape) and all(d == t or t == -1 for d, t in zip(s, tensor.shape)) for s in shapes
                ) or not all(a <= b <= c for a, b, c in zip(*shapes)):
                    _error(logger, "Optimization profile is invalid for input {}: {}".format(tensor.name, shapes))
                    return None
            profiles.append({name: shapes for name, shapes in profile.shapes.items()})
        quantized = any(layer.type in (LayerType.QUANTIZE, LayerType.DEQUANTIZE) for layer in network.layers)
        device = self._device(network, config)
        if device is None:
            return None
        calibration = None
        if BuilderFlag.INT8 in config.flags and not quantized:
            if config.int8_calibrator is None:
                _error(logger, "Calibrator is not being used. Users must provide dynamic range for all tensors "
                               "that are not Int32 or Bool.", ILogger.Severity.WARNING)
                _error(logger, "INT8 requested without calibration data or Q/DQ nodes")
                return None
            calibration = self._calibrate(network, config)
            if calibration is None:
                return None
        tensors = [(t.name, "INPUT", t.shape, t.dtype.name) for t in network.inputs]
        tensors += [(t.name, "OUTPUT", t.shape, t.dtype.name) for t in network.outputs]
        description = engine_description(
            tensors, profiles, {"kind": "onnx"},
            precision=sorted(f.name for f in config.flags), quantized=quantized, calibration=calibration, **device
        )
        return serialize(description, network.onnx or b"")

    def _device(self, network, config):
        """What the engine records of the device it was built for; None (logged) where DLA cannot take it."""
        if config.default_device_type != DeviceType.DLA:
            return {}
        logger, fallback = self.logger, BuilderFlag.GPU_FALLBACK in config.flags
        if not 0 <= config.DLA_core < dla_cores:
            _error(logger, "DLA core {} requested, but this device has {} DLA core(s)".format(config.DLA_core, dla_cores))
            return None
        if any(-1 in tensor.shape for tensor in network.inputs):
            _error(logger, "DLA does not support dynamic shapes: the network input must have a fixed batch")
            return None
        if not config.flags & {BuilderFlag.FP16, BuilderFlag.INT8}:
            _error(logger, "DLA only runs FP16 or INT8: set BuilderFlag.FP16 or BuilderFlag.INT8")
            return None
        unsupported = [layer.name for layer in network.layers if layer.type == LayerType.OTHER]
        if unsupported and not fallback:
            _error(logger, "Layer {} is not supported on DLA and GPU fallback is not enabled".format(unsupported[0]))
            return None
        return {"dla_core": config.DLA_core, "gpu_fallback": fallback}

    def _calibrate(self, network, config):
        calibrator, logger = config.int8_calibrator, self.logger
        tensor = network.inputs[0]
        cache = calibrator.read_calibration_cache()
        if cache:
            calibration_log.append({"from_cache": True})
            return json.loads(bytes(cache).decode())
        if -1 in tensor.shape and config.calibration_profile is None:
            _error(logger, "Calibration profile must be set when calibrating a network with dynamic shapes")
            return None
        batch = calibrator.get_batch_size()
        dims = (batch,) + tuple(tensor.shape[1:])
        if config.calibration_profile is not None:
            opt = config.calibration_profile.shapes[tensor.name][1]
            if tuple(opt) != dims:
                _error(logger, "Calibration batch shape {} differs from the calibration profile's opt {}".format(dims, opt))
                return None
        dtype = np.dtype(_NUMPY[tensor.dtype])
        peak, batches = 0.0, 0
        while True:
            try:
                pointers = calibrator.get_batch([tensor.name])
            except Exception as exc:  # what TensorRT's Python wrapper does with it
                _error(logger, "Exception caught in get_batch(): {}".format(exc))
                pointers = None
            if not pointers:
                break
            data = cudart.device_view(pointers[0], int(np.prod(dims)) * dtype.itemsize).view(dtype)
            peak = max(peak, float(np.abs(data.astype(np.float32)).max()))
            batches += 1
        if not batches:
            _error(logger, "Calibration failure: the calibrator provided no batch")
            return None
        result = {"amax": peak, "batches": batches, "batch_size": batch}
        calibrator.write_calibration_cache(json.dumps(result).encode())
        calibration_log.append(dict(result, from_cache=False))
        return result


def _major():
    return int(__version__.split(".")[0])
