"""What a process inside the appliance's sandbox can and cannot do.

tests/systemd/driver.py runs this as the ExecStart of a copy of the installed
ptychonn-edge unit (same user, same sandbox directives and drop-ins), and reads
the result from the state directory, the one place it can write.
"""
from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import socket
import sys
from typing import Callable, Dict

STATE = "/var/lib/ptychonn-edge/state"


def _attempt(action: Callable[[], object]) -> str:
    """'ok', or the errno name of the refusal."""
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def _write(path: str) -> Callable[[], object]:
    def action() -> None:
        with open(path, "w") as handle:
            handle.write("probe")
        os.unlink(path)

    return action


def _read(path: str) -> Callable[[], object]:
    def action() -> None:
        with open(path) as handle:
            handle.read()

    return action


def _socket(family: int, kind: int) -> Callable[[], object]:
    return lambda: socket.socket(family, kind).close()


def probe(home_file: str) -> Dict[str, object]:
    checks = {
        "write_state_dir": _write(os.path.join(STATE, ".probe")),
        "write_engines_dir": _write("/var/lib/ptychonn-edge/engines/.probe"),
        "write_above_state_dir": _write("/var/lib/ptychonn-edge/.probe"),
        "write_config_dir": _write("/etc/ptychonn-edge/.probe"),
        "write_etc": _write("/etc/.probe"),
        "write_opt": _write("/opt/ptychonn-edge/.probe"),
        "write_usr": _write("/usr/.probe"),
        "write_var_lib": _write("/var/lib/.probe"),
        "read_home_file": _read(home_file),
        "list_home": lambda: os.listdir("/home"),
        "read_root_home": lambda: os.listdir("/root"),
        "read_pid1_cmdline": _read("/proc/1/cmdline"),
        "socket_inet": _socket(socket.AF_INET, socket.SOCK_DGRAM),
        "socket_packet": _socket(socket.AF_PACKET, socket.SOCK_RAW),
    }
    results: Dict[str, object] = {name: _attempt(action) for name, action in checks.items()}
    results["user"] = pwd.getpwuid(os.getuid()).pw_name
    results["group"] = grp.getgrgid(os.getgid()).gr_name
    results["groups"] = sorted(_group_name(gid) for gid in os.getgroups())
    return results


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:  # PrivateUsers= maps only the service's own user and group
        return str(gid)


if __name__ == "__main__":
    found = probe(sys.argv[1])
    with open(os.path.join(STATE, "probe.json"), "w") as out:
        json.dump(found, out)
