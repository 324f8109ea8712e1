"""scripts/install.sh installs the cuda-python that fits the machine's CUDA driver.

The wrong one imports fine and then fails CUDA initialisation, and ``engine.backend: auto``
quietly serves from the CPU. .ci/check_wheels.py resolves the same extras against PyPI.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from installer import ROOT, run_installer

JETSON_RELEASE = {  # the first line of /etc/nv_tegra_release
    "JetPack 5.1.1": "# R35 (release), REVISION: 3.1, GCID: 32827747, BOARD: t186ref, EABI: aarch64, DATE: Sun Mar 19",
    "JetPack 6.2": "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8",
    "JetPack 4.6": "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t186ref, EABI: aarch64, DATE: Sat Feb 19",
}


def _check_wheels():
    spec = importlib.util.spec_from_file_location("check_wheels", os.path.join(ROOT, ".ci", "check_wheels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extras(tmp_path, jetpack: str, driver: str, tensorrt: bool):
    release = tmp_path / "nv_tegra_release"
    if jetpack:
        release.write_text(JETSON_RELEASE[jetpack] + "\n")
    return run_installer('platform_extras "$1" "$2" "$3"', str(release), driver, "1" if tensorrt else "0")


@pytest.mark.parametrize("jetpack, driver, tensorrt, extras", [
    # ONNX Runtime everywhere: a TensorRT that imports but cannot serve still serves, on the CPU
    ("JetPack 5.1.1", "", True, "jetson5,cpu"),
    ("JetPack 6.2", "540.4.0", True, "jetson6,cpu"),
    ("JetPack 6.2", "540.4.0", False, "jetson6,cpu"),
    ("", "580.65.06", True, "cuda13,cpu"),
    ("", "535.183.01", True, "cuda12,cpu"),
    ("", "470.256.02", True, "cuda11,cpu"),
    ("", "", True, "cpu"),  # TensorRT but no driver
    ("", "535.183.01", False, "cpu"),
])
def test_installer_picks_the_extra_of_the_jetpack_or_driver(tmp_path, jetpack, driver, tensorrt, extras):
    result = _extras(tmp_path, jetpack, driver, tensorrt)
    assert (result.returncode, result.stdout.strip()) == (0, extras), result.stderr


def test_installer_refuses_a_jetpack_it_has_no_cuda_python_for(tmp_path):
    result = _extras(tmp_path, "JetPack 4.6", "", True)
    assert result.returncode != 0 and result.stdout == ""
    assert "Jetson Linux R32" in result.stderr and "--extras" in result.stderr, result.stderr


# What pip took for the old unpinned cuda-python>=11.8 (pip download, for the JetPack's Python and
# glibc): 12.3.0 imports on JetPack 5.1, then fails on its CUDA 11.4 driver. And a wheel that fits.
UNPINNED_PICK = {"jetson5": "12.3.0", "jetson6": "13.4.4"}
FITTING = {"jetson5": "11.8.2", "jetson6": "12.9.10", "cuda11": "11.8.7", "cuda12": "12.9.10", "cuda13": "13.4.4"}


def _allowed(extra: str):
    """The cuda-python versions ptychonn-edge[extra] allows on its target platform."""
    check_wheels = _check_wheels()
    return check_wheels.cuda_python_specifier(next(t for t in check_wheels.TARGETS if t.extra == extra))


@pytest.mark.parametrize("extra", sorted(FITTING))
def test_each_platform_extra_allows_a_cuda_python_that_fits_its_driver(extra):
    assert FITTING[extra] in _allowed(extra)


@pytest.mark.parametrize("extra", sorted(UNPINNED_PICK))
def test_jetpack_extras_exclude_what_an_unpinned_pip_picks(extra):
    assert UNPINNED_PICK[extra] not in _allowed(extra)


def _venv_with_the_cli(tmp_path) -> str:
    """A stand-in venv whose ptychonn-edge is this checkout's."""
    command = tmp_path / "venv" / "bin" / "ptychonn-edge"
    command.parent.mkdir(parents=True)
    command.write_text('#!/bin/sh\nPYTHONPATH={} exec {} -m appliance.cli "$@"\n'.format(ROOT, sys.executable))
    command.chmod(0o755)
    return str(tmp_path / "venv")


def test_the_installer_does_not_start_the_service_on_the_example_configuration(tmp_path):
    example = open(os.path.join(ROOT, "systemd", "config.example.yaml")).read()
    venv = _venv_with_the_cli(tmp_path)
    verdicts = {}
    edited = example.replace("13SIM1:Pva1:Image", "BL7:Eiger:Pva1:Image")
    omitted = example.replace("pv: 13SIM1:Pva1:Image", "")  # the default is the example's too
    for name, text in (("example", example), ("edited", edited), ("omitted", omitted)):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.yaml").write_text(text)
        run = run_installer('VENV="$1"; CONFIG_DIR="$2"; if configured; then echo start; else echo wait; fi',
                            venv, str(directory))
        assert run.returncode == 0, run.stderr
        verdicts[name] = run.stdout.strip()
    assert verdicts == {"example": "wait", "edited": "start", "omitted": "wait"}


