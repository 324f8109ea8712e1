"""Turn parsed YAML into frozen dataclasses, rejecting anything unexpected.

The config file and the engine manifests are both hand-edited YAML read by a
service that nobody watches start. Every mistake must therefore be reported
before anything runs, all at once, each with the key path, the offending value
and what was expected, so one edit fixes them all.

A dataclass field may carry ``metadata={"check": (predicate, "expectation")}``
for constraints beyond the type (ranges, patterns).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Dict, List, Mapping, Tuple, Type, TypeVar

import yaml

T = TypeVar("T")

_NONE_TYPE = type(None)
_SHOWN_PROBLEMS = 50  # in a SchemaError's message; all of them stay in .problems
EXCERPT_CHARS = 60  # of a value quoted in a message: a hostile document must not make the message huge


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return "{}... ({} characters)".format(text[:limit], len(text))


class _AliasFreeLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases: a few lines of aliases can stand for billions of nodes
    (the "billion laughs"), which checking and quoting would then walk; hand-written config needs none."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*{}) are not accepted; write the value out".format(excerpt(str(event.anchor))),
                event.start_mark,
            )
        return super().compose_node(parent, index)


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document ``text`` as plain data; SchemaError naming ``source`` if it is not valid or uses aliases."""
    try:
        return yaml.load(text, Loader=_AliasFreeLoader)
    except yaml.YAMLError as exc:
        raise SchemaError(source, ["not valid YAML: {}".format(excerpt(str(exc), 400))]) from exc


class SchemaError(ValueError):
    """All problems found in one document, one line each."""

    def __init__(self, source: str, problems: List[str]) -> None:
        self.source = source
        self.problems = problems
        shown = problems[:_SHOWN_PROBLEMS]
        more = ["  ... and {} more".format(len(problems) - len(shown))] if len(problems) > len(shown) else []
        super().__init__(
            "{}: {} problem(s)\n".format(source, len(problems)) + "\n".join(["  - " + p for p in shown] + more)
        )


def check(predicate: Any, expectation: str) -> Dict[str, Any]:
    """Field metadata for a value constraint, e.g. ``field(default=1, metadata=check(...))``."""
    return {"check": (predicate, expectation)}


def load(cls: Type[T], data: Any, source: str) -> T:
    """Build ``cls`` from ``data`` or raise :class:`SchemaError` listing every problem."""
    problems: List[str] = []
    value = _convert(cls, data, "", problems)
    if problems:
        raise SchemaError(source, problems)
    return value


def dump(value: Any) -> Any:
    """The plain (YAML-ready) form of a loaded dataclass tree."""
    if dataclasses.is_dataclass(value):
        return {f.name: dump(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [dump(v) for v in value]
    if isinstance(value, dict):
        return {k: dump(v) for k, v in value.items()}
    return value


def _describe(value: Any) -> str:
    return "{} ({})".format(excerpt(repr(value)), type(value).__name__)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is float:
        return "a finite number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(
            "null" if a is _NONE_TYPE else _type_name(a) for a in typing.get_args(tp)
        )
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return "a list of " + _type_name(args[0])
        return "a list of {} items ({})".format(len(args), ", ".join(_type_name(a) for a in args))
    if origin in (dict, Dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return str(tp)


def _convert(tp: Any, data: Any, path: str, problems: List[str]) -> Any:
    where = path or "(top level)"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, data, path, problems)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if data is None and _NONE_TYPE in args:
            return None
        for arg in args:
            if arg is _NONE_TYPE:
                continue
            trial: List[str] = []
            value = _convert(arg, data, path, trial)
            if not trial:
                return value
        problems.append("{}: got {}; expected {}".format(where, _describe(data), _type_name(tp)))
        return None
    if origin is typing.Literal:
        if data in typing.get_args(tp):
            return data
        problems.append("{}: got {}; expected {}".format(where, _describe(data), _type_name(tp)))
        return None
    if origin in (tuple, Tuple):
        return _convert_tuple(tp, data, path, problems)
    if origin in (dict, Dict, Mapping):
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(data, dict):
            problems.append("{}: got {}; expected a mapping".format(where, _describe(data)))
            return None
        return {
            _convert(key_tp, k, _join(path, str(k)), problems): _convert(
                value_tp, v, _join(path, str(k)), problems
            )
            for k, v in data.items()
        }
    return _convert_scalar(tp, data, where, problems)


def _convert_scalar(tp: Any, data: Any, where: str, problems: List[str]) -> Any:
    ok = False
    if tp is bool:
        ok = isinstance(data, bool)
    elif tp is int:
        ok = isinstance(data, int) and not isinstance(data, bool)
    elif tp is float:  # never inf or nan: no setting means "forever", and nan passes no range check
        ok = isinstance(data, (int, float)) and not isinstance(data, bool) and _finite(data)
        data = float(data) if ok else data
    elif tp is str:
        ok = isinstance(data, str)
    if not ok:
        problems.append("{}: got {}; expected {}".format(where, _describe(data), _type_name(tp)))
        return None
    return data


def _convert_tuple(tp: Any, data: Any, path: str, problems: List[str]) -> Any:
    where = path or "(top level)"
    args = typing.get_args(tp)
    if not isinstance(data, (list, tuple)):
        problems.append("{}: got {}; expected {}".format(where, _describe(data), _type_name(tp)))
        return None
    if len(args) == 2 and args[1] is Ellipsis:
        item_types = [args[0]] * len(data)
    elif len(args) != len(data):
        problems.append("{}: got {}; expected {}".format(where, _describe(data), _type_name(tp)))
        return None
    else:
        item_types = list(args)
    return tuple(
        _convert(t, d, "{}[{}]".format(path, i), problems)
        for i, (t, d) in enumerate(zip(item_types, data))
    )


def _convert_dataclass(cls: Any, data: Any, path: str, problems: List[str]) -> Any:
    where = path or "(top level)"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append("{}: got {}; expected {}".format(where, _describe(data), _type_name(cls)))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            problems.append(
                "{}: unknown key; expected one of {}".format(
                    _join(path, str(key)), ", ".join(sorted(fields))
                )
            )
    kwargs: Dict[str, Any] = {}
    for name, field in fields.items():
        key_path = _join(path, name)
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                if dataclasses.is_dataclass(hints[name]):
                    kwargs[name] = _convert(hints[name], {}, key_path, problems)
                else:
                    problems.append("{}: missing; expected {}".format(key_path, _type_name(hints[name])))
            continue
        before = len(problems)
        value = _convert(hints[name], data[name], key_path, problems)
        if len(problems) == before and "check" in field.metadata and value is not None:
            predicate, expectation = field.metadata["check"]
            if not predicate(value):
                problems.append("{}: got {}; expected {}".format(key_path, _describe(data[name]), expectation))
        kwargs[name] = value
    if len(problems):
        return None
    try:
        return cls(**kwargs)
    except ValueError as exc:  # cross-field checks in __post_init__
        problems.append("{}: {}".format(where, exc))
        return None


def _finite(number: Any) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int beyond any float
        return False


def _join(path: str, key: str) -> str:
    return "{}.{}".format(path, excerpt(key)) if path else excerpt(key)
