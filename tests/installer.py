"""scripts/install.sh's detection, run against a described machine instead of this one.

Sourced, the installer only defines its functions: a test calls them with a fake
release file or /dev listing and reads what they print.
"""
from __future__ import annotations

import os
import shlex
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_SH = os.path.join(ROOT, "scripts", "install.sh")


# Sourced, the installer sees the caller's arguments. None accepts this one: an installer from
# before it could be sourced stops at its option parsing instead of installing on this machine.
GUARD = "--sourced-by-a-test"


def run_installer(shell: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """``shell`` (bash; its arguments are ``$1``...) after sourcing install.sh, output as text.

    ``$0`` is not the script's path, so sourcing it does not run the installation.
    """
    command = "source {} && shift && {}".format(shlex.quote(INSTALL_SH), shell)
    return subprocess.run(["bash", "-c", command, "install.sh-under-test", GUARD] + list(args), input=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
