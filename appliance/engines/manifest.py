"""The optional sidecar ``<engine file>.yaml``: meaning a model file cannot carry.

A model file says its tensor names and shapes; only its author knows which
output is the phase, what pixel size the patches have, how frames were
preprocessed in training, and what a known input must produce. The golden pair
and the sha256 let the appliance refuse a file that is not what its author
shipped, before it serves a single frame. ``build`` says what built an engine
(TensorRT version, compute capability, device), which is checked against the
machine before the engine is deserialized, and ``dla`` names the same model
built for a Jetson's DLA cores.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import yaml

from appliance import schema
from appliance.config import PIXEL_SIZE_M
from appliance.engines.errors import EngineError
from appliance.engines.files import SizeLimit, open_regular_file
from appliance.schema import SchemaError, check

PHASE = "phase"
AMPLITUDE = "amplitude"
OUTPUT_ROLES = (PHASE, AMPLITUDE)  # what an output can be; the manifest's ``outputs`` maps them to tensor names

MANIFEST_LIMIT = SizeLimit(1 << 20, "1 MiB, the most a manifest may have")
GOLDEN_LIMIT = SizeLimit(256 << 20, "256 MiB, the most a golden file may have")
DLA_PLAN_LIMIT = SizeLimit(2048 << 20, "2 GiB, the most a DLA plan may have")
SHA256 = check(lambda v: len(v) == 64 and all(c in "0123456789abcdef" for c in v), "64 lowercase hex digits")


@dataclass(frozen=True)
class GoldenPair:
    """Frames in (after preprocessing) and the outputs they must give, as .npy files beside the manifest."""

    input: str
    phase: str
    amplitude: Optional[str] = None
    atol: float = field(default=1e-3, metadata=check(lambda v: v >= 0, ">= 0"))
    rtol: float = field(default=1e-3, metadata=check(lambda v: v >= 0, ">= 0"))


@dataclass(frozen=True)
class DlaPlan:
    """The engine's model built for a DLA core, in a file beside it (``<engine>.dla``, never served alone).

    DLA cores run a plan built for DLA only, so a GPU engine cannot be sent
    there: with ``engine.dla_cores`` this plan is loaded on each of those cores
    as extra in-flight slots next to the GPU.
    """

    file: str  # relative to the engine, like the golden files
    sha256: str = field(metadata=SHA256)
    core: int = field(default=0, metadata=check(lambda v: v >= 0, ">= 0"))  # the core it was built on
    gpu_fallback: bool = False  # layers the DLA cannot run are on the GPU


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
    pixel_size_m: Optional[float] = field(default=None, metadata=PIXEL_SIZE_M)
    preprocess: Optional[TrainedPreprocess] = None
    golden: Optional[GoldenPair] = None
    sha256: Optional[str] = field(default=None, metadata=SHA256)
    build: Dict[str, str] = field(default_factory=dict)
    dla: Optional[DlaPlan] = None


def manifest_path(engine_path: str) -> str:
    return engine_path + ".yaml"


def load_manifest(engine_path: str) -> Optional[Manifest]:
    """The manifest beside ``engine_path``, None if there is none."""
    path = manifest_path(engine_path)
    text = read_manifest_text(path)
    if text is None:
        return None
    try:
        return schema.load(Manifest, schema.parse_yaml(text, path), path)
    except SchemaError as exc:
        raise EngineError(str(exc)) from exc


def read_manifest_bytes(path: str) -> Optional[bytes]:
    """The manifest file's bytes, None if there is none; EngineError if it is no readable manifest."""
    try:
        with open_regular_file(path, MANIFEST_LIMIT) as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EngineError("{}: cannot read manifest: {}".format(path, exc.strerror or exc)) from exc


def read_manifest_text(path: str) -> Optional[str]:
    """The manifest as text, None if there is none; EngineError unless it is UTF-8."""
    data = read_manifest_bytes(path)
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EngineError("{}: manifest is not UTF-8 text: byte 0x{:02x} at offset {}".format(
            path, data[exc.start], exc.start)) from exc


def load_golden(engine_path: str, golden: GoldenPair) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """The golden input batch and expected outputs by role, paths relative to the engine."""
    base = os.path.dirname(os.path.abspath(engine_path))

    def read(name: str) -> np.ndarray:
        path = os.path.join(base, name)
        try:
            with open_regular_file(path, GOLDEN_LIMIT) as handle:
                return np.load(handle, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise EngineError("{}: cannot read golden file {}: {}".format(engine_path, path, exc)) from exc

    expected = {"phase": read(golden.phase)}
    if golden.amplitude:
        expected["amplitude"] = read(golden.amplitude)
    return read(golden.input), expected


def read_dla_plan(engine_path: str, plan: DlaPlan) -> Tuple[str, bytes]:
    """(path, bytes) of the DLA plan ``plan`` names beside ``engine_path``, checked against its sha256."""
    path = os.path.join(os.path.dirname(os.path.abspath(engine_path)), plan.file)
    try:
        with open_regular_file(path, DLA_PLAN_LIMIT) as handle:
            data = handle.read()
    except OSError as exc:
        raise EngineError("{}: cannot read its DLA plan {}: {}".format(engine_path, path, exc.strerror or exc)) from exc
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 != plan.sha256:
        raise EngineError("{}: its DLA plan {} has sha256 {} but the manifest says {}: the plan is not the one built "
                          "with the engine".format(engine_path, path, sha256, plan.sha256))
    return path, data


def write_manifest(engine_path: str, manifest: Manifest) -> str:
    path = manifest_path(engine_path)
    data = {k: v for k, v in schema.dump(manifest).items() if v not in (None, {}, "")}
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(data, handle, sort_keys=False)
    return path
