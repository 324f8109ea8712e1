"""NTNDArray, the areaDetector image structure, as numpy arrays and frame metadata.

This module reads and fills pvData structures through the interface pvapy's
PvObject gives them (its typed accessors where a frame's cost is at stake); it
never imports pvapy. The image comes back as the zero-copy view pvapy hands out
(decompressed when a codec is set): the only copy of a frame's pixels is the one
ingest makes into the ring (the structure kept for publishing shares them).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from appliance.compression import CodecError, decompress
from appliance.engines.errors import first_line

# NTNDArray value-union member <-> numpy dtype.
UNION_FIELD_DTYPES: Dict[str, np.dtype] = {
    "booleanValue": np.dtype(np.bool_),
    "byteValue": np.dtype(np.int8),
    "ubyteValue": np.dtype(np.uint8),
    "shortValue": np.dtype(np.int16),
    "ushortValue": np.dtype(np.uint16),
    "intValue": np.dtype(np.int32),
    "uintValue": np.dtype(np.uint32),
    "longValue": np.dtype(np.int64),
    "ulongValue": np.dtype(np.uint64),
    "floatValue": np.dtype(np.float32),
    "doubleValue": np.dtype(np.float64),
}
DTYPE_UNION_FIELDS = {dtype: name for name, dtype in UNION_FIELD_DTYPES.items()}

# pvData ScalarType codes: NDPluginCodec stores the uncompressed type in codec.parameters.
SCALAR_TYPE_DTYPES: Dict[int, np.dtype] = {
    0: np.dtype(np.bool_),
    1: np.dtype(np.int8),
    2: np.dtype(np.int16),
    3: np.dtype(np.int32),
    4: np.dtype(np.int64),
    5: np.dtype(np.uint8),
    6: np.dtype(np.uint16),
    7: np.dtype(np.uint32),
    8: np.dtype(np.uint64),
    9: np.dtype(np.float32),
    10: np.dtype(np.float64),
}
DTYPE_SCALAR_TYPES = {dtype: code for code, dtype in SCALAR_TYPE_DTYPES.items()}

TimeStamp = Tuple[int, int, int]  # secondsPastEpoch, nanoseconds, userTag


class FrameError(ValueError):
    """A frame that cannot be used; ``reason`` names the drop counter it goes to."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FrameMeta:
    """What travels with a frame from the detector PV to every output PV.

    A received frame keeps its NTNDArray as ``carrier``: a pvData copy of the
    received structure (arrays shared, not copied) made in C++. Publishing sends
    that structure on with the result in place of the pixels, so the times,
    attributes and everything else a detector put there reach the output without
    being turned into Python objects and back (that round trip cost more than the
    rest of the frame's trip). The Python views below are read from it only when
    something asks (the mosaic for positions, tests and viewers for the rest).
    """

    __slots__ = ("unique_id", "carrier", "image_shape", "codec", "_position_names", "_read")

    def __init__(
        self,
        unique_id: int,
        timestamp: TimeStamp = (0, 0, 0),
        data_timestamp: TimeStamp = (0, 0, 0),
        attributes: Sequence[Any] = (),
        position: Optional[Tuple[float, float]] = None,
    ) -> None:
        """Metadata made here (tests, benchmarks, the mosaic's own picture): no carrier."""
        self.unique_id = unique_id
        self.carrier: Any = None
        self.image_shape: Optional[Tuple[int, int]] = None
        self.codec = ""
        self._position_names: Tuple[str, str] = ("", "")
        self._read: Dict[str, Any] = {"timestamp": timestamp, "data_timestamp": data_timestamp,
                                      "attributes": attributes, "position": position}

    @classmethod
    def received(cls, unique_id: int, carrier: Any, image_shape: Tuple[int, int], codec: str,
                 position_names: Tuple[str, str]) -> "FrameMeta":
        meta = cls(unique_id)
        meta.carrier, meta.image_shape, meta.codec = carrier, image_shape, codec
        meta._position_names = position_names
        meta._read = {}
        return meta

    def _field(self, name: str) -> Any:
        if name not in self._read:
            self._read[name] = _READERS[name](self)
        return self._read[name]

    @property
    def timestamp(self) -> TimeStamp:
        return self._field("timestamp")  # type: ignore[no-any-return]

    @property
    def data_timestamp(self) -> TimeStamp:
        return self._field("data_timestamp")  # type: ignore[no-any-return]

    @property
    def attributes(self) -> Sequence[Any]:
        """As received; published unchanged."""
        return self._field("attributes")  # type: ignore[no-any-return]

    @property
    def position(self) -> Optional[Tuple[float, float]]:
        """Sample (x, y) from the configured attributes; None unless both are finite numbers."""
        return self._field("position")  # type: ignore[no-any-return]


_READERS = {
    "timestamp": lambda meta: _timestamp(meta.carrier.getStructure("timeStamp")),
    "data_timestamp": lambda meta: _timestamp(meta.carrier.getStructure("dataTimeStamp")),
    "attributes": lambda meta: meta.carrier["attribute"],
    "position": lambda meta: _position(meta.attributes, meta._position_names),
}


ShapeCheck = Callable[[Tuple[int, int], int], Any]
Header = Tuple[int, str]  # uniqueId, the selected value-union member ("" when empty)


def header(pv: Any) -> Header:
    """What says whether an update is a frame at all, read first and cheaply."""
    try:
        return int(pv.getInt("uniqueId")), pv.getSelectedUnionFieldName("value")
    except Exception as exc:  # pvapy raises its own types for a missing or mistyped field
        raise FrameError("not_ntndarray", "update is not an NTNDArray (expected an int uniqueId and a value "
                                          "union): {}".format(first_line(exc))) from exc


