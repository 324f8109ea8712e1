"""Model backends behind one interface; :func:`open_engine` picks one for a file.

``.onnx`` files run on ONNX Runtime; ``.engine``/``.plan`` files are serialized
TensorRT engines. Every failure is an :class:`EngineError` naming the file and
what was wrong with it, so a bad file can be rejected while the service goes on.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from appliance.engines.base import Engine
from appliance.engines.errors import EngineError
from appliance.engines.files import file_sha256
from appliance.engines.manifest import Manifest, load_manifest
from appliance.engines.onnx_external import check_external_data_of

ONNX_SUFFIXES = (".onnx",)
TENSORRT_SUFFIXES = (".engine", ".plan", ".trt")
ENGINE_SUFFIXES = ONNX_SUFFIXES + TENSORRT_SUFFIXES


def is_engine_file(path: str) -> bool:
    return path.lower().endswith(ENGINE_SUFFIXES)


def open_engine(path: str, dynamic_batch: int = 8, cpu_threads: int = 0, sha256: Optional[str] = None,
                dla_cores: Sequence[int] = (), in_flight: int = 2) -> Engine:
    """Load ``path`` with the backend its type calls for, after checking the manifest's sha256.

    ``sha256``: the file's, when the caller has just computed it. ``dla_cores`` and
    ``in_flight`` (batches the pipeline keeps in flight) size a TensorRT engine's
    execution contexts, which it makes at load.
    """
    if not os.path.isfile(path):
        raise EngineError("{}: no such engine file".format(path))
    if not is_engine_file(path):
        raise EngineError(
            "{}: unknown engine type; expected a file ending in {}".format(path, ", ".join(ENGINE_SUFFIXES))
        )
    manifest = load_manifest(path)
    try:
        sha256 = sha256 or file_sha256(path)
    except OSError as exc:
        raise EngineError("{}: cannot read: {}".format(path, exc)) from exc
    _check_sha256(path, sha256, manifest)
    if path.lower().endswith(ONNX_SUFFIXES):
        from appliance.engines.onnxruntime import OnnxRuntimeEngine

        check_external_data_of(path)  # before a backend opens what the model names

        return OnnxRuntimeEngine(path, sha256, manifest, dynamic_batch, cpu_threads)
    from appliance.engines.tensorrt import TensorRtEngine

    return TensorRtEngine(path, sha256, manifest, dynamic_batch, dla_cores=dla_cores, gpu_contexts=in_flight)


def _check_sha256(path: str, sha256: str, manifest: Optional[Manifest]) -> None:
    if manifest is not None and manifest.sha256 is not None and manifest.sha256 != sha256:
        raise EngineError(
            "{}: sha256 is {} but its manifest says {}: the file is not the one that was shipped".format(
                path, sha256, manifest.sha256
            )
        )
