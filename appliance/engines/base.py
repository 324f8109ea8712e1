"""What the pipeline knows about a model: its I/O, and how to run a batch.

The pipeline never learns which backend it has. Everything it needs (per-frame
input shape and dtype, which outputs are phase and amplitude, fixed or dynamic
batch) is read from the model file itself, with the sidecar manifest only adding
meaning the file cannot carry.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from appliance.engines.errors import EngineError
from appliance.engines.manifest import AMPLITUDE, PHASE, Manifest


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as the model declares it, without the batch axis."""

    name: str
    frame_shape: Tuple[int, ...]
    dtype: np.dtype

    def describe(self) -> str:
        return "{} {}x{}".format(self.name, np.dtype(self.dtype).name, "x".join(str(d) for d in self.frame_shape))


@dataclass(frozen=True)
class BatchSpec:
    """``fixed`` models take exactly ``size`` frames; dynamic ones take 1..``size``."""

    fixed: bool
    size: int

    def describe(self) -> str:
        return "fixed batch {}".format(self.size) if self.fixed else "dynamic batch up to {}".format(self.size)


@dataclass(frozen=True)
class EngineIO:
    input: TensorSpec
    outputs: Mapping[str, TensorSpec]  # role (PHASE, AMPLITUDE) -> tensor
    batch: BatchSpec

    @property
    def image_shape(self) -> Tuple[int, int]:
        """The 2-D frame the model wants, whatever channel axes it declares around it."""
        return _image_shape(self.input.frame_shape, self.input.name)

    def output_image_shape(self, role: str) -> Tuple[int, int]:
        return _image_shape(self.outputs[role].frame_shape, self.outputs[role].name)


def _image_shape(frame_shape: Tuple[int, ...], name: str) -> Tuple[int, int]:
    spatial = [d for d in frame_shape if d != 1]
    if len(frame_shape) < 2 or len(spatial) > 2 or frame_shape[-2:] != tuple(spatial[-2:]) or len(spatial) < 2:
        raise EngineError(
            "tensor {} has per-frame shape {}; expected an image: (H, W) with optional leading 1-sized axes".format(
                name, frame_shape
            )
        )
    return int(frame_shape[-2]), int(frame_shape[-1])


class Engine(abc.ABC):
    """A loaded model, ready to run.

    CPU backends implement :meth:`run`. GPU backends also implement
    :meth:`enqueue`, which only queues work on a CUDA stream and returns.
    """

    backend = "abstract"

    def __init__(self, path: str, io: EngineIO, sha256: str, manifest: Optional[Manifest] = None) -> None:
        self.path = path
        self.io = io
        self.sha256 = sha256
        self.manifest = manifest  # as read when the file was opened: the one its outputs were assigned by
        self.frames_per_s = 0.0  # of a full batch, measured by validation (0: not measured)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @abc.abstractmethod
    def run(self, frames: np.ndarray) -> Dict[str, np.ndarray]:
        """Infer a batch: ``frames`` is (n, H, W) in the input dtype; returns role -> (n, H', W')."""

    def enqueue(self, input_ptr: int, output_ptrs: Mapping[str, int], batch: int, stream: int) -> None:
        raise EngineError("{} backend cannot run on a CUDA stream".format(self.backend))

    @property
    def runs_on_gpu(self) -> bool:
        return False

    @property
    def max_in_flight(self) -> Optional[int]:
        """How many batches the engine can run at once (None: no limit).

        The pipeline makes no more in-flight slots than this: e.g. a dynamic-batch
        TensorRT engine's optimization-profile count, since every slot's execution
        context holds a profile of its own.
        """
        return None

    def close(self) -> None:
        """Release what the backend holds; the engine is not used afterwards."""

    def describe(self) -> str:
        outputs = ", ".join("{}={}".format(role, spec.describe()) for role, spec in self.io.outputs.items())
        return "{} [{}] input {}; outputs {}; {}".format(
            self.name, self.backend, self.io.input.describe(), outputs, self.io.batch.describe()
        )


def assign_output_roles(names: Tuple[str, ...], declared: Optional[Mapping[str, str]], where: str) -> Dict[str, str]:
    """Map roles to output tensor names.

    The manifest's ``outputs`` wins. Without it a single output is the phase, and
    several outputs are told apart by name ("phase", "amp"; with the amplitude
    named, the one other output is the phase); anything else is ambiguous and
    must be declared rather than guessed.
    """
    if declared:
        unknown = [n for n in declared.values() if n not in names]
        if unknown:
            raise EngineError(
                "{}: manifest names output(s) {} but the model has {}".format(where, unknown, list(names))
            )
        return dict(declared)
    if len(names) == 1:
        return {PHASE: names[0]}
    roles: Dict[str, str] = {}
    for name in names:
        lowered = name.lower()
        if "phase" in lowered or "phi" in lowered:
            roles.setdefault(PHASE, name)
        elif "amp" in lowered:
            roles.setdefault(AMPLITUDE, name)
    unassigned = [name for name in names if name not in roles.values()]
    if PHASE not in roles and len(unassigned) == 1 and AMPLITUDE in roles:
        roles[PHASE] = unassigned[0]
    if PHASE not in roles:
        raise EngineError(
            "{}: cannot tell which of the outputs {} is the phase; declare it in the manifest "
            "(outputs: {{phase: NAME}})".format(where, list(names))
        )
    return roles


def run_padded(engine: Engine, frames: np.ndarray, padded: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Run ``frames`` through ``engine``, zero-padding to a fixed batch; outputs are trimmed to the frames.

    ``padded`` is a reusable buffer of the fixed batch's shape (allocated here when None).
    """
    spec = engine.io.batch
    count = frames.shape[0]
    if not spec.fixed:
        return engine.run(frames)
    results: Dict[str, List[np.ndarray]] = {}
    for start in range(0, count, spec.size):
        chunk = frames[start : start + spec.size]
        if chunk.shape[0] != spec.size:
            if padded is None or padded.shape != (spec.size,) + chunk.shape[1:] or padded.dtype != chunk.dtype:
                padded = np.zeros((spec.size,) + chunk.shape[1:], dtype=chunk.dtype)
            padded[: chunk.shape[0]] = chunk
            padded[chunk.shape[0] :] = 0
            chunk = padded
        for role, values in engine.run(chunk).items():
            results.setdefault(role, []).append(values[: min(spec.size, count - start)])
    return {role: parts[0] if len(parts) == 1 else np.concatenate(parts) for role, parts in results.items()}
