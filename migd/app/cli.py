"""Command line: `migd serve` runs the daemon; other subcommands are tools and clients.

The only place that picks the event loop (uvloop, else asyncio) and sets up logging.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from .. import __version__
from ..errors import ConfigError, MigdError
from ..limits import CHANNELS_MAX, CHANNELS_MIN, channels_in_range
from ..tools.terminal import safe_output, shown
from .locations import DEFAULT_CONFIG_PATH, default_socket_path

T = TypeVar("T")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# sysexits.h EX_CONFIG, which systemd shows as "status=78/CONFIG": `migd serve` exits so
# on a bad configuration (file, options, the socket systemd passed), which no restart
# mends; 2 (INVALIDARGUMENT to systemd) stays argparse's, for a command line it cannot
# parse.
EXIT_CONFIG = 78


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an octal mode like 0600") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text} is out of range 0000..0777")
    return value


class _Once(argparse.Action):
    """An option that may be given once: `--config A --config B` (a drop-in's ExecStart=
    adding one to the unit's) silently read B alone, and the operator editing A saw no
    change (red-team, round 10c)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
        values: Any, option_string: str | None = None,
    ) -> None:  # fmt: skip
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice: give it once")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migd", description="Save and restore memory to QEMU mapped-ram files over QMP."
    )
    parser.add_argument("--version", action="version", version=f"migd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument(
        "--config",
        action=_Once,
        default=None,
        metavar="FILE",
        help=f"TOML configuration file (default {DEFAULT_CONFIG_PATH} if it exists); "
        "the options below override it",
    )
    serve.add_argument(
        "--socket", action=_Once, default=None,
        help=f"QMP socket (default {default_socket_path()})",
    )  # fmt: skip
    serve.add_argument(
        "--socket-mode", action=_Once, type=_mode, default=None, help="socket mode (default 0600)"
    )
    serve.add_argument(
        "--log-level", action=_Once, default=None, choices=["debug", "info", "warning", "error"]
    )

    schema = sub.add_parser("schema", help="write or check the JSON Schemas in schemas/")
    action = schema.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="regenerate the files")
    action.add_argument("--check", action="store_true", help="fail if the files drift")
    schema.add_argument("--dir", type=Path, default=None, help="schema directory")
    _add_client_commands(sub)
    from ..bench import add_arguments as add_bench_arguments  # no numpy until it runs

    add_bench_arguments(
        sub.add_parser("bench", help="measure save and restore here, against the disk and QEMU")
    )
    return parser


# Every C0 and C1 control character and DEL: a file name or any other string a client
# sends may hold newlines, carriage returns or terminal escapes.
_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def escape_controls(text: str) -> str:
    """Control characters as visible escapes: one log record stays one line."""
    return text.translate(_CONTROL_ESCAPES)


class ControlEscapingFormatter(logging.Formatter):
    """Escapes control characters in every record, so that a client string (a file name,
    a command name) cannot write fake log lines or terminal escapes into the log.

    Tracebacks keep their line breaks, but each of their lines is indented, so no line of
    one can pass for a record of its own.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return self._indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return self._indented(super().formatStack(stack_info))

    @staticmethod
    def _indented(text: str) -> str:
        return "\n".join("    " + escape_controls(line) for line in text.split("\n"))


class JournalFormatter(ControlEscapingFormatter):
    """Each record prefixed with its syslog priority, "<4>" for a warning, which journald
    reads (SyslogLevelPrefix=, on by default) as the line's priority; no timestamp, the
    journal keeps its own. Without it every line had the unit's default priority, info:
    `journalctl -p warning` showed no migd error at all (red-team, round 10c)."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}

    def formatMessage(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 2 if record.levelno > 40 else 6)
        return f"<{priority}>" + super().formatMessage(record)


