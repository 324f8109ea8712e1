"""The ``ptychonn-edge`` command.

Exit codes: 0 success, 1 failure at run time, 2 bad input (config, engine file,
arguments): systemd's unit does not restart on 2, since retrying cannot help.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional

EXIT_BAD_INPUT = 2


def _run(args: argparse.Namespace) -> int:
    from appliance.service import serve

    return serve(args.config)


def _check_config(args: argparse.Namespace) -> int:
    from appliance.config import dump_config, load_config

    try:
        config = load_config(args.file)
    except (OSError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    sys.stdout.write(dump_config(config))
    return 0


def _inspect_engine(args: argparse.Namespace) -> int:
    from appliance.engines import open_engine
    from appliance.engines.base import EngineError

    try:
        engine = open_engine(args.file, args.max_batch)
    except EngineError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    io = engine.io
    print("file:     {}".format(engine.path))
    print("sha256:   {}".format(engine.sha256))
    print("backend:  {}".format(engine.backend))
    print("input:    {} (image {}x{})".format(io.input.describe(), *io.image_shape))
    for role, spec in io.outputs.items():
        print("output:   {} = {}".format(role, spec.describe()))
    print("batch:    {}".format(io.batch.describe()))
    manifest = engine.manifest
    print("manifest: {}".format("yes" if manifest else "none"))
    if manifest is not None:
        from appliance.schema import dump

        for key, value in dump(manifest).items():
            if value not in (None, {}, ""):
                print("  {}: {}".format(key, value))
    engine.close()
    return 0


def read_status(pv_name: str, timeout_s: float) -> Dict[str, Any]:
    """P:Status's fields, through p4p (pvxs) where it is installed, else through pvapy.

    pvapy's server keeps about 41 kB for each channel a pvapy client ever opened
    to it, even after that client has gone; a channel from p4p leaves nothing
    behind (docs/deploy.md, "Reading the status"). Every status call opens a
    channel, so through p4p it costs the appliance nothing lasting.
    """
    try:
        from p4p.client.thread import Context
    except ImportError:  # no p4p wheel for aarch64 (the Jetson): one pvapy channel, 41 kB kept
        from appliance.pva import read_once

        return read_once(pv_name, timeout_s)
    # pvxs's TCP name search (EPICS_PVA_NAME_SERVERS) finds no pvapy server (measured): UDP search only.
    conf = {k: v for k, v in os.environ.items() if k.startswith("EPICS_PVA") and k != "EPICS_PVA_NAME_SERVERS"}
    with Context("pva", useenv=False, conf=conf) as context:
        return dict(context.get(pv_name, timeout=timeout_s).todict())


def _status(args: argparse.Namespace) -> int:
    name = args.prefix + ":Status"
    try:
        fields = read_status(name, args.timeout)
    except Exception as exc:  # pvapy and p4p raise their own types for timeouts and missing channels
        print("cannot read {}: {}".format(name, exc), file=sys.stderr)
        return 1
    if args.json:
        print(fields["json"])
        return 0
    print(format_status(json.loads(fields["json"])))
    return 0


def format_status(status: Dict[str, Any]) -> str:
    """A readable page of P:Status for operators."""
    latency = status.get("latency") or {}

    def ms(value: Optional[float]) -> str:
        return "-" if value is None else "{:.2f} ms".format(value)

    drops = ", ".join("{} {}".format(k, v) for k, v in sorted(status.get("dropped", {}).items()) if v) or "none"
    lines = [
        "state:      {}".format(status.get("state")),
        "engine:     {} [{}] sha256 {}".format(
            status.get("engine_name") or "none", status.get("engine_backend") or "-", (status.get("engine_sha256") or "-")[:16]
        ),
        "frames:     received {}, published {}, dropped {}, missing upstream {}, upstream overruns {}".format(
            status.get("received"), status.get("published"), status.get("dropped_total"),
            status.get("missing_upstream"), status.get("upstream_overruns"),
        ),
        "drops:      {}".format(drops),
        "rates:      in {:.1f} Hz, out {:.1f} Hz".format(status.get("rate_in_hz", 0.0), status.get("rate_out_hz", 0.0)),
        "latency:    p50 {}, p99 {}, max {}".format(ms(latency.get("p50_ms")), ms(latency.get("p99_ms")), ms(latency.get("max_ms"))),
        "queue:      {} frames".format(status.get("queue_depth")),
        "uptime:     {:.0f} s".format(status.get("uptime_s", 0.0)),
    ]
    for error in status.get("recent_errors") or []:
        lines.append("last error: {}".format(error))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptychonn-edge", description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the appliance (what the systemd unit starts)")
    run.add_argument("--config", required=True, help="YAML config file")
    run.set_defaults(handler=_run)

    check = commands.add_parser("check-config", help="print the effective config, or every error in it")
    check.add_argument("file")
    check.set_defaults(handler=_check_config)

    inspect = commands.add_parser("inspect-engine", help="print what an engine file declares")
    inspect.add_argument("file")
    inspect.add_argument("--max-batch", type=int, default=8, help="batch limit assumed for dynamic models")
    inspect.set_defaults(handler=_inspect_engine)

    status = commands.add_parser("status", help="read P:Status of a running appliance")
    status.add_argument("--prefix", default="PTYCHONN", help="PV prefix (publish.prefix)")
    status.add_argument("--timeout", type=float, default=5.0)
    status.add_argument("--json", action="store_true", help="print the raw JSON snapshot")
    status.set_defaults(handler=_status)

    for name, module in _EXTENSIONS:
        _add_extension(commands, name, module)
    return parser


# Subcommands whose modules add their own arguments: (command, module with add_arguments/main).
_EXTENSIONS = [
    ("build-engine", "appliance.engines.build"),
    ("simulate", "appliance.sim.serve"),
    ("demo", "appliance.demo"),
]


def _add_extension(commands: Any, name: str, module: str) -> None:
    import importlib

    loaded = importlib.import_module(module)
    sub = commands.add_parser(name, help=(loaded.__doc__ or "").strip().splitlines()[0])
    loaded.add_arguments(sub)
    handler: Callable[[argparse.Namespace], int] = loaded.main
    sub.set_defaults(handler=handler)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
