"""The ``ptychonn-edge`` command.

Exit codes: 0 success, 1 failure at run time, 2 bad input (config, engine file,
arguments): systemd's unit does not restart on 2, since retrying cannot help.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

EXIT_BAD_INPUT = 2


def _run(args: argparse.Namespace) -> int:
    from appliance.pva import exit_without_teardown
    from appliance.service import serve

    exit_without_teardown(serve(args.config))


def _check_config(args: argparse.Namespace) -> int:
    from appliance.config import dump_config, load_config

    try:
        config = load_config(args.file)
    except (OSError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.service:
        from appliance.site_setup import unconfigured

        problem = unconfigured(config, args.file)
        if problem is not None:
            print(problem, file=sys.stderr)
            return EXIT_BAD_INPUT
    sys.stdout.write(dump_config(config))
    return 0


def _inspect_engine(args: argparse.Namespace) -> int:
    from appliance.engines import open_engine
    from appliance.engines.errors import EngineError

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


def _status(args: argparse.Namespace) -> int:
    from appliance.status_view import format_status, read_status, snapshot

    name = _status_pv(args)
    try:
        fields = read_status(name, args.timeout)
    except Exception as exc:  # pvapy and p4p raise their own types for timeouts and missing channels
        print("cannot read {}: {}".format(name, exc), file=sys.stderr)
        return 1
    status = snapshot(fields)
    if args.json:
        print(json.dumps(status, sort_keys=True, allow_nan=False))
        return 0
    print(format_status(status))
    return 0


def _watch(args: argparse.Namespace) -> int:
    from appliance.status_view import watch

    return watch(_status_pv(args), args.refresh)


def _verdict(args: argparse.Namespace) -> int:
    from appliance.status_view import wait_for_verdict

    code, message = wait_for_verdict(_status_pv(args), args.sha256.lower(), args.timeout)
    print(message, file=sys.stdout if code == 0 else sys.stderr)
    return code


def _status_pv(args: argparse.Namespace) -> str:
    """P:Status of the appliance asked for: --prefix, else this host's (its config and environment files)."""
    from appliance.status_view import use_local_appliance

    use_local_appliance(args.environment)
    return (args.prefix or _local_prefix(args.config) or "PTYCHONN") + ":Status"


def _local_prefix(config_path: str) -> Optional[str]:
    from appliance.config import load_config

    try:
        return load_config(config_path).publish.prefix
    except (OSError, ValueError):  # not on the device, or not readable by this user
        return None


def _add_appliance_arguments(parser: argparse.ArgumentParser) -> None:
    from appliance.config import DEFAULT_CONFIG_PATH
    from appliance.status_view import APPLIANCE_ENVIRONMENT

    parser.add_argument("--prefix", help="PV prefix (publish.prefix; default: this host's appliance's, else PTYCHONN)")
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="this host's appliance config (for the prefix)")
    parser.add_argument("--environment", default=APPLIANCE_ENVIRONMENT,
                        help="this host's appliance EPICS settings, used when this shell sets no EPICS_PVA_*")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptychonn-edge", description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the appliance (what the systemd unit starts)")
    run.add_argument("--config", required=True, help="YAML config file")
    run.set_defaults(handler=_run)

    check = commands.add_parser("check-config", help="print the effective config, or every error in it")
    check.add_argument("file")
    check.add_argument("--service", action="store_true",
                       help="also refuse what `run` refuses: the example's detector PV")
    check.set_defaults(handler=_check_config)

    inspect = commands.add_parser("inspect-engine", help="print what an engine file declares")
    inspect.add_argument("file")
    inspect.add_argument("--max-batch", type=int, default=8, help="batch limit assumed for dynamic models")
    inspect.set_defaults(handler=_inspect_engine)

    status = commands.add_parser("status", help="read P:Status of a running appliance")
    _add_appliance_arguments(status)
    status.add_argument("--timeout", type=float, default=5.0)
    status.add_argument("--json", action="store_true", help="print the raw JSON snapshot")
    status.set_defaults(handler=_status)

    watch = commands.add_parser("watch", help="a live terminal page of a running appliance (q quits)")
    _add_appliance_arguments(watch)
    watch.add_argument("--refresh", type=float, default=1.0, help="seconds between redraws")
    watch.set_defaults(handler=_watch)

    verdict = commands.add_parser("verdict", help="wait for what the appliance makes of a deployed file "
                                  "(exit 0 accepted and serving, 1 rejected, 3 no verdict in time)")
    verdict.add_argument("sha256", help="the deployed file's sha256")
    _add_appliance_arguments(verdict)
    verdict.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (validation takes a while)")
    verdict.set_defaults(handler=_verdict)

    for name, module, needs in _EXTENSIONS:
        _add_extension(commands, name, module, needs)
    return parser


# Subcommands whose modules add their own arguments: (command, module with add_arguments/main,
# the optional modules the command cannot do without and the extra that installs each).
_EXTENSIONS = [
    ("build-engine", "appliance.engines.build", ()),
    ("simulate", "appliance.sim.serve", ()),
    ("setup", "appliance.site_setup", ()),
    ("demo", "appliance.demo", (("matplotlib", "demo"),)),
    ("record", "appliance.record", (("h5py", "record"),)),
    ("collect", "appliance.collect", ()),
]


def _add_extension(commands: Any, name: str, module: str, needs: Sequence[Tuple[str, str]]) -> None:
    import importlib

    loaded = importlib.import_module(module)
    sub = commands.add_parser(name, help=(loaded.__doc__ or "").strip().splitlines()[0])
    loaded.add_arguments(sub)
    sub.set_defaults(handler=_needing(name, needs, loaded.main))


def _needing(command: str, needs: Sequence[Tuple[str, str]], handler: Callable[[argparse.Namespace], int]
             ) -> Callable[[argparse.Namespace], int]:
    """``handler``, run only once the optional modules it needs import: a missing one is named with the
    extra that installs it before any work is done (not as a traceback at the end of a scan)."""

    def checked(args: argparse.Namespace) -> int:
        import importlib

        for module, extra in needs:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                print("ptychonn-edge {} needs {} ({}): pip install 'ptychonn-edge[{}]'".format(
                    command, module, exc, extra), file=sys.stderr)
                return EXIT_BAD_INPUT
        return handler(args)

    return checked


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
