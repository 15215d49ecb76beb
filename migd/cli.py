"""Command line: `migd serve` runs the daemon; other subcommands are tools and clients.

The only place that picks the event loop (uvloop, else asyncio) and sets up logging.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from . import __version__
from .config import Config, default_socket_path
from .errors import MigdError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an octal mode like 0600") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text} is out of range 0000..0777")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migd", description="Save and restore memory to QEMU mapped-ram files over QMP."
    )
    parser.add_argument("--version", action="version", version=f"migd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument(
        "--socket", default=None, help=f"QMP socket (default {default_socket_path()})"
    )
    serve.add_argument("--socket-mode", type=_mode, default=None, help="socket mode (default 0600)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    schema = sub.add_parser("schema", help="write or check the JSON Schemas in schemas/")
    action = schema.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="regenerate the files")
    action.add_argument("--check", action="store_true", help="fail if the files drift")
    schema.add_argument("--dir", type=Path, default=None, help="schema directory")
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_loop(coro: object) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is a speed-up, not a requirement
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import Daemon

    _setup_logging(args.log_level)
    overrides: dict[str, object] = {"log_level": args.log_level}
    if args.socket:
        overrides["socket_path"] = args.socket
    if args.socket_mode is not None:
        overrides["socket_mode"] = args.socket_mode
    config = Config(**overrides)
    try:
        _run_loop(Daemon(config).run())
    except MigdError as exc:
        logging.getLogger("migd").error("%s", exc.desc)
        return EXIT_FAILED
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from . import schema

    directory = args.dir or schema.SCHEMA_DIR
    if args.write:
        for path in schema.write_all(directory):
            print(f"wrote {path}")
        return EXIT_OK
    problems = schema.drift(directory)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print("schemas drifted from the models: run 'migd schema --write'", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"serve": cmd_serve, "schema": cmd_schema}
    return handlers[args.command](args)
