"""Config validation and the CLI's refusal paths: clear message, exit 2, nothing started."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from appliance.config import load_config, parse_config
from appliance.schema import SchemaError

from onnx_models import affine_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_defaults_are_valid_and_documented():
    config = parse_config("")
    assert config.pipeline.max_batch == 8 and config.detector.queue_size >= 100
    documented = open(os.path.join(ROOT, "docs", "configuration.md")).read()
    from appliance.schema import dump

    for section, values in dump(config).items():
        for key in values:
            assert "`{}.{}`".format(section, key) in documented, "{}.{} is not documented".format(section, key)


def test_every_problem_is_reported_with_its_key_path_value_and_expectation():
    text = """
pipeline: {max_batch: 0, max_wait_ms: fast, typo: 1}
detector: {pv: "has space", queue_size: 10.5}
preprocess: {crop: [1, 2, 3]}
engine: {backend: cuda}
unknown_section: {}
"""
    with pytest.raises(SchemaError) as error:
        parse_config(text, "site.yaml")
    message = str(error.value)
    for expected in [
        "pipeline.max_batch: got 0 (int); expected 1..4096",
        "pipeline.max_wait_ms: got 'fast' (str); expected a finite number",
        "pipeline.typo: unknown key",
        "detector.pv: got 'has space' (str); expected a PV name",
        "detector.queue_size: got 10.5 (float); expected an integer",
        "preprocess.crop: got [1, 2, 3] (list); expected a list of 4 items",
        "engine.backend: got 'cuda' (str); expected auto, onnxruntime or tensorrt",
        "unknown_section: unknown key",
    ]:
        assert expected in message
    assert message.startswith("site.yaml: 8 problem(s)")


def test_cross_field_constraint_names_both_keys():
    with pytest.raises(SchemaError, match=r"ring_capacity \(4\) must hold at least one batch \(pipeline.max_batch = 8\)"):
        parse_config("pipeline: {ring_capacity: 4}")


def test_relative_engine_paths_are_relative_to_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine: {directory: engines, path: engines/m.onnx, build_cache: cache}\n")
    config = load_config(str(path))
    assert config.engine.directory == str(tmp_path / "engines")
    assert config.engine.path == str(tmp_path / "engines" / "m.onnx")
    assert config.engine.build_cache == str(tmp_path / "cache")


@pytest.mark.parametrize("cache", ["/srv/engines", "/srv/engines/cache", "/srv"])
def test_the_build_cache_and_the_engines_directory_must_be_apart(cache):
    with pytest.raises(SchemaError, match=r"engine.build_cache \({}\) and engine.directory \(/srv/engines\) must not".format(
            cache)):
        parse_config("engine: {{directory: /srv/engines, build_cache: {}}}".format(cache))
    parse_config("engine: {directory: /srv/engines, build_cache: /srv/engine-cache}")


def test_check_config_prints_the_effective_config_or_the_errors(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("pipeline: {max_batch: 16}\n")
    result = cli("check-config", str(good))
    assert result.returncode == 0 and "max_batch: 16" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: {max_batch: -3}\n")
    result = cli("check-config", str(bad))
    assert result.returncode == 2
    assert "pipeline.max_batch: got -3 (int); expected 1..4096" in result.stderr
    bad.write_text("pipeline: [unclosed\n")
    result = cli("check-config", str(bad))
    assert result.returncode == 2 and "not valid YAML" in result.stderr


def test_run_with_a_bad_config_exits_2_before_starting_anything(tmp_path, appliance_env):
    bad = tmp_path / "bad.yaml"
    bad.write_text("publish: {prefix: 'X Y'}\n")
    result = cli("run", "--config", str(bad), env=appliance_env)
    assert result.returncode == 2
    assert "publish.prefix: got 'X Y' (str); expected a PV name prefix" in result.stderr
    result = cli("run", "--config", str(tmp_path / "missing.yaml"), env=appliance_env)
    assert result.returncode == 2 and "missing.yaml" in result.stderr


def test_run_with_a_bad_engine_path_exits_2(tmp_path, appliance_env):
    config = tmp_path / "c.yaml"
    config.write_text("detector: {pv: BADENGINE:Det}\nengine: {path: nowhere.onnx}\npublish: {prefix: BADENGINE}\n")
    result = cli("run", "--config", str(config), env=appliance_env)
    assert result.returncode == 2
    assert "nowhere.onnx: cannot read: No such file or directory" in result.stderr
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model" * 10)
    config.write_text("detector: {pv: BADENGINE:Det}\nengine: {path: junk.onnx}\npublish: {prefix: BADENGINE}\n")
    result = cli("run", "--config", str(config), env=appliance_env)
    assert result.returncode == 2
    assert "junk.onnx: not a loadable ONNX model" in result.stderr


def test_inspect_engine_reports_names_shapes_and_batch(tmp_path):
    model = affine_model(str(tmp_path / "fixed.onnx"), batch=8, size=64, amplitude_name="amp_out")
    result = cli("inspect-engine", model)
    assert result.returncode == 0, result.stderr
    assert "input:    input.1 float32x1x64x64 (image 64x64)" in result.stdout
    assert "output:   phase = 94 float32x1x64x64" in result.stdout
    assert "output:   amplitude = amp_out" in result.stdout
    assert "batch:    fixed batch 8" in result.stdout
    result = cli("inspect-engine", str(tmp_path / "absent.onnx"))
    assert result.returncode == 2 and "no such engine file" in result.stderr


def test_ambiguous_outputs_must_be_declared_in_the_manifest(tmp_path):
    from appliance.engines import open_engine
    from appliance.engines.errors import EngineError
    from appliance.engines.manifest import Manifest, write_manifest

    model = affine_model(str(tmp_path / "two.onnx"), size=16, output_name="95", amplitude_name="96")
    with pytest.raises(EngineError, match=r"cannot tell which of the outputs \['95', '96'\] is the phase"):
        open_engine(model)
    write_manifest(model, Manifest(outputs={"phase": "95", "amplitude": "96"}))
    engine = open_engine(model)
    assert engine.io.outputs["phase"].name == "95" and engine.io.outputs["amplitude"].name == "96"


def test_a_manifest_sha256_that_does_not_match_rejects_the_file(tmp_path):
    from appliance.engines import open_engine
    from appliance.engines.errors import EngineError
    from appliance.engines.files import file_sha256
    from appliance.engines.manifest import Manifest, write_manifest

    model = affine_model(str(tmp_path / "m.onnx"), size=16)
    write_manifest(model, Manifest(sha256="0" * 64))
    with pytest.raises(EngineError, match="sha256 is .* but its manifest says 0000"):
        open_engine(model)
    write_manifest(model, Manifest(sha256=file_sha256(model)))
    assert open_engine(model).sha256 == file_sha256(model)


def test_the_shipped_example_config_is_valid():
    result = cli("check-config", os.path.join(ROOT, "systemd", "config.example.yaml"))
    assert result.returncode == 0, result.stderr


# A stand-in for an environment without matplotlib, whether or not this one has it: the import fails
# as it does where the package is not installed.
_WITHOUT_MATPLOTLIB = """
import sys
class Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError("No module named 'matplotlib'")
sys.meta_path.insert(0, Uninstalled())
from appliance.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_command_missing_an_optional_part_names_its_extra_before_doing_any_work(tmp_path):
    out = tmp_path / "demo-output"
    run = subprocess.run([sys.executable, "-c", _WITHOUT_MATPLOTLIB, "demo", "--points", "20", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "ptychonn-edge demo needs matplotlib" in run.stderr and "pip install 'ptychonn-edge[demo]'" in run.stderr
    assert run.stdout == "" and not out.exists()  # nothing simulated, nothing written