def test_the_installer_configures_with_setup_from_its_flags(tmp_path):
    venv, directory = _venv_with_the_cli(tmp_path), tmp_path / "etc"
    directory.mkdir()
    flags = ["--detector-pv", "BL7:Eiger:Pva1:Image", "--pv-prefix", "BL7:NN", "--interface", "lo"]
    run = run_installer('parse_arguments "${@:4}"; VENV="$1"; CONFIG_DIR="$2"; SRC="$3"; configuration; '
                        'configured && echo start', venv, str(directory), ROOT, *flags)
    assert run.returncode == 0 and run.stdout.strip().endswith("start"), run.stdout + run.stderr
    from appliance.config import load_config

    config = load_config(str(directory / "config.yaml"))
    assert (config.detector.pv, config.publish.prefix) == ("BL7:Eiger:Pva1:Image", "BL7:NN")
    assert "EPICS_PVAS_INTF_ADDR_LIST=127.0.0.1" in (directory / "environment").read_text()
    refused = run_installer('parse_arguments "${@:4}"; VENV="$1"; CONFIG_DIR="$2"; SRC="$3"; configuration',
                            venv, str(directory), ROOT, "--pv-prefix", "has space")
    assert refused.returncode != 0 and "setup refused" in refused.stderr and "publish.prefix" in refused.stderr


def _venv_without(tmp_path, module: str) -> str:
    """A stand-in venv whose python is this one, with ``module`` failing to import as if not installed."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(parents=True)
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class Uninstalled:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == {!r}:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Uninstalled())\n".format(module))
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\nPYTHONPATH={}:{} exec {} "$@"\n'.format(blocker, ROOT, sys.executable))
    python.chmod(0o755)
    return str(tmp_path / "venv")


def test_an_install_where_no_backend_can_serve_fails_and_says_why(tmp_path):
    served = run_installer('VENV="$1"; backend_check', _venv_without(tmp_path / "with", "no_such_module"))
    assert served.returncode == 0 and "backend: serves on onnxruntime" in served.stderr + served.stdout
    starved = run_installer('VENV="$1"; backend_check', _venv_without(tmp_path / "without", "onnxruntime"))
    assert starved.returncode != 0
    said = starved.stderr + starved.stdout
    assert "CANNOT SERVE: onnxruntime" in said and "install the cpu extra" in said


def _fake_apt(tmp_path, update_fails: bool) -> str:
    """dpkg saying nothing is installed, and an apt-get that logs its calls (its update failing or not)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "apt-get").write_text('#!/bin/sh\necho "$*" >> {}\n[ "$1" != update ] || exit {}\n'.format(
        tmp_path / "apt.log", 100 if update_fails else 0))
    for tool in ("dpkg", "apt-get"):
        (bin_dir / tool).chmod(0o755)
    return str(bin_dir)


def test_the_installer_updates_the_package_lists_before_installing(tmp_path):
    run = run_installer('PATH="$1:$PATH"; os_packages', _fake_apt(tmp_path, update_fails=False))
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert calls == ["update -qq", "install -y --no-install-recommends python3-venv python3-systemd"]


def test_a_failed_apt_update_stops_the_install_with_what_to_do_offline(tmp_path):
    run = run_installer('PATH="$1:$PATH"; os_packages', _fake_apt(tmp_path, update_fails=True))
    assert run.returncode != 0
    assert "apt-get update failed" in run.stderr and "--no-apt" in run.stderr, run.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == ["update -qq"]  # nothing installed from stale lists


@pytest.mark.parametrize("extras, platform", [("jetson5,cpu", "jetson5"), ("jetson6,cpu", "jetson6"),
                                              ("cpu", os.uname().machine)])
def test_the_installer_pins_the_versions_of_the_platform_it_installs_for(extras, platform):
    found = run_installer('constraints_file "$1"', extras)
    expected = os.path.join(ROOT, "constraints", platform + ".txt")
    assert found.stdout.strip() == (expected if os.path.exists(expected) else ""), found.stderr


def test_each_constraints_file_pins_every_runtime_dependency_for_its_python():
    """.ci/check_offline_install.sh downloads with them (a pin that does not resolve fails there)."""
    for name, python in (("jetson5", "3.8"), ("jetson6", "3.10")):
        lines = [line for line in open(os.path.join(ROOT, "constraints", name + ".txt")) if not line.startswith("#")]
        pinned = {line.split("==")[0] for line in lines}
        assert {"numpy", "pvapy", "onnxruntime", "cuda-python", "jetson-stats", "pyyaml", "lz4", "blosc"} <= pinned
        assert all(line.rstrip().endswith('; python_version == "{}"'.format(python)) for line in lines), name