def decode(pv: Any, position_names: Tuple[str, str], check_shape: Optional[ShapeCheck] = None,
           known_header: Optional[Header] = None) -> Tuple[np.ndarray, FrameMeta]:
    """The (rows, columns) image and metadata of one received NTNDArray.

    Runs on the receive thread for every frame, so it reads only what it must,
    through pvapy's typed accessors (a generic ``pv[name]`` read builds Python
    objects for the whole field). ``check_shape(shape, unique_id)`` may refuse
    the image size before anything is decompressed: a small payload can declare
    a huge image. ``known_header`` saves reading :func:`header` again.
    Raises FrameError for anything that does not describe a 2-D image.
    """
    unique_id, field = known_header or header(pv)
    if not field:
        raise FrameError("empty", "uniqueId {}: value union is empty".format(unique_id))
    width, height = _image_size(pv["dimension"], unique_id)
    if check_shape is not None:
        check_shape((height, width), unique_id)
    data = pv.getUnion("value")[field]
    codec = pv.getString("codec.name")
    if codec:
        data = _decompress(pv["codec"], data, int(pv["uncompressedSize"]), width * height, unique_id)
    if data.size != width * height:
        raise FrameError(
            "size",
            "uniqueId {}: value has {} elements of {}; dimension says {}x{} = {}".format(
                unique_id, data.size, data.dtype.name, height, width, width * height
            ),
        )
    meta = FrameMeta.received(unique_id, pv.copy(), (height, width), codec, position_names)
    return data.reshape(height, width), meta


def _decompress(codec: Mapping[str, Any], payload: np.ndarray, size: int, elements: int, unique_id: int) -> np.ndarray:
    parameters = codec["parameters"][0]
    code = parameters.get("value") if isinstance(parameters, dict) else None
    dtype = SCALAR_TYPE_DTYPES.get(code) if isinstance(code, int) else None
    if dtype is None:
        raise FrameError(
            "codec",
            "uniqueId {}: codec {} without a valid data type in codec.parameters (got {!r}; expected a pvData "
            "ScalarType code 0..10)".format(unique_id, codec["name"], code),
        )
    if size != elements * dtype.itemsize:
        raise FrameError(
            "size",
            "uniqueId {}: uncompressedSize {} bytes; dimension says {} elements of {} = {} bytes".format(
                unique_id, size, elements, dtype.name, elements * dtype.itemsize),
        )
    try:
        return decompress(codec["name"], payload, dtype, size)
    except CodecError as exc:
        raise FrameError(exc.reason, "uniqueId {}: {}".format(unique_id, exc)) from exc


def _image_size(dimensions: Sequence[Mapping[str, Any]], unique_id: int) -> Tuple[int, int]:
    """(width, height): dimension[0] is x, the fastest-varying axis."""
    if len(dimensions) != 2:
        raise FrameError(
            "shape",
            "uniqueId {}: {} dimensions; expected 2 (a monochrome image)".format(unique_id, len(dimensions)),
        )
    width, height = int(dimensions[0]["size"]), int(dimensions[1]["size"])
    if width <= 0 or height <= 0:
        raise FrameError("shape", "uniqueId {}: dimension sizes {}x{}; expected positive".format(unique_id, height, width))
    return width, height


def _timestamp(value: Mapping[str, int]) -> TimeStamp:
    return int(value["secondsPastEpoch"]), int(value["nanoseconds"]), int(value["userTag"])


def attribute_value(attribute: Mapping[str, Any]) -> Any:
    """The plain value of one received NTAttribute (its ``value`` is a variant union)."""
    return attribute["value"][0].get("value")


def _position(attributes: Sequence[Mapping[str, Any]], names: Tuple[str, str]) -> Optional[Tuple[float, float]]:
    found: Dict[str, float] = {}
    for attribute in attributes:
        name = attribute["name"]
        if name in names:
            value = attribute_value(attribute)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                found[name] = float(value)
    if names[0] in found and names[1] in found:
        return found[names[0]], found[names[1]]
    return None


def now_stamp() -> TimeStamp:
    """The current time as an EPICS timeStamp (POSIX seconds here; pvData uses the POSIX epoch)."""
    seconds = time.time()
    return int(seconds), int((seconds % 1.0) * 1e9), 0


def dimensions(height: int, width: int) -> List[Dict[str, Any]]:
    """The NTNDArray dimension array for a (height, width) image."""
    return [
        {"size": width, "offset": 0, "fullSize": width, "binning": 1, "reverse": False},
        {"size": height, "offset": 0, "fullSize": height, "binning": 1, "reverse": False},
    ]


def timestamp_field(stamp: TimeStamp) -> Dict[str, int]:
    return {"secondsPastEpoch": stamp[0], "nanoseconds": stamp[1], "userTag": stamp[2]}


def published_dtype(dtype: Any) -> np.dtype:
    """The pixel type an output of ``dtype`` goes out as.

    NTNDArray has no half-precision member, and FP16 TensorRT engines often
    have float16 outputs: those go out as float32, the type viewers expect.
    Raises ValueError for a type no NTNDArray member can carry (complex, say).
    """
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return np.dtype(np.float32)
    if dtype not in DTYPE_UNION_FIELDS:
        raise ValueError("no NTNDArray value field for dtype {}; expected one of {}".format(
            dtype, ", ".join(sorted(d.name for d in DTYPE_UNION_FIELDS)) + " or float16"))
    return dtype


def union_field(dtype: Any) -> str:
    """The value-union member that carries pixels of ``dtype`` (after :func:`published_dtype`)."""
    return DTYPE_UNION_FIELDS[published_dtype(dtype)]