def stderr_is_journal() -> bool:
    """JOURNAL_STREAM ("DEV:INODE", set by systemd) names our stderr: it goes to journald.
    Checked against stderr itself, since a child of the unit may have redirected it."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            ControlEscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def _run_loop(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is a speed-up, not a requirement
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import Daemon

    overrides: dict[str, object] = {}
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    if args.socket:
        overrides["socket_path"] = args.socket
    if args.socket_mode is not None:
        overrides["socket_mode"] = args.socket_mode
    try:
        from .config import load_config  # pydantic models: the daemon's, not a client's

        config = load_config(args.config, **overrides)
    except ConfigError as exc:  # before logging is set up or any socket exists
        priority = "<3>" if stderr_is_journal() else ""  # an error, to journald
        print(f"{priority}migd: {exc.desc}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(config.log_level)
    try:
        _run_loop(Daemon(config).run())
    except ConfigError as exc:  # the setup systemd gave (the passed socket): no retry helps
        logging.getLogger("migd").error("%s", exc.desc)
        return EXIT_CONFIG
    except MigdError as exc:
        logging.getLogger("migd").error("%s", exc.desc)
        return EXIT_FAILED
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from ..api import schema

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


# --- tools and clients (inspect, save, restore, status, jobs, call) -------------------------


def _type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser that raises ValueError with a readable text."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _channels(text: str) -> int:
    value = int(text)
    if not channels_in_range(value):
        raise ValueError(f"--channels {text} is out of range {CHANNELS_MIN}..{CHANNELS_MAX}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 86400:  # NaN fails too
        raise ValueError(f"{text} is not a number of seconds between 0 and 86400")
    return value


VERIFY_THREADS = 4  # `migd verify`: one O_DIRECT fd per thread keeps a disk busy


def _verify_file(text: str) -> tuple[str, int]:
    from ..tools.verify import parse_file_argument  # the verifier loads only for `verify`

    return parse_file_argument(text)


def _threads(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise ValueError(f"--threads {text} is out of range 1..64")
    return value


def _add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..tools.client import parse_offset, parse_size

    inspect = sub.add_parser(
        "inspect", help="describe a save file (migd's or QEMU's); needs no daemon"
    )
    inspect.add_argument("file", metavar="FILE")
    inspect.add_argument(
        "--offset", type=_type(parse_offset), default=0, help="stream offset in FILE (0x-hex ok)"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")

    verify = sub.add_parser(
        "verify",
        help="check a save file's structure and every checksum; needs no daemon",
        description="Check a save file as a restore would, and every page against its "
        "checksum; a `migd vm save` image (no offset) also its header and device state, "
        "as `migd vm restore` would. Exit 0: good; 1: corrupt; 2: not a save file, or a "
        "usage error.",
    )
    verify.add_argument(
        "file",
        metavar="FILE[,offset=N]",
        type=_type(_verify_file),
        help="the save file, and the stream's offset in it (4096, 0x1000, 4k) as in a file: URI",
    )
    verify.add_argument(
        "--threads",
        type=_type(_threads),
        default=VERIFY_THREADS,
        help=f"reader threads, each with its own fd (default {VERIFY_THREADS})",
    )
    verify.add_argument("--json", action="store_true", help="print the summary as JSON")
    verify.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    socket_help = f"migd's QMP socket (default {default_socket_path()})"
    for name, what in (("save", "save memory backends to FILE"), ("restore", "restore FILE")):
        p = sub.add_parser(name, help=f"{what} through a running migd")
        p.add_argument("file", metavar="FILE")
        p.add_argument("--socket", default=None, help=socket_help)
        p.add_argument(
            "--offset", type=_type(parse_offset), default=0, help="stream offset in FILE"
        )
        p.add_argument(
            "--backend",
            action="append",
            default=[],
            metavar="ID",
            help="a memory backend of the job (repeatable): run as a job "
            f"(memory-{'save' if name == 'save' else 'restore'}) of only these backends, "
            "alongside other jobs",
        )
        p.add_argument(
            "--job-id",
            default=None,
            metavar="ID",
            help="run as a job with this id (a letter, then letters, digits, '-', '.', '_'), "
            "of the --backend ones or, without --backend, of all; default with --backend: "
            f"{name}-PID. Without --job-id and --backend: migrate"
            f"{'' if name == 'save' else '-incoming'} of every backend",
        )
        p.add_argument(
            "--mem-path", default=None, help="add a memory-backend-file on PATH for this run"
        )
        p.add_argument("--size", type=_type(parse_size), default=None, help="its size: N[K|M|G|T]")
        p.add_argument(
            "--id",
            default=None,
            help="its backend id (default ram0, as QEMU guests' RAM; in a job, the job id: "
            "ids and block names are unique in a daemon); a save names its block after it "
            "unless --block-name is given, and prints the name",
        )
        p.add_argument("--block-name", default=None, help="its RAM block name (ramblock-name)")
        p.add_argument(
            "--channels",
            type=_type(_channels),
            default=None,
            help="multifd channels (default min(4, CPUs))",
        )
        p.add_argument(
            "--no-direct-io",
            action="store_true",
            help="don't use O_DIRECT (default: use it when FILE's filesystem supports it)",
        )
        p.add_argument(
            "--max-bandwidth",
            type=_type(parse_size),
            default=0,
            metavar="N[K|M|G]",
            help="cap in bytes/s (default 0: unlimited)",
        )
        p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
        if name == "restore":
            p.add_argument(
                "--skip-unmatched",
                action="store_true",
                help="skip blocks of FILE that have no backend",
            )

    status = sub.add_parser(
        "status", help="show query-migrate of a running migd, and query-jobs when it has jobs"
    )
    status.add_argument("--socket", default=None, help=socket_help)
    status.add_argument(
        "--json",
        action="store_true",
        help='print the raw JSON (query-migrate; query-jobs as "jobs" when there are any)',
    )

    jobs = sub.add_parser(
        "jobs",
        help="list the jobs of a running migd (query-jobs)",
        description="A table of query-jobs: id, type, status, progress, MB/s (10^6 bytes a "
        "second), file, backends, error. Exit 0; 1 if migd refuses; 2 if it cannot be reached.",
    )
    jobs.add_argument("--socket", default=None, help=socket_help)
    jobs.add_argument(
        "--watch",
        action="store_true",
        help="redraw the table about twice a second until Ctrl-C (exit 0)",
    )
    jobs.add_argument(
        "--json", action="store_true", help="print query-jobs' JSON (with --watch: one line each)"
    )

    vm = sub.add_parser(
        "vm",
        help="suspend a QEMU guest to one image file, and resume it (docs/vm-image.md)",
        description="Whole-VM save and restore: QEMU writes the device state, migd the RAM "
        "of the guest's shared memory backends, into one image. Exit 0: done; 1: refused "
        "or failed (a failed save leaves IMAGE as it was and a guest that ran, running); "
        "2: a usage error or QEMU or migd unreachable.",
    )
    vm_sub = vm.add_subparsers(dest="vm_command", required=True)
    for name, what in (
        ("save", "stop the guest and save it into IMAGE"),
        ("restore", "restore IMAGE into a QEMU started with the same configuration and "
         "-incoming defer"),
    ):  # fmt: skip
        p = vm_sub.add_parser(name, help=what, description=what)
        p.add_argument("image", metavar="IMAGE")
        p.add_argument("--qmp", required=True, metavar="SOCKET", help="the VM's QMP socket")
        p.add_argument("--socket", default=None, help=socket_help)
        p.add_argument(
            "--channels",
            type=_type(_channels),
            default=None,
            help="migd's multifd channels (default min(4, CPUs))",
        )
        p.add_argument(
            "--no-direct-io",
            action="store_true",
            help="don't use O_DIRECT for the RAM (default: when IMAGE's filesystem supports it)",
        )
        p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
        p.add_argument(
            "--json",
            action="store_true",
            help="print the summary as one JSON object (timings in seconds, downtime included)",
        )
        p.add_argument(
            "--qemu-timeout",
            type=_type(_positive_seconds),
            default=60.0,
            metavar="SECONDS",
            help="how long QEMU may take to answer one command before the command fails "
            "(and a stopped guest is resumed); default 60",
        )
        if name == "save":
            after = p.add_mutually_exclusive_group()
            after.add_argument(
                "--resume", action="store_true", help="let the guest run on (a checkpoint)"
            )
            after.add_argument(
                "--quit", action="store_true", help="quit QEMU once the image is durable"
            )
            p.add_argument(
                "--live",
                action="store_true",
                help="save the RAM while the guest still runs, then stop it and save again "
                "only what changed: a shorter downtime, more I/O in all (docs/vm-image.md)",
            )
        else:
            p.add_argument(
                "--paused", action="store_true", help="leave the guest paused, ready for 'cont'"
            )
            p.add_argument(
                "--accept-partial",
                action="store_true",
                help="restore into RAM files an interrupted or failed restore left partial "
                "(migd refuses them otherwise: their content is a mix)",
            )
            p.add_argument(
                "--postcopy",
                action="store_true",
                help="start the guest before its RAM is back: this command streams the RAM "
                "into QEMU, which asks for the pages the guest touches first (a downtime of "
                "the device state's load; a damaged image found after the start costs the "
                "guest; docs/postcopy.md)",
            )

    call = sub.add_parser("call", help="run any QMP command and print its JSON result")
    call.add_argument("--socket", default=None, help=socket_help)
    call.add_argument("qmp_command", metavar="COMMAND")
    call.add_argument("arguments", metavar="JSON", nargs="?", default="{}")


def _print_inspect(info: object) -> None:
    from ..tools.client import human_bytes
    from ..tools.inspect import SaveInfo

    assert isinstance(info, SaveInfo)
    state = "complete" if info.complete else "INCOMPLETE"
    print(f"{info.path}: {state} mapped-ram save")
    if not info.complete:
        print(f"  INCOMPLETE: {info.problem}")
    print(f"  machine:       {shown(info.machine)}")
    print(f"  capabilities:  {shown(', '.join(info.capabilities)) or '-'}")
    print(f"  stream offset: {info.offset}")
    print(
        f"  file size:     {human_bytes(info.file_size)} ({info.file_size} bytes), "
        f"{human_bytes(info.allocated)} allocated"
    )
    _print_identity(info)
    rows = [("BLOCK", "SIZE", "PAGES", "PRESENT", "ZERO", "FILE REGION")]
    for b in info.blocks:
        region = f"{b.bitmap_offset:#x}..{b.end:#x} (pages at {b.pages_offset:#x})"
        rows.append(
            (shown(b.name), human_bytes(b.size), str(b.pages), str(b.present_pages),
             str(b.zero_pages), region)
        )  # fmt: skip
    pages = sum(b.pages for b in info.blocks)
    rows.append(
        ("total", human_bytes(info.total_ram), str(pages), str(info.present_pages),
         str(info.zero_pages), f"{len(info.blocks)} block{'s' if len(info.blocks) != 1 else ''}")
    )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print()
    if info.complete:
        print(
            f"  present: {human_bytes(info.present_pages * 4096)} of page data, "
            f"{human_bytes(info.zero_pages * 4096)} zero"
        )
    else:
        print("  present: not reliable (bitmaps are written last: an interrupted save has none)")
    sums = info.checksums
    if not info.complete:
        print(f"  status:  INCOMPLETE ({info.problem}); migd restore refuses this file")
    elif info.bitmap_problem is not None:
        print(f"  status:  CORRUPT ({info.bitmap_problem}); migd restore refuses this file")
    elif sums is not None and sums.problem is not None:
        print(
            "  status:  CORRUPT checksum table; migd restore refuses this file unless "
            "'verify' is 'off'"
        )
    else:
        print("  status:  complete")


def _print_identity(info: Any) -> None:
    """The save id and the checksum table: what ties the file to the save that wrote it."""
    sums = info.checksums
    print(f"  save id:       {shown(info.save_id or '-')}")
    if not info.complete:
        print("  checksums:     not read (the file is incomplete)")
    elif sums is None:
        print("  checksums:     none (a QEMU file, or saved without checksums)")
    elif sums.problem is not None:
        print(f"  checksums:     CORRUPT: {sums.problem}")
    else:
        print(
            f"  checksums:     {sums.algorithm} of each {sums.unit_bytes // (1 << 20)} MiB, "
            f"{sums.units} units; table of {sums.table_bytes} bytes at {sums.table_offset:#x}"
        )
        print(f"  table digest:  {sums.table_digest} (the checksum of the checksums)")


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from ..tools.inspect import InspectError, inspect_file
    from ..tools.vm import describe

    try:
        image = describe(args.file) if args.offset == 0 else None
        if image is not None:
            return _print_vm_image(image, args.json)
        info = inspect_file(args.file, args.offset)
    except InspectError as exc:
        print(f"migd inspect: {args.file}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"migd inspect: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        if args.json:
            print(json.dumps(info.to_dict(), indent=2))
        else:
            _print_inspect(info)
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_FAILED
    if not info.complete:
        if args.json:
            print(f"migd inspect: {args.file}: incomplete: {info.problem}", file=sys.stderr)
        return EXIT_FAILED
    if info.bitmap_problem is not None:
        if args.json:
            print(f"migd inspect: {args.file}: {info.bitmap_problem}", file=sys.stderr)
        return EXIT_FAILED
    if info.checksums is not None and info.checksums.problem is not None:
        if args.json:
            print(f"migd inspect: {args.file}: {info.checksums.problem}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _print_vm_image(image: dict[str, Any], as_json: bool) -> int:
    """`migd inspect` of a `migd vm save` image: its header, then both parts."""
    import json

    from ..tools.client import human_bytes

    path, header, problems = image["image"], image["header"], image["problems"]
    if as_json:
        print(json.dumps(image, indent=2))
    elif header is None:
        print(f"{path}: migd VM image, UNUSABLE")
    else:
        dev, ram, qemu = header["device-state"], header["ram"], header["qemu"]
        print(f"{path}: migd VM image{' (DAMAGED)' if problems else ''}")
        print(f"  image id:      {shown(header['image-id'])}")
        print(
            f"  created:       {shown(header['created'])} by migd "
            f"{shown(header['migd-version'])}"
        )
        print(f"  QEMU:          {shown(qemu['version'])}, machine {shown(qemu['machine'])}")
        print(
            f"  device state:  {human_bytes(dev['length'])} at {dev['offset']:#x} "
            f"(QEMU's stream, x-ignore-shared), sha256 {dev['sha256'][:16]}..."
        )
        print(
            f"  RAM:           {human_bytes(ram['length'])} at {ram['offset']:#x} "
            f"(migd's mapped-ram save {shown(ram['save-id'])})"
        )
        rows = [("BACKEND", "SIZE", "BLOCK", "SAVED FROM")]
        rows += [(shown(b["id"]), human_bytes(b["size"]), shown(b["block"]),
                  shown(b["mem-path"])) for b in header["backends"]]  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        print()
        for row in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        part = image["ram-part"]
        if part is not None:
            print()
            print(
                f"  RAM part: {part['totals']['present_bytes'] / (1 << 20):.1f} MiB of page "
                f"data, {part['totals']['zero_pages']} zero pages, checksums "
                f"{'none' if part['checksums'] is None else part['checksums']['algorithm']}"
            )
    for problem in problems:
        print(f"migd inspect: {path}: {shown(problem)}", file=sys.stderr)
    if not as_json and header is not None and not problems:
        # inspect reads no page data: a flipped page is found by verify (or the restore).
        print("  status:   complete (migd vm restore accepts its structure; "
              "`migd verify` checks every page)")  # fmt: skip
    return EXIT_FAILED if problems else EXIT_OK


def _print_verify(report: object) -> None:
    from ..tools.client import human_bytes
    from ..tools.verify import VerifyReport

    assert isinstance(report, VerifyReport)
    r = report
    where = f"{r.path},offset={r.offset}" if r.offset else r.path
    if r.checksums:
        print(f"{where}: good: structure and all {r.units_checked} checksums verified")
    else:
        print(f"{where}: structure good; no checksums: structure only")
    print(f"  blocks:    {r.blocks}")
    print(
        f"  pages:     {r.present_pages} present of {r.pages} "
        f"({human_bytes(r.present_pages * 4096)} of page data)"
    )
    if not r.checksums:
        print('  checksums: none (a QEMU file, or a migd save made with "checksums": false);')
        print("             the page data was not checked")
        return
    print(f"  units:     {r.units_checked} of {r.units} checked (xxh3-128 of each MiB)")
    how = f"{r.threads} thread{'s' if r.threads != 1 else ''}, "
    how += "O_DIRECT" if r.direct_io else "page cache"
    print(
        f"  read:      {human_bytes(r.bytes_read)} ({r.bytes_read} bytes) in "
        f"{r.seconds:.2f} s, {r.gib_per_s:.2f} GiB/s ({how})"
    )
    print(f"  save id:   {shown(r.save_id)}")
    print(f"  table:     xxh3-128 {r.table_digest} (the checksum of the checksums)")


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


def cmd_verify(args: argparse.Namespace) -> int:
    import json

    from ..tools.client import Progress
    from ..tools.verify import CorruptError, FileInUse, NotASaveError, VerifyReport, verify_save

    path, offset = args.file
    progress = Progress("verify", sys.stderr, quiet=args.quiet)

    def show(done: Any) -> None:
        total = done.bytes_total
        progress.update(
            {"status": "active", "ram": {"total": total, "remaining": total - done.bytes_read}}
        )

    def warn(text: str) -> None:
        print(f"migd verify: {text}", file=sys.stderr, flush=True)

    def failed(status: str, text: str, code: int) -> int:
        print(f"migd verify: {text}", file=sys.stderr)
        if args.json:
            out = {"path": path, "offset": offset, "status": status, "error": text}
            print(json.dumps(out, indent=2))
        return code

    try:
        image = _vm_image_to_verify(path, offset)
        if image is not None:
            offset = image.ram.offset  # the pages: the RAM part's, as a restore reads them
        try:
            report: VerifyReport = verify_save(
                path, offset, args.threads, on_progress=show, warn=warn
            )
        finally:
            progress.close()
        if image is not None:
            _check_image_ram(path, image, report)
    except KeyboardInterrupt:
        print("migd verify: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FileInUse as exc:
        return failed("in-use", str(exc), EXIT_FAILED)
    except NotASaveError as exc:
        return failed("not-a-save", str(exc), EXIT_USAGE)
    except CorruptError as exc:
        return failed("corrupt", str(exc), EXIT_FAILED)
    try:
        if args.json:
            out = report.to_dict()
            if image is not None:
                out["vm-image"] = image.to_json()
            print(json.dumps(out, indent=2))
        else:
            if image is not None:
                _print_verified_image(path, image)
            _print_verify(report)
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_FAILED
    return EXIT_OK


def _vm_image_to_verify(path: str, offset: int) -> Any:
    """The header of a `migd vm save` image named without an offset, its header, device
    state and RAM part's structure checked (CorruptError otherwise); None for a save file."""
    from ..tools.client import ClientError
    from ..tools.verify import CorruptError
    from ..tools.vm import check_image_file

    if offset != 0:
        return None
    try:
        return check_image_file(path)
    except ClientError as exc:
        raise CorruptError(str(exc)) from None


