"""The appliance's one configuration file, as frozen dataclasses.

Defaults are chosen for a 128x128 detector stream on one device; every key is
documented in docs/configuration.md. Loading fails before anything starts when a
key is unknown, mistyped or impossible (see :mod:`appliance.schema`).
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple, Union

import yaml

from appliance import schema
from appliance.schema import SchemaError, check

DEFAULT_CONFIG_PATH = "/etc/ptychonn-edge/config.yaml"
MOSAIC_WINDOWS = ("gaussian", "hann", "flat")  # mosaic.make_window's kinds

SUPPORTED_FRAME_DTYPES = (
    "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float32", "float64",
)
_PV_NAME = re.compile(r"^[A-Za-z0-9_:.\-\[\]<>;{}$]+$")


_USER_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# A distributor option value: the plugin parses "name=key:value;key:value" from the request, so
# none of =:;[]() may appear in a value (pvDatabase's DataDistributorPlugin splits on them).
_DISTRIBUTOR_TOKEN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _is_ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _is_pv_name(value: str) -> bool:
    return bool(_PV_NAME.match(value))


@dataclass(frozen=True)
class PositionAttributes:
    """The NTNDArray attributes carrying the sample motor positions, and how they map to the mosaic.

    The attribute named ``x`` (and ``y``) is read; ``swap`` exchanges the two,
    ``sign`` flips each mosaic axis, ``scale`` turns motor units into metres.
    """

    x: str = "SampleX"
    y: str = "SampleY"
    scale: float = field(default=1.0, metadata=check(lambda v: 1e-12 <= v <= 1e3, "1e-12..1e3 m per motor unit"))
    sign: Tuple[int, int] = field(default=(1, 1), metadata=check(lambda v: set(v) <= {-1, 1}, "[x, y], each 1 or -1"))
    swap: bool = False


def _is_token(value: str) -> bool:
    return bool(_DISTRIBUTOR_TOKEN.match(value))


@dataclass(frozen=True)
class DistributorConfig:
    """The PVA data distributor: the detector's server hands this appliance ``updates`` consecutive
    frames in turn with the other clients of ``group`` (several appliances share one detector)."""

    enabled: bool = False
    plugin: str = field(default="pydistributor", metadata=check(
        _is_token, "the server's plugin name: pydistributor (pvapy servers) or distributor (areaDetector "
                   "NDPluginPva); letters, digits, _ . -"))
    group: str = field(default="", metadata=check(
        lambda v: v == "" or _is_token(v), "a group name: letters, digits, _ . - (up to 64)"))
    set: str = field(default="", metadata=check(
        lambda v: v == "" or _is_token(v), "empty (frames split between the group's clients) or a set name: "
                                           "letters, digits, _ . - (up to 64)"))
    updates: int = field(default=1, metadata=check(lambda v: 1 <= v <= 100000, "1..100000 frames per turn"))

    def __post_init__(self) -> None:
        if self.enabled and not self.group:
            raise ValueError("detector.distributor.group is required when detector.distributor.enabled is true: "
                             "the appliances that share the detector name the same group")

    def plugin_option(self) -> str:
        """``PLUGIN=group:G;set:S;trigger:uniqueId;updates:N``, as pvapy-hpc-consumer builds it."""
        options = ["group:" + self.group]
        if self.set:
            options.append("set:" + self.set)
        options += ["trigger:uniqueId", "updates:{}".format(self.updates)]
        return "{}={}".format(self.plugin, ";".join(options))


@dataclass(frozen=True)
class DetectorConfig:
    pv: str = field(default="13SIM1:Pva1:Image", metadata=check(_is_pv_name, "a PV name"))
    queue_size: int = field(default=1000, metadata=check(lambda v: 1 <= v <= 100000, "1..100000"))
    positions: PositionAttributes = field(default_factory=PositionAttributes)
    search_interval_s: float = field(default=0.5, metadata=check(lambda v: 0.1 <= v <= 60, "0.1..60 s"))
    accept_dtypes: Tuple[str, ...] = field(
        default=("uint8", "uint16", "uint32", "int8", "int16", "int32", "float32"),
        metadata=check(
            lambda v: len(v) > 0 and all(d in SUPPORTED_FRAME_DTYPES for d in v),
            "a non-empty list of " + ", ".join(SUPPORTED_FRAME_DTYPES),
        ),
    )
    distributor: DistributorConfig = field(default_factory=DistributorConfig)


# A pixel [row, col] or a rectangle [first_row, last_row, first_col, last_col] (ends included).
MaskEntry = Union[Tuple[int, int], Tuple[int, int, int, int]]


def _is_mask_list(entries: Tuple[Tuple[int, ...], ...]) -> bool:
    return all(
        min(e) >= 0 and max(e) <= 65535 and (len(e) == 2 or (e[0] <= e[1] and e[2] <= e[3])) for e in entries
    )


@dataclass(frozen=True)
class PreprocessConfig:
    """Crop margins (top, bottom, left, right) then square mean-binning, leaving masked pixels out."""

    crop: Tuple[int, int, int, int] = field(
        default=(0, 0, 0, 0), metadata=check(lambda v: 0 <= min(v) and max(v) <= 65535, "four margins 0..65535")
    )
    bin: int = field(default=1, metadata=check(lambda v: 1 <= v <= 64, "1..64"))
    # Bad pixels in raw-frame coordinates: a .npy file (nonzero = masked, the frame's shape) or a list.
    mask: Optional[Union[str, Tuple[MaskEntry, ...]]] = field(
        default=None,
        metadata=check(
            lambda v: (v.endswith(".npy") if isinstance(v, str) else _is_mask_list(v)),
            "a .npy file, or a list of [row, col] and [first_row, last_row, first_col, last_col] "
            "(0..65535, first <= last)",
        ),
    )
    mask_fill: float = field(default=0.0, metadata=check(lambda v: 0 <= v <= 1e9, "0..1e9 counts"))


@dataclass(frozen=True)
class EngineConfig:
    directory: str = "/var/lib/ptychonn-edge/engines"
    path: Optional[str] = None
    backend: str = field(
        default="auto",
        metadata=check(lambda v: v in ("auto", "onnxruntime", "tensorrt"), "auto, onnxruntime or tensorrt"),
    )
    cpu_threads: int = field(default=0, metadata=check(lambda v: 0 <= v <= 256, "0 (library default)..256"))
    settle_s: float = field(default=1.0, metadata=check(lambda v: 0 <= v <= 600, "0..600 s"))
    max_file_mb: int = field(default=2048, metadata=check(lambda v: 1 <= v <= 65536, "1..65536 MiB"))
    fault_limit: int = field(default=3, metadata=check(lambda v: 1 <= v <= 1000, "1..1000"))
    auto_build: str = field(
        default="fp16",
        metadata=check(lambda v: v in ("off", "fp32", "fp16", "int8"), "off, fp32, fp16 or int8 (Q/DQ models only)"),
    )
    build_cache: Optional[str] = None  # default: $STATE_DIRECTORY/engine-cache under systemd, else ~/.cache
    dla_cores: Tuple[int, ...] = field(
        default=(),
        metadata=check(lambda v: len(set(v)) == len(v) and all(0 <= c <= 15 for c in v), "distinct DLA cores 0..15"),
    )  # a fixed-batch engine that has a DLA plan also serves on these cores (AGX Xavier: 0 and 1)
    build_niceness: int = field(default=19, metadata=check(lambda v: 0 <= v <= 19, "0..19 (19: the lowest CPU priority)"))

    def __post_init__(self) -> None:
        if self.build_cache is None:
            return
        cache, engines = os.path.abspath(self.build_cache), os.path.abspath(self.directory)
        if os.path.commonpath([cache, engines]) in (cache, engines):
            raise ValueError(
                "engine.build_cache ({}) and engine.directory ({}) must not contain one another: the cache "
                "deletes its old engines, and the directory is watched for deployed ones".format(cache, engines)
            )


@dataclass(frozen=True)
class PipelineConfig:
    max_batch: int = field(default=8, metadata=check(lambda v: 1 <= v <= 4096, "1..4096"))
    max_wait_ms: float = field(default=5.0, metadata=check(lambda v: 0 <= v <= 10000, "0..10000 ms"))
    in_flight: int = field(default=2, metadata=check(lambda v: 1 <= v <= 16, "1..16"))
    ring_capacity: int = field(default=4096, metadata=check(lambda v: 2 <= v <= 65536, "2..65536 frames"))
    overflow: str = field(
        default="drop_newest",
        metadata=check(lambda v: v in ("drop_newest", "backpressure"), "drop_newest or backpressure"),
    )
    backpressure_timeout_ms: float = field(default=100.0, metadata=check(lambda v: 0 <= v <= 10000, "0..10000 ms"))
    drain_timeout_s: float = field(default=10.0, metadata=check(lambda v: 0 <= v <= 3600, "0..3600 s"))

    def __post_init__(self) -> None:
        if self.ring_capacity < self.max_batch:
            raise ValueError(
                "pipeline.ring_capacity ({}) must hold at least one batch (pipeline.max_batch = {})".format(
                    self.ring_capacity, self.max_batch
                )
            )


@dataclass(frozen=True)
class PublishConfig:
    prefix: str = field(default="PTYCHONN", metadata=check(_is_pv_name, "a PV name prefix"))
    status_period_s: float = field(default=1.0, metadata=check(lambda v: 0.05 <= v <= 3600, "0.05..3600 s"))
    latency_window: int = field(default=10000, metadata=check(lambda v: 10 <= v <= 10**6, "10..1000000"))
    state_directory: Optional[str] = None  # where the last published uniqueId is kept; default $STATE_DIRECTORY
    control: bool = True  # serve P:Control (reset, rescan); false: no client can change the appliance's state
    control_users: Tuple[str, ...] = field(
        default=(), metadata=check(lambda v: all(_USER_NAME.match(u) for u in v), "login names ([A-Za-z0-9._-])"))
    control_hosts: Tuple[str, ...] = field(
        default=(), metadata=check(lambda v: all(_is_ipv4(h) for h in v), "IPv4 addresses (pvAccess matches the "
                                   "client's address, not its name)"))


PIXEL_SIZE_M = check(lambda v: 1e-12 <= v <= 1e-2, "1e-12..0.01 (metres)")
EXTENT_LIMIT_M = 10.0  # farther than any sample stage moves


def _is_extent(value: Tuple[float, float, float, float]) -> bool:
    x_min, x_max, y_min, y_max = value
    return all(abs(v) <= EXTENT_LIMIT_M for v in value) and x_min < x_max and y_min < y_max


@dataclass(frozen=True)
class MosaicConfig:
    enabled: bool = True
    pixel_size_m: Optional[float] = field(default=None, metadata=PIXEL_SIZE_M)
    window: str = field(default="gaussian", metadata=check(lambda v: v in MOSAIC_WINDOWS, ", ".join(MOSAIC_WINDOWS)))
    window_sigma_px: float = field(default=8.0, metadata=check(lambda v: 0.5 <= v <= 4096, "0.5..4096 pixels"))
    publish_period_s: float = field(default=1.0, metadata=check(lambda v: 0.05 <= v <= 3600, "0.05..3600 s"))
    max_pixels: int = field(default=2048 * 2048, metadata=check(lambda v: 1024 <= v <= 2**28, "1024..268435456"))
    extent_m: Optional[Tuple[float, float, float, float]] = field(
        default=None,
        metadata=check(_is_extent, "[x_min, x_max, y_min, y_max] in -10..10 m with min < max"),
    )

    def __post_init__(self) -> None:
        if self.extent_m is None or self.pixel_size_m is None:
            return  # with the manifest's pixel size, the mosaic checks its canvas when it starts
        x_min, x_max, y_min, y_max = self.extent_m
        pixels = ((x_max - x_min) / self.pixel_size_m) * ((y_max - y_min) / self.pixel_size_m)
        if pixels > self.max_pixels:
            raise ValueError(
                "mosaic.extent_m at mosaic.pixel_size_m {:g} m is {:.3g} pixels, more than mosaic.max_pixels "
                "({})".format(self.pixel_size_m, pixels, self.max_pixels)
            )


@dataclass(frozen=True)
class Config:
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    mosaic: MosaicConfig = field(default_factory=MosaicConfig)


MAX_CONFIG_BYTES = 1 << 20  # a hand-written config is a few kB


def load_config(path: str) -> Config:
    """Read and validate a config file; raises SchemaError (or OSError) with the file named."""
    with open(path, "r", encoding="utf-8") as handle:
        text = handle.read(MAX_CONFIG_BYTES + 1)
    if len(text) > MAX_CONFIG_BYTES:
        raise SchemaError(path, ["more than {} characters; a configuration is a few kB".format(MAX_CONFIG_BYTES)])
    return parse_config(text, path)


def parse_config(text: str, source: str = "<config>") -> Config:
    config = schema.load(Config, schema.parse_yaml(text, source), source)
    config = _resolve_paths(config, os.path.dirname(os.path.abspath(source)))
    if isinstance(config.preprocess.mask, str):
        from appliance.preprocess import load_mask_file  # here: preprocess imports the engines, which import config

        try:
            load_mask_file(config.preprocess.mask)
        except ValueError as exc:
            raise SchemaError(source, ["preprocess.mask: {}".format(exc)]) from exc
    return config


def _resolve_paths(config: Config, base: str) -> Config:
    """Relative engine paths are relative to the config file, not to the working directory."""
    engine = config.engine
    directory = os.path.join(base, engine.directory)
    path = os.path.join(base, engine.path) if engine.path else None
    cache = os.path.join(base, engine.build_cache) if engine.build_cache else None
    mask = config.preprocess.mask
    if isinstance(mask, str):
        mask = os.path.join(base, mask)
    return replace(
        config,
        engine=replace(engine, directory=directory, path=path, build_cache=cache),
        preprocess=replace(config.preprocess, mask=mask),
    )


def dump_config(config: Config) -> str:
    return yaml.safe_dump(schema.dump(config), sort_keys=False)
