"""ONNX Runtime on the CPU: the backend for dev machines, CI and the demo."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from appliance.engines.base import BatchSpec, Engine, EngineIO, TensorSpec, assign_output_roles
from appliance.engines.errors import BackendUnavailable, EngineError, first_line
from appliance.engines.manifest import Manifest

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(uint16)": np.uint16,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
}


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(
        self, path: str, sha256: str, manifest: Optional[Manifest], dynamic_batch: int, threads: int = 0
    ) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise BackendUnavailable("{}: onnxruntime is not installed (pip install onnxruntime)".format(path)) from exc
        options = onnxruntime.SessionOptions()
        # Idle pool threads must sleep, not spin: a spinning worker took up to 0.9 core at 1 kHz from
        # the pvAccess receive thread on a 2-core machine (docs/benchmarks.md, table 2b).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise EngineError("{}: not a loadable ONNX model: {}".format(path, first_line(exc))) from exc
        io = self._read_io(path, manifest, dynamic_batch)
        super().__init__(path, io, sha256, manifest)
        self._input_name = io.input.name
        self._output_names = {role: spec.name for role, spec in io.outputs.items()}
        self._fetch = list(self._output_names.values())

    def _read_io(self, path: str, manifest: Optional[Manifest], dynamic_batch: int) -> EngineIO:
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise EngineError(
                "{}: model has {} inputs ({}); expected exactly one image input".format(
                    path, len(inputs), [i.name for i in inputs]
                )
            )
        input_spec, batch_dim = _tensor_spec(path, inputs[0])
        outputs = {o.name: o for o in self._session.get_outputs()}
        roles = assign_output_roles(tuple(outputs), manifest.outputs if manifest else None, path)
        output_specs = {role: _tensor_spec(path, outputs[name])[0] for role, name in roles.items()}
        batch = BatchSpec(fixed=False, size=dynamic_batch) if batch_dim is None else BatchSpec(True, batch_dim)
        io = EngineIO(input=input_spec, outputs=output_specs, batch=batch)
        io.image_shape  # raises a clear error for a non-image input
        for role in output_specs:
            io.output_image_shape(role)
        return io

    def run(self, frames: np.ndarray) -> Dict[str, np.ndarray]:
        n = frames.shape[0]
        feed = frames.reshape((n,) + self.io.input.frame_shape)
        results = self._session.run(self._fetch, {self._input_name: feed})
        return {
            role: result.reshape((n,) + self.io.output_image_shape(role))
            for role, result in zip(self._output_names, results)
        }

    def close(self) -> None:
        self._session = None


def _tensor_spec(path: str, node: object) -> Tuple[TensorSpec, Optional[int]]:
    shape: Sequence[Union[int, str, None]] = node.shape  # type: ignore[attr-defined]
    name: str = node.name  # type: ignore[attr-defined]
    type_name: str = node.type  # type: ignore[attr-defined]
    if type_name not in _ORT_TYPES:
        raise EngineError("{}: tensor {} has type {}; expected one of {}".format(path, name, type_name, sorted(_ORT_TYPES)))
    if not shape:
        raise EngineError("{}: tensor {} has no shape; expected (batch, [1,] H, W)".format(path, name))
    dims = list(shape[1:])
    if any(not isinstance(d, int) or d <= 0 for d in dims):
        raise EngineError(
            "{}: tensor {} has shape {}; only the batch axis may be dynamic".format(path, name, list(shape))
        )
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return TensorSpec(name, tuple(int(d) for d in dims), np.dtype(_ORT_TYPES[type_name])), batch
