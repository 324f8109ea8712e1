"""Where an ONNX model's tensors keep their external data, read from the protobuf itself.

A tensor may say its values are in another file (``external_data`` entry
``location``), relative to the model's directory. ONNX Runtime up to 1.19 (the
Jetson's) and TensorRT's ONNX parser open whatever path that is, so a deployed
model could make the appliance read ``/etc/shadow`` or ``../../secret`` into a
weight and stream it out in its results. The appliance therefore checks every
location itself, before either library sees the file. The ``onnx`` package is
not on the device, so the few fields that lead to a tensor are walked here,
with a protobuf wire-format reader of its own.
"""
from __future__ import annotations

import mmap
import os
import stat
from typing import Dict, Iterator, List, Tuple, Union

from appliance.engines.errors import EngineError
from appliance.engines.files import open_regular_file

Buffer = Union[bytes, mmap.mmap, memoryview]

# message -> {field number: message it holds}, from onnx.proto: only the paths that can reach a TensorProto.
_MESSAGES: Dict[str, Dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},  # TensorProto.external_data: StringStringEntryProto
}
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5


class _Malformed(ValueError):
    pass


def _varint(data: memoryview, at: int, end: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= end or shift > 63:
            raise _Malformed("truncated varint at byte {}".format(at))
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def _fields(data: memoryview, start: int, end: int) -> Iterator[Tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in data[start:end].

    Everything else is skipped as protobuf itself would, groups included: what
    protobuf reads as a field, this reads as the same field.
    """
    at, groups = start, []  # groups: numbers of the (deprecated) groups we are inside, skipped whole
    while at < end:
        key, at = _varint(data, at, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, at = _varint(data, at, end)
        elif wire == _FIXED64:
            at += 8
        elif wire == _FIXED32:
            at += 4
        elif wire == _LENGTH:
            length, at = _varint(data, at, end)
            if at + length > end:
                raise _Malformed("field {} runs past its message at byte {}".format(number, at))
            if not groups:
                yield number, at, at + length
            at += length
        elif wire == _START_GROUP:
            groups.append(number)
        elif wire == _END_GROUP and groups and groups[-1] == number:
            groups.pop()
        else:
            raise _Malformed("wire type {} at byte {}".format(wire, at))
    if at != end or groups:
        raise _Malformed("a field runs past its message at byte {}".format(end))


def _entry(data: memoryview, start: int, end: int) -> Tuple[str, str]:
    parts = {number: bytes(data[a:b]).decode("utf-8", "replace") for number, a, b in _fields(data, start, end)}
    return parts.get(_ENTRY_KEY, ""), parts.get(_ENTRY_VALUE, "")


def external_data_locations(model: Buffer) -> List[str]:
    """Every ``location`` any tensor of the serialized ModelProto names, subgraphs and functions included.

    Walked with a stack, not recursion: nesting is as deep as the file says.
    """
    locations: List[str] = []
    with memoryview(model) as data:
        stack = [("model", 0, len(data))]
        try:
            while stack:
                kind, start, end = stack.pop()
                if kind == "entry":
                    key, value = _entry(data, start, end)
                    if key == "location":
                        locations.append(value)
                    continue
                children = _MESSAGES[kind]
                stack.extend((children[n], a, b) for n, a, b in _fields(data, start, end) if n in children)
        except _Malformed:
            pass  # not protobuf (truncated, random bytes): the backend's own loader refuses it, with its reason
    return locations


def check_external_data(path: str, model: Buffer) -> None:
    """EngineError unless every external data file of ``model`` (the bytes of ``path``) is a regular file
    inside the model's directory: no absolute path, no ``..`` out of it, no symlink out of it."""
    directory = os.path.dirname(os.path.abspath(path))
    for location in external_data_locations(model):
        _check_location(path, directory, location)


def check_external_data_of(path: str) -> None:
    """:func:`check_external_data` of the model file ``path`` (mapped, not read: models can be large)."""
    with open_regular_file(path) as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            check_external_data(path, mapped)


def _check_location(path: str, directory: str, location: str) -> None:
    shown = repr(location[:200])
    if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
        raise EngineError("{}: external data location {} is not a path relative to the model's directory".format(
            path, shown))
    if os.path.normpath(location).split(os.sep)[0] == os.pardir:
        raise EngineError("{}: external data location {} leaves the model's directory".format(path, shown))
    target = os.path.realpath(os.path.join(directory, location))
    if os.path.commonpath([target, os.path.realpath(directory)]) != os.path.realpath(directory):
        raise EngineError("{}: external data location {} leads out of the model's directory (to {})".format(
            path, shown, target))
    try:
        mode = os.stat(target).st_mode
    except OSError as exc:
        raise EngineError("{}: external data location {}: {}".format(path, shown, exc.strerror or exc)) from exc
    if not stat.S_ISREG(mode):
        raise EngineError("{}: external data location {} is not a regular file".format(path, shown))
