"""A config that passes check-config must be one the service can run with: every number bounded.

Values from an adversarial review that passed the check and then failed at
start, on SIGTERM or in the mosaic; YAML built to make the check itself the
attack.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Iterator, List, Tuple

import pytest
import yaml

from appliance.config import Config, load_config, parse_config
from appliance.schema import SchemaError


def numeric_keys() -> Iterator[Tuple[str, str, Any]]:
    """(section, key, type) of every number (or list of numbers) in the config."""
    for section, section_type in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(section_type)
        for key in dataclasses.fields(section_type):
            tp = hints[key.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            inner = args[0] if typing.get_origin(tp) is typing.Union else tp
            items = typing.get_args(inner) if typing.get_origin(inner) is tuple else (inner,)
            if all(t in (int, float) for t in items) and items:
                yield section, key.name, inner


def extreme_values(tp: Any) -> List[Any]:
    """Values no setting can mean: non-finite, or far beyond any machine."""
    items = typing.get_args(tp) if typing.get_origin(tp) is tuple else (tp,)
    scalar = [float("inf"), float("-inf"), float("nan"), 1e300, -1e300] if float in items else [10**15, -(10**15)]
    if typing.get_origin(tp) is tuple:
        return [[v] * len(items) for v in scalar] + [[0, v] * (len(items) // 2) for v in scalar]
    return scalar


NUMERIC_KEYS = list(numeric_keys())


def test_the_config_has_numeric_keys_to_check():
    assert len(NUMERIC_KEYS) >= 20  # the walk above finds them (a refactor must not make this test vacuous)


@pytest.mark.parametrize("section, key, tp", NUMERIC_KEYS, ids=["{}.{}".format(s, k) for s, k, _ in NUMERIC_KEYS])
def test_every_number_is_finite_and_bounded(section, key, tp):
    for value in extreme_values(tp):
        text = yaml.safe_dump({section: {key: value}})
        with pytest.raises(SchemaError) as error:
            parse_config(text, "site.yaml")
        assert "{}.{}: got".format(section, key) in str(error.value), (value, str(error.value))


@pytest.mark.parametrize("text, message", [
    ("pipeline: {drain_timeout_s: .inf}", "pipeline.drain_timeout_s: got inf (float); expected a finite number"),
    ("pipeline: {backpressure_timeout_ms: .inf}", "pipeline.backpressure_timeout_ms: got inf (float); expected a finite"),
    ("pipeline: {drain_timeout_s: 1.0e+9}", "pipeline.drain_timeout_s: got 1000000000.0 (float); expected 0..3600 s"),
    ("pipeline: {ring_capacity: 10000000}", "pipeline.ring_capacity: got 10000000 (int); expected 2..65536 frames"),
    ("engine: {cpu_threads: 100000}", "engine.cpu_threads: got 100000 (int); expected 0 (library default)..256"),
    ("mosaic: {extent_m: [-.inf, .inf, 0, 1]}", "mosaic.extent_m: got [-inf, inf, 0, 1] (list); expected a list of 4 items (a finite number"),
    ("mosaic: {extent_m: [0, 1.0e+10, 0, 1]}", "mosaic.extent_m: got [0, 10000000000.0, 0, 1] (list); expected "
                                              "[x_min, x_max, y_min, y_max] in -10..10 m with min < max"),
    ("mosaic: {pixel_size_m: .inf}", "mosaic.pixel_size_m: got inf (float); expected a finite number or null"),
])
def test_values_that_passed_the_check_and_then_failed_are_refused(text, message):
    with pytest.raises(SchemaError) as error:
        parse_config(text, "site.yaml")
    assert message in str(error.value)


def test_a_fixed_mosaic_extent_must_fit_the_canvas_budget():
    with pytest.raises(SchemaError, match=r"mosaic.extent_m at mosaic.pixel_size_m 1e-08 m is 1e\+10 pixels, "
                                          r"more than mosaic.max_pixels \(4194304\)"):
        parse_config("mosaic: {pixel_size_m: 1.0e-8, extent_m: [0, 0.001, 0, 0.001]}")
    assert parse_config("mosaic: {pixel_size_m: 1.0e-6, extent_m: [0, 0.001, 0, 0.001]}").mosaic.extent_m


def alias_bomb(levels: int) -> str:
    """The "billion laughs": each level ten aliases of the one before, under a key that wants a string."""
    lines = ["a0: &a0 [lol]"]
    for level in range(1, levels + 1):
        lines.append("a{}: &a{} [{}]".format(level, level, ", ".join(["*a{}".format(level - 1)] * 10)))
    lines.append("detector: {{pv: *a{}}}".format(levels))
    return "\n".join(lines)


def test_yaml_aliases_are_refused_before_anything_walks_them():
    with pytest.raises(SchemaError) as error:
        parse_config(alias_bomb(6), "bomb.yaml")  # a million strings, were it expanded
    message = str(error.value)
    assert message.startswith("bomb.yaml: 1 problem(s)") and "aliases (*a0) are not accepted" in message
    assert len(message) < 1000


def test_messages_quote_a_bounded_excerpt_of_a_value_and_of_a_key():
    long_pv, long_key = "X" * 100000, "k" * 100000
    with pytest.raises(SchemaError) as error:
        parse_config(yaml.safe_dump({"detector": {"pv": [long_pv], long_key: 1}}), "site.yaml")
    message = str(error.value)
    assert "detector.pv: got ['" + "X" * 50 in message and "... (100004 characters) (list)" in message
    assert "detector." + "k" * 60 + "... (100000 characters): unknown key" in message
    assert len(message) < 1000


def test_a_thousand_problems_are_counted_and_fifty_shown():
    with pytest.raises(SchemaError) as error:
        parse_config(yaml.safe_dump({"detector": {"key{}".format(i): 1 for i in range(1000)}}), "site.yaml")
    assert len(error.value.problems) == 1000
    message = str(error.value)
    assert message.startswith("site.yaml: 1000 problem(s)") and message.endswith("  ... and 950 more")


def test_a_config_file_over_a_mebibyte_is_refused_unparsed(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# padding\n" * 200000)
    with pytest.raises(SchemaError, match="more than 1048576 characters"):
        load_config(str(path))
