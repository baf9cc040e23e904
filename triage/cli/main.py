"""`triage`: serve the daemon, check the configuration, generate synthetic studies."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import NoReturn

from triage import __version__
from triage.config import ConfigError, describe, load_config
from triage.procutil import skip_collection_at_exit
from triage.training.cli import add_commands as add_training_commands


def _config_path(args: argparse.Namespace) -> str | None:
    # --config "" is an error (load_config); TRIAGE_CONFIG set empty is as if unset.
    return args.config if args.config is not None else os.environ.get("TRIAGE_CONFIG") or None


def _serve(args: argparse.Namespace) -> int:
    from triage.daemon import Daemon, StartupError
    from triage.logs import configure_logging, get_logger
    from triage.store.db import StoreUnavailable

    config = load_config(_config_path(args))
    configure_logging(config.log.level, config.log.format)
    try:
        return Daemon(config).run()
    except (StartupError, StoreUnavailable) as exc:
        get_logger("triage.daemon").error("startup_failed", error=str(exc))
        print(f"triage: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)


def _worker(args: argparse.Namespace) -> int:
    from triage.daemon import StartupError, run_worker
    from triage.logs import configure_logging, get_logger
    from triage.store.db import StoreUnavailable

    config = load_config(_config_path(args))
    configure_logging(config.log.level, config.log.format)
    try:
        return run_worker(config)
    except (StartupError, StoreUnavailable) as exc:
        get_logger("triage.daemon").error("startup_failed", error=str(exc))
        print(f"triage: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)


def _demo(args: argparse.Namespace) -> int:
    from triage.cli.demo import run_demo

    config = load_config(_config_path(args), base_dir=args.workdir)
    return run_demo(config, args.studies, args.timeout, args.host)


def _show_config(args: argparse.Namespace) -> int:
    from triage.tls_expiry import certificates_in_use, expiry_notes

    config = load_config(_config_path(args), base_dir=args.workdir)
    print(json.dumps(describe(config), indent=2))
    # Valid, but worth knowing before the peers find out.
    for note in expiry_notes(certificates_in_use(config)):
        print(f"triage: warning: {note}", file=sys.stderr)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from triage.testing.synth import main as synth_main

    return synth_main(args.synth_args)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line on stderr (exit 2), as triage-admin."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (got {text!r})")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `triage` argument parser."""
    parser = _Parser(prog="triage", description=__doc__)
    parser.add_argument("--version", action="version", version=f"msk-triage {__version__}")
    parser.add_argument("--config", "-c", help="TOML config file (default: $TRIAGE_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the daemon").set_defaults(func=_serve)
    commands.add_parser(
        "worker", help="run only the scoring worker (hosts sharing a PostgreSQL store)"
    ).set_defaults(func=_worker)
    show_config = commands.add_parser(
        "config", help="validate the configuration and print the effective values"
    )
    # Run from elsewhere than the daemon's working directory (/var/lib/msk-triage under
    # systemd), relative paths showed the wrong files, and relative TLS files failed.
    show_config.add_argument(
        "--workdir",
        default=None,
        help="resolve relative config paths against DIR (the daemon's working directory;"
        " default: the current directory)",
    )
    show_config.set_defaults(func=_show_config)
    demo = commands.add_parser(
        "demo", help="send synthetic studies to the running daemon and print the worklist"
    )
    demo.add_argument(
        "--studies", type=_positive_int, default=8, help="how many studies (default 8)"
    )
    demo.add_argument("--timeout", type=_seconds, default=300.0, help="seconds to wait for results")
    demo.add_argument("--host", default=None, help="the daemon's host (default: from the config)")
    demo.add_argument(
        "--workdir",
        default=None,
        help="resolve relative config paths against DIR (the daemon's working directory;"
        " default: the current directory)",
    )
    demo.set_defaults(func=_demo)
    synth = commands.add_parser(
        "synth", help="write synthetic studies (see `triage synth -- --help`)", add_help=False
    )
    synth.add_argument("synth_args", nargs=argparse.REMAINDER)
    synth.set_defaults(func=_synth)
    add_training_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `triage` command."""
    args = build_parser().parse_args(argv)
    skip_collection_at_exit()  # a stop or restart need not wait for a heap walk
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"triage: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
