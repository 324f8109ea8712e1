"""The optional sidecar ``<engine file>.yaml``: meaning a model file cannot carry.

A model file says its tensor names and shapes; only its author knows which
output is the phase, what pixel size the patches have, how frames were
preprocessed in training, and what a known input must produce. The golden pair
and the sha256 let the appliance refuse a file that is not what its author
shipped, before it serves a single frame.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import yaml

from appliance import schema
from appliance.engines.base import OUTPUT_ROLES, EngineError
from appliance.schema import SchemaError, check


@dataclass(frozen=True)
class GoldenPair:
    """Frames in (after preprocessing) and the outputs they must give, as .npy files beside the manifest."""

    input: str
    phase: str
    amplitude: Optional[str] = None
    atol: float = field(default=1e-3, metadata=check(lambda v: v >= 0, ">= 0"))
    rtol: float = field(default=1e-3, metadata=check(lambda v: v >= 0, ">= 0"))


@dataclass(frozen=True)
class TrainedPreprocess:
    crop: Tuple[int, int, int, int] = (0, 0, 0, 0)
    bin: int = 1


@dataclass(frozen=True)
class Manifest:
    description: str = ""
    outputs: Dict[str, str] = field(
        default_factory=dict,
        metadata=check(lambda v: all(k in OUTPUT_ROLES for k in v), "roles among " + ", ".join(OUTPUT_ROLES)),
    )
    pixel_size_m: Optional[float] = field(default=None, metadata=check(lambda v: v > 0, "> 0"))
    preprocess: Optional[TrainedPreprocess] = None
    golden: Optional[GoldenPair] = None
    sha256: Optional[str] = field(
        default=None,
        metadata=check(lambda v: len(v) == 64 and all(c in "0123456789abcdef" for c in v), "64 lowercase hex digits"),
    )
    build: Dict[str, str] = field(default_factory=dict)


def manifest_path(engine_path: str) -> str:
    return engine_path + ".yaml"


def load_manifest(engine_path: str) -> Optional[Manifest]:
    """The manifest beside ``engine_path``, None if there is none."""
    path = manifest_path(engine_path)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        raise EngineError("{}: cannot read manifest: {}".format(path, exc)) from exc
    try:
        return schema.load(Manifest, data, path)
    except SchemaError as exc:
        raise EngineError(str(exc)) from exc


def load_golden(engine_path: str, golden: GoldenPair) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """The golden input batch and expected outputs by role, paths relative to the engine."""
    base = os.path.dirname(os.path.abspath(engine_path))

    def read(name: str) -> np.ndarray:
        path = os.path.join(base, name)
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise EngineError("{}: cannot read golden file {}: {}".format(engine_path, path, exc)) from exc

    expected = {"phase": read(golden.phase)}
    if golden.amplitude:
        expected["amplitude"] = read(golden.amplitude)
    return read(golden.input), expected


def write_manifest(engine_path: str, manifest: Manifest) -> str:
    path = manifest_path(engine_path)
    data = {k: v for k, v in schema.dump(manifest).items() if v not in (None, {}, "")}
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(data, handle, sort_keys=False)
    return path
