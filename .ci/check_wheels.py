"""Check that each platform extra gets a cuda-python that runs on that platform's CUDA driver.

pip takes the newest cuda-python with a wheel for the platform, whatever driver it needs: an
unpinned ``cuda-python>=11.8`` gives JetPack 5.1 (CUDA 11.4 driver) 12.3 and JetPack 6 (CUDA 12)
13.x, and the appliance's ``engine.backend: auto`` then serves from the CPU. So pyproject.toml pins
per platform, and this resolves each pin as pip on that machine would (``pip download
--only-binary=:all: --platform ... --python-version ...``). Dependencies are resolved too: from
12.6.1 cuda-python is a metapackage, and whether a binary exists shows only in its cuda-bindings.

Needs PyPI, and ptychonn-edge installed in the running Python (the extras are read from its
metadata, as pip reads them): ``.venv/bin/python .ci/check_wheels.py`` after scripts/test.sh.
"""
from __future__ import annotations

import glob
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import List, NamedTuple, Optional, Tuple

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import parse_wheel_filename

# Where the CUDA runtime binding lives, in the order appliance/cuda.py imports it.
RUNTIME_MODULES = (("cuda/bindings/runtime.", "cuda.bindings.runtime"), ("cuda/cudart.", "cuda.cudart"))


class Target(NamedTuple):
    name: str
    extra: str
    python: str
    machine: str
    glibc_minor: int  # the OS's glibc is 2.<this>: wheels tagged for a newer one do not install
    cuda_major: int  # the CUDA major of its driver: the one cuda-python major to install there


TARGETS = (
    Target("JetPack 5.1 (Ubuntu 20.04, CUDA 11.4)", "jetson5", "3.8", "aarch64", 31, 11),
    Target("JetPack 6 (Ubuntu 22.04, CUDA 12.2/12.6)", "jetson6", "3.10", "aarch64", 35, 12),
    Target("x86_64, NVIDIA driver 450-524", "cuda11", "3.11", "x86_64", 35, 11),
    Target("x86_64, NVIDIA driver 525-579", "cuda12", "3.11", "x86_64", 35, 12),
    Target("x86_64, NVIDIA driver 580+", "cuda13", "3.11", "x86_64", 35, 13),
)


def cuda_python_specifier(target: Target) -> SpecifierSet:
    """The versions of cuda-python that installing ptychonn-edge[target.extra] on the target allows."""
    environment = {"extra": target.extra, "python_version": target.python, "platform_machine": target.machine,
                   "sys_platform": "linux", "platform_system": "Linux"}
    specifier = SpecifierSet()
    found = False
    for line in importlib.metadata.requires("ptychonn-edge") or []:
        requirement = Requirement(line)
        if requirement.name == "cuda-python" and requirement.marker is not None \
                and requirement.marker.evaluate(environment):
            specifier &= requirement.specifier
            found = True
    if not found:
        raise LookupError("ptychonn-edge[{}] does not require cuda-python on {}".format(target.extra, target.name))
    return specifier


def platform_arguments(target: Target) -> List[str]:
    """--platform for every manylinux tag the target's glibc accepts (pip matches tags exactly)."""
    tags = ["manylinux_2_{}_{}".format(minor, target.machine) for minor in range(target.glibc_minor, 16, -1)]
    tags.append("manylinux2014_" + target.machine)
    return [argument for tag in tags for argument in ("--platform", tag)]


def download(target: Target, specifier: SpecifierSet, directory: str) -> None:
    abi = "cp" + target.python.replace(".", "")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--python-version", target.python, "--implementation", "cp", "--abi", abi,
               *platform_arguments(target), "--dest", directory, "cuda-python" + str(specifier)]
    subprocess.run(command, check=True)


def runtime_wheel(directory: str) -> Optional[Tuple[str, str]]:
    """(wheel file, module) of the downloaded wheel that carries the CUDA runtime binding."""
    for path in sorted(glob.glob(os.path.join(directory, "*.whl"))):
        names = zipfile.ZipFile(path).namelist()
        for prefix, module in RUNTIME_MODULES:
            if any(name.startswith(prefix) and name.endswith(".so") for name in names):
                return os.path.basename(path), module
    return None


def check(target: Target) -> Optional[str]:
    """None when the target's extra resolves to a runtime binding of its driver's CUDA major, else why not."""
    specifier = cuda_python_specifier(target)
    with tempfile.TemporaryDirectory() as directory:
        try:
            download(target, specifier, directory)
        except subprocess.CalledProcessError:
            return "no wheels for cuda-python{} on Python {} {}".format(specifier, target.python, target.machine)
        found = runtime_wheel(directory)
    if found is None:
        return "cuda-python{} resolved to no wheel with a CUDA runtime binding".format(specifier)
    wheel, module = found
    version = parse_wheel_filename(wheel)[1]
    print("{}: [{}] cuda-python{} -> {} ({})".format(target.name, target.extra, specifier, wheel, module))
    if version.major != target.cuda_major:
        return "{} is CUDA {}, the driver is CUDA {}".format(wheel, version.major, target.cuda_major)
    return None


def main() -> int:
    failures = [(target, check(target)) for target in TARGETS]
    failures = [(target, why) for target, why in failures if why is not None]
    for target, why in failures:
        print("FAIL {} [{}]: {}".format(target.name, target.extra, why), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