def _check_image_ram(path: str, image: Any, report: Any) -> None:
    """The RAM part verified must still be the one the header names (the file may have
    been rewritten between the header's check and the pages')."""
    from ..tools.verify import CorruptError

    if (report.save_id, report.table_digest) != (image.ram.save_id, image.ram.table_digest):
        raise CorruptError(
            f"'{path}': its RAM part is save {report.save_id}, the header names save "
            f"{image.ram.save_id}: the parts do not belong together"
        )


def _print_verified_image(path: str, image: Any) -> None:
    print(
        f"{shown(path)}: migd VM image {image.image_id}: header and device state "
        f"({image.device.length} bytes, SHA-256) good; its RAM part:"
    )


def _run_client(name: str, coro: Coroutine[Any, Any, int]) -> int:
    """Runs a client coroutine; maps its exceptions to exit codes."""
    from ..tools.client import ClientError, UsageError

    try:
        result = asyncio.run(coro)
    except UsageError as exc:
        print(f"migd {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ClientError as exc:
        print(f"migd {name}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"migd {name}: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # `migd status | head`: not worth a traceback
        _drop_stdout()
        return EXIT_FAILED
    return result


def _drop_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def cmd_migrate(args: argparse.Namespace) -> int:
    from ..tools.client import MigrateOptions, run_migration

    opts = MigrateOptions(
        file=args.file,
        offset=args.offset,
        backends=args.backend,
        mem_path=args.mem_path,
        size=args.size,
        id=args.id,
        block_name=args.block_name,
        channels=args.channels,
        direct_io=False if args.no_direct_io else None,
        skip_unmatched=getattr(args, "skip_unmatched", False),
        quiet=args.quiet,
        max_bandwidth=args.max_bandwidth,
        job_id=args.job_id,
    )
    socket = args.socket or default_socket_path()
    return _run_client(
        args.command, run_migration(args.command, socket, opts, sys.stdout, sys.stderr)
    )


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from ..tools.client import format_jobs, format_status, run_status

    async def status() -> int:
        info, jobs = await run_status(args.socket or default_socket_path())
        if args.json:  # query-migrate's object, with query-jobs as "jobs" when there are any
            print(json.dumps({**info, "jobs": jobs} if jobs else info, indent=2))
            return EXIT_OK
        lines = format_status(info)
        if jobs:
            lines += ["", "jobs:", *("  " + line for line in format_jobs(jobs))]
        print("\n".join(lines))
        return EXIT_OK

    return _run_client("status", status())


def cmd_call(args: argparse.Namespace) -> int:
    import json

    from ..tools.client import run_call

    try:
        arguments = json.loads(args.arguments)
    except json.JSONDecodeError as exc:
        print(f"migd call: arguments are not valid JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(arguments, dict):
        print("migd call: arguments must be a JSON object, like '{}'", file=sys.stderr)
        return EXIT_USAGE

    async def call() -> int:
        from qemu.qmp import ExecuteError

        try:
            result = await run_call(
                args.socket or default_socket_path(), args.qmp_command, arguments
            )
        except ExecuteError as exc:
            print(f"error: {exc.error_class}: {exc.error.error.desc}", file=sys.stderr)
            return EXIT_FAILED
        print(json.dumps(result, indent=2))
        return EXIT_OK

    return _run_client("call", call())


def cmd_jobs(args: argparse.Namespace) -> int:
    from ..tools.client import run_jobs

    return _run_client(
        "jobs", run_jobs(args.socket or default_socket_path(), sys.stdout, args.watch, args.json)
    )


def cmd_vm(args: argparse.Namespace) -> int:
    from ..tools.vm import VmOptions, run_vm_restore, run_vm_save

    opts = VmOptions(
        image=args.image,
        qmp=args.qmp,
        socket=args.socket or default_socket_path(),
        channels=args.channels,
        direct_io=False if args.no_direct_io else None,
        quiet=args.quiet,
        json=args.json,
        qemu_timeout=args.qemu_timeout,
    )
    if args.vm_command == "save":
        opts.after = "resume" if args.resume else "quit" if args.quit else "pause"
        opts.live = args.live
        return _run_client("vm save", run_vm_save(opts, sys.stdout, sys.stderr))
    opts.paused = args.paused
    opts.accept_partial = args.accept_partial
    opts.postcopy = args.postcopy
    return _run_client("vm restore", run_vm_restore(opts, sys.stdout, sys.stderr))


CLIENT_HANDLERS = {
    "vm": cmd_vm,
    "inspect": cmd_inspect,
    "verify": cmd_verify,
    "save": cmd_migrate,
    "restore": cmd_migrate,
    "status": cmd_status,
    "jobs": cmd_jobs,
    "call": cmd_call,
}


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    # Everything printed, the daemon's log lines included, is free of control sequences.
    with safe_output():
        args = build_parser().parse_args(argv)
        handlers = {
            "serve": cmd_serve, "schema": cmd_schema, "bench": cmd_bench, **CLIENT_HANDLERS
        }  # fmt: skip
        return handlers[args.command](args)
