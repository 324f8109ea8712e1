"""Configure this machine's appliance: detector PV, PV prefix and PVA interface (ptychonn-edge setup).

The example configuration names pvapy's simulator as the detector and leaves pvAccess on
every interface, so an appliance started from it searches the whole network and serves
``PTYCHONN:*`` there, colliding with any other appliance. ``run`` refuses it (see
:func:`unconfigured`); ``setup`` writes what a site needs into config.yaml and the unit's
environment file, validated as ``check-config`` validates, before anything is replaced.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import socket
import struct
import sys
import tempfile
from typing import Dict, List, Optional

import yaml

from appliance.config import DEFAULT_CONFIG_PATH, Config, DetectorConfig, _is_ipv4, parse_config
from appliance.schema import parse_yaml
from appliance.status_view import APPLIANCE_ENVIRONMENT

EXIT_BAD_INPUT = 2
EXAMPLE_DETECTOR_PV = DetectorConfig().pv  # the example's and the default: pvapy's areaDetector simulator
_SIOCGIFADDR = 0x8915  # Linux ioctls: an interface's IPv4 address and its broadcast address
_SIOCGIFBRDADDR = 0x8919
HEADER = ("# Written by `ptychonn-edge setup` (run it again to change the detector, prefix or interface).\n"
          "# Every key and its default: docs/configuration.md. Check a hand edit with\n"
          "#   ptychonn-edge check-config --service {path}\n")


def unconfigured(config: Config, path: str) -> Optional[str]:
    """Why ``config`` (read from ``path``) must not be served as it is, or None when it may."""
    if config.detector.pv != EXAMPLE_DETECTOR_PV:
        return None
    return ("{}: detector.pv is {}, the example's (pvapy's simulated detector): an appliance started like this "
            "searches every network for it. Set your detector's NTNDArray PV: "
            "ptychonn-edge setup --detector-pv PV (docs/deploy.md)".format(path, EXAMPLE_DETECTOR_PV))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detector-pv", help="the detector's NTNDArray PV (detector.pv)")
    parser.add_argument("--prefix", help="this appliance's PV prefix (publish.prefix): unique on the network")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--interface", help="serve and search on this network interface only (e.g. eth1)")
    where.add_argument("--address", help="serve on this IPv4 address only (EPICS_PVAS_INTF_ADDR_LIST)")
    parser.add_argument("--detector-address", nargs="+", metavar="HOST[:PORT]",
                        help="search the detector PV at these addresses only (EPICS_PVA_ADDR_LIST; default with "
                             "--interface: its broadcast address)")
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="the config file to write")
    parser.add_argument("--environment", default=APPLIANCE_ENVIRONMENT, help="the unit's EPICS environment file")


def main(args: argparse.Namespace) -> int:
    settings = (args.detector_pv, args.prefix, args.interface, args.address, args.detector_address)
    if all(value is None for value in settings):
        print("ptychonn-edge setup: nothing to set: give --detector-pv, --prefix, --interface, --address or "
              "--detector-address", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        text = configured_text(args.config, args.detector_pv, args.prefix)
        variables = pva_environment(args.interface, args.address, args.detector_address)
    except (OSError, ValueError) as exc:
        print("ptychonn-edge setup: {}".format(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    if text is not None:
        replace_file(args.config, text)
        print("wrote {}".format(args.config))
    if variables:
        replace_file(args.environment, environment_text(args.environment, variables))
        print("wrote {}: {}".format(args.environment, " ".join("{}={}".format(*item) for item in variables.items())))
    print("start or apply it: systemctl enable --now ptychonn-edge; systemctl restart ptychonn-edge")
    return 0


def configured_text(path: str, detector_pv: Optional[str], prefix: Optional[str]) -> Optional[str]:
    """The config file at ``path`` (absent: all defaults) with the keys given, validated as check-config
    and ``run`` validate it; None when no key is given. ValueError says every problem."""
    if detector_pv is None and prefix is None:
        return None
    data = _mapping(path)
    if detector_pv is not None:
        data.setdefault("detector", {})["pv"] = detector_pv
    if prefix is not None:
        data.setdefault("publish", {})["prefix"] = prefix
    text = HEADER.format(path=path) + yaml.safe_dump(data, sort_keys=False)
    problem = unconfigured(parse_config(text, path), path)
    if problem is not None:
        raise ValueError(problem)
    return text


def _mapping(path: str) -> Dict[str, Dict[str, object]]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = parse_yaml(handle.read(), path)
    except FileNotFoundError:
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError("{}: expected a mapping of sections (detector:, publish:, ...); fix it by hand "
                         "(check-config shows the problems)".format(path))
    return data


def pva_environment(interface: Optional[str], address: Optional[str],
                    detector_addresses: Optional[List[str]]) -> Dict[str, str]:
    """EPICS variables that keep the appliance's pvAccess server (and its search for the detector)
    on one interface; {} for none given."""
    variables = {}
    search = list(detector_addresses or [])
    if interface is not None:
        address = interface_address(interface, _SIOCGIFADDR)
        broadcast = interface_address(interface, _SIOCGIFBRDADDR, default=address)
        search = search or [broadcast]
        variables.update(EPICS_PVAS_BEACON_ADDR_LIST=broadcast, EPICS_PVAS_AUTO_BEACON_ADDR_LIST="NO")
    if address is not None:
        if not _is_ipv4(address):
            raise ValueError("--address {}: expected an IPv4 address of this machine (e.g. 10.1.2.3)".format(address))
        variables["EPICS_PVAS_INTF_ADDR_LIST"] = address
    if search:
        variables.update(EPICS_PVA_ADDR_LIST=" ".join(search), EPICS_PVA_AUTO_ADDR_LIST="NO")
    return variables


def interface_address(interface: str, request: int, default: Optional[str] = None) -> str:
    """An IPv4 address of ``interface`` (its own or its broadcast address, per ``request``)."""
    names = [name for _, name in socket.if_nameindex()]
    if interface not in names:
        raise ValueError("--interface {}: no such network interface here (there are: {})".format(
            interface, ", ".join(names)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            packed = fcntl.ioctl(probe.fileno(), request, struct.pack("256s", interface.encode()[:15]))
        except OSError as exc:
            if default is not None:
                return default
            raise ValueError("--interface {}: it has no IPv4 address ({})".format(interface, exc)) from exc
    found = socket.inet_ntoa(packed[20:24])
    return default if found == "0.0.0.0" and default is not None else found


def environment_text(path: str, variables: Dict[str, str]) -> str:
    """The environment file at ``path`` with ``variables`` set: other lines (and comments) kept."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        lines = ["# EPICS settings of ptychonn-edge.service (NAME=value); `ptychonn-edge setup` writes them."]
    kept = [line for line in lines if line.split("=", 1)[0].strip() not in variables]
    return "\n".join(kept + ["{}={}".format(name, value) for name, value in variables.items()]) + "\n"


def replace_file(path: str, text: str) -> None:
    """Write ``path`` whole or not at all (a reader never sees half a file); mode 0644, as install.sh's."""
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, part = tempfile.mkstemp(dir=directory, prefix=".setup-")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(part, 0o644)
        os.replace(part, path)
    except BaseException:
        os.unlink(part)
        raise
