"""Client commands (`migd save`, `restore`, `status`, `jobs`, `call`): a QMP client of a
running migd.

Everything here is a coroutine that returns an exit code or raises `UsageError` (exit 2) /
`ClientError` (exit 1); the command line picks the event loop and prints the errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import mmap
import os
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..errors import MigrationError
from ..io.target import parse_offset as parse_uri_offset
from ..procstat import read_stat
from ..signals import wants_caught_signals
from ..units import size_bytes
from .terminal import shown, write_control

FINAL_STATES = ("completed", "failed", "cancelled")
# How long migd may take to greet or to answer one command. Its commands answer at once
# (long work runs as jobs, followed by polls), so only a hung or impostor server takes
# this long: the client then says so and ends, where it used to wait for ever.
ANSWER_TIMEOUT = 60.0
POLL_PERIOD = 0.1
LINE_PERIOD = 1.0  # plain progress lines: at most one a second
CANCEL_TIMEOUT = 60.0
GiB = 1 << 30


class UsageError(Exception):
    """Bad arguments or no daemon to talk to: exit code 2."""


class ClientError(Exception):
    """The daemon refused a command or the migration failed: exit code 1."""


def parse_size(text: str) -> int:
    """'4096', '512K', '64M', '2G', '1T' (binary units, optional 'B'/'iB')."""
    size = size_bytes(text)
    if size is None:
        raise ValueError(f"'{text}' is not a size like 4096, 512K, 64M or 2G")
    return size


def parse_offset(text: str) -> int:
    """A size as QEMU reads a file: URI's offset (4096, 0x1000, 4k): the daemon's own
    parser of file: URI offsets, so that the client takes exactly what a URI may carry;
    with the command line's error text."""
    try:
        return parse_uri_offset(text)
    except MigrationError:
        raise ValueError(
            f"'{text}' is not an offset (a size as in a file: URI: 4096, 0x1000, 4k, 1M)"
        ) from None


def human_bytes(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _lost_text(exc: BaseException) -> str:
    """Why the connection to migd ended, in an operator's words: qemu.qmp's own text for a
    peer that went away ("QMPClient is disconnecting. Call disconnect() to return to IDLE
    state.") is about its API, not about migd."""
    from qemu.qmp import QMPError

    if isinstance(exc, (EOFError, ConnectionResetError, BrokenPipeError)) or (
        isinstance(exc, QMPError) and not isinstance(exc, OSError)
    ):
        return "migd closed it (it stopped or was killed)"
    return _error_text(exc)


def _error_text(exc: BaseException) -> str:
    from qemu.qmp import ExecuteError

    if isinstance(exc, ExecuteError):
        return f"{exc.error_class}: {exc.error.error.desc}"
    return str(exc) or type(exc).__name__


# --- connection ---------------------------------------------------------------------------


def unix_socket(client: Any) -> socket.socket:
    """A connected QMPClient's UNIX socket, found as QMPClient.send_fd_scm finds it."""
    writer = getattr(client, "_writer", None)
    sock = writer.transport.get_extra_info("socket") if writer is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        raise ClientError("the QMP connection is not a UNIX socket: cannot tell who serves it")
    return sock


def peer_credentials(client: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a QMPClient's UNIX socket, as
    the kernel saw it when that process listened (SO_PEERCRED)."""
    sock = unix_socket(client)
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return int(pid), int(uid), int(gid)


def check_migd_server(client: Any, socket_path: str) -> None:
    """migd's socket must be served by root or by this user: a listener of another local
    user's (a socket directory they swapped) would be handed the memory fds the client
    passes, read-write (red-team, session 13)."""
    pid, uid, _ = peer_credentials(client)
    if uid not in (0, os.geteuid()):
        raise UsageError(
            f"{socket_path} is served by uid {uid} (pid {pid}), neither root nor you: not "
            "a migd this client trusts with memory; nothing was sent to it"
        )


async def connect(
    socket_path: str,
    name: str = "migd-cli",
    failure: str | None = None,
    *,
    check_server: bool = True,
    scoped: bool = False,
) -> Any:
    """A negotiated QMPClient, or UsageError naming the socket and how to start migd
    (`failure`: the text for another server, e.g. a VM's QEMU, which `check_server`
    False lets run as any user; migd's must be root's or this user's). `scoped`: migd
    releases what this connection creates when it ends (x-migd-session-scope), so that
    a client killed midway leaves nothing behind."""
    try:
        from qemu.qmp import QMPClient
    except ImportError:
        raise UsageError(
            "the client commands need the 'qemu.qmp' package: pip install qemu.qmp"
        ) from None
    client = QMPClient(name)
    try:
        await _watched(client, client.connect(socket_path))
    except TimeoutError:
        await disconnect(client)
        raise UsageError(
            f"{failure or f'migd at {socket_path}'}: no answer within {ANSWER_TIMEOUT:g} s "
            f"(the server{_peer_text(client, '')} accepts connections but does not speak QMP)"
        ) from None
    except StoppedServer as exc:
        await disconnect(client)
        raise UsageError(f"{failure or f'migd at {socket_path}'} does not answer: {exc}") from None
    except Exception as exc:
        cause = getattr(exc, "exc", exc)
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        if failure is not None:
            raise UsageError(f"{failure}: {reason}") from None
        if not isinstance(cause, OSError):
            # Something listens there and answered, but not with a QMP greeting: "is the
            # daemon running? start it" (and a codec's error text alone) misled.
            raise UsageError(
                f"{socket_path} answered, but not as migd's QMP server does: {reason} "
                "(another program listens on it?)"
            ) from None
        if isinstance(cause, ConnectionRefusedError):
            # The socket file is there, but nothing listens: "is the daemon running?"
            # hid that a migd may be stopping now (its listener closes first and its
            # socket goes last), or died and left it (red-team, round 10c).
            raise UsageError(
                f"cannot connect to migd at {socket_path}: {reason}: the socket is there "
                "but nothing listens on it (a migd stopping, or one that was killed and "
                f"left it); start one with: migd serve --socket {socket_path}"
            ) from None
        raise UsageError(
            f"cannot connect to migd at {socket_path}: {reason}\n"
            f"is the daemon running? start it with: migd serve --socket {socket_path}"
        ) from None
    if check_server:
        try:
            check_migd_server(client, socket_path)
        except BaseException:
            await disconnect(client)
            raise
    if scoped:
        try:
            await execute(client, "x-migd-session-scope")
        except BaseException:
            await disconnect(client)
            raise
    return client


async def _answer(command: str, reply: Awaitable[Any], client: Any = None) -> Any:
    """`reply`, or ClientError once migd has taken ANSWER_TIMEOUT to give it, or as soon
    as its process is seen stopped."""
    try:
        return await _watched(client, reply)
    except TimeoutError:
        raise ClientError(
            f"{command}: migd did not answer within {ANSWER_TIMEOUT:g} s (is it hung?"
            f"{_peer_text(client, ' its process:')})"
        ) from None
    except StoppedServer as exc:
        raise ClientError(f"{command}: migd does not answer: {exc}") from None


class StoppedServer(Exception):
    """The server's process is stopped: it answers nothing until it is continued."""


# How often a client waiting for an answer looks whether the server's process is stopped.
PEER_CHECK_PERIOD = 0.5


async def _watched(client: Any, reply: Awaitable[Any]) -> Any:
    """`reply` within ANSWER_TIMEOUT (TimeoutError after it), or StoppedServer as soon as
    the server's process (SO_PEERCRED) is seen stopped. A migd stopped by SIGSTOP, a
    debugger or a frozen cgroup still has the kernel accept connections to its socket,
    so `migd status` waited the whole minute and then called it "a server that does not
    speak QMP" (red-team, round 10c)."""
    task = asyncio.ensure_future(reply)
    deadline = asyncio.get_running_loop().time() + ANSWER_TIMEOUT
    try:
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError
            done, _ = await asyncio.wait({task}, timeout=min(PEER_CHECK_PERIOD, remaining))
            if done:
                return task.result()
            stopped = stopped_peer(client)
            if stopped is not None:
                raise StoppedServer(stopped)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _peer(client: Any) -> tuple[int, str, str] | None:
    """(pid, command name, state letter of /proc/PID/stat) of the server's process, if
    the connection exists and the process is visible here."""
    try:
        pid, _, _ = peer_credentials(client)
        if pid <= 0:  # a server in another pid namespace
            return None
        comm, fields = read_stat(pid)
    except (ClientError, OSError, AttributeError, ValueError):
        return None
    return pid, comm, fields[0][:1] if fields else ""


def _peer_text(client: Any, lead: str) -> str:
    """' pid N (COMM)' after `lead` for a timeout's text, or nothing if it is unknown."""
    peer = _peer(client) if client is not None else None
    return "" if peer is None else f"{lead} pid {peer[0]} ({shown(peer[1])})"


def stopped_peer(client: Any) -> str | None:
    """Why the server cannot answer, if its process is stopped; else None."""
    peer = _peer(client) if client is not None else None
    if peer is None or peer[2] not in ("T", "t"):
        return None
    pid, comm = peer[0], shown(peer[1])
    if peer[2] == "t":
        return f"its process (pid {pid}, {comm}) is stopped by a debugger that traces it"
    return (
        f"its process (pid {pid}, {comm}) is stopped (SIGSTOP, SIGTSTP or a job control "
        f"stop): `kill -CONT {pid}` lets it go on"
    )


async def execute(client: Any, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
    """Run one command; a daemon error becomes ClientError 'command: CLASS: desc'."""
    from qemu.qmp import ExecuteError, QMPError

    try:
        return await _answer(
            command,
            client.execute(command, dict(arguments) if arguments is not None else None),
            client,
        )
    except ExecuteError as exc:
        raise ClientError(f"{command}: {exc.error.error.desc}") from exc
    except (QMPError, OSError, EOFError) as exc:
        raise ClientError(f"{command}: lost the connection to migd: {_lost_text(exc)}") from exc


async def disconnect(client: Any) -> None:
    with contextlib.suppress(Exception):
        await client.disconnect()


# --- call / status ------------------------------------------------------------------------


async def run_call(socket_path: str, command: str, arguments: dict[str, Any]) -> Any:
    """Any command; ExecuteError propagates so that the caller prints its class."""
    from qemu.qmp import ExecuteError, QMPError

    client = await connect(socket_path)
    try:
        return await _answer(command, client.execute(command, arguments), client)
    except ExecuteError:
        raise
    except (QMPError, OSError, EOFError) as exc:
        raise ClientError(f"{command}: lost the connection to migd: {_lost_text(exc)}") from exc
    finally:
        await disconnect(client)


async def run_status(socket_path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(query-migrate, query-jobs)."""
    client = await connect(socket_path)
    try:
        return await execute(client, "query-migrate"), await execute(client, "query-jobs")
    finally:
        await disconnect(client)


def format_status(info: Mapping[str, Any]) -> list[str]:
    """query-migrate in human form."""
    if not info:
        return ["no migration has run since migd started"]
    lines = [f"status:       {info.get('status', '?')}"]
    if "total-time" in info:
        lines.append(f"total time:   {info['total-time'] / 1000:.2f} s")
    if "setup-time" in info:
        lines.append(f"setup time:   {info['setup-time'] / 1000:.2f} s")
    ram = info.get("ram")
    if ram:
        total, remaining = ram.get("total", 0), ram.get("remaining", 0)
        done = max(0, total - remaining)
        pct = 100 * done / total if total else 100.0
        lines.append(f"progress:     {pct:.0f}% ({human_bytes(done)} of {human_bytes(total)})")
        lines.append(f"transferred:  {human_bytes(ram.get('transferred', 0))}")
        page = ram.get("page-size", 4096) or 4096
        lines.append(
            f"pages:        {ram.get('normal', 0)} with data, {ram.get('duplicate', 0)} zero "
            f"({page} bytes each)"
        )
        mbps = ram.get("mbps", 0)
        lines.append(f"throughput:   {mbps * 1e6 / 8 / GiB:.2f} GiB/s ({mbps:.1f} mbps)")
    if info.get("x-skipped-blocks"):
        lines.append(f"skipped:      {', '.join(info['x-skipped-blocks'])}")
    if info.get("error-desc"):
        lines.append(f"error:        {info['error-desc']}")
    return lines


# --- direct-io probe ----------------------------------------------------------------------


def _odirect_io(fd: int, write: bool) -> bool:
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    try:
        if write:
            os.pwritev(fd, [buf], 0)
        else:
            os.preadv(fd, [buf], 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        buf.close()
    return True


def probe_direct_io(path: str, for_write: bool) -> bool:
    """Whether the filesystem holding `path` takes O_DIRECT I/O (EINVAL means it doesn't).

    A save probes a scratch file next to the target; a restore reads the file itself.
    Any other failure answers False and leaves the real error to the daemon.
    """
    o_direct = getattr(os, "O_DIRECT", 0)
    if not o_direct:
        return False
    try:
        if not for_write:
            # The name pinned (O_PATH) and checked before anything opens it: a device
            # swapped in would act on open() alone. O_NONBLOCK: never wait on anything.
            pinned = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if not stat.S_ISREG(os.fstat(pinned).st_mode):
                    return False  # the daemon words the refusal
                fd = os.open(
                    f"/proc/self/fd/{pinned}", os.O_RDONLY | os.O_NONBLOCK | o_direct | os.O_CLOEXEC
                )
            finally:
                os.close(pinned)
            try:
                return _odirect_io(fd, write=False)
            finally:
                os.close(fd)
        directory = os.path.dirname(os.path.abspath(path))
        probe = os.path.join(directory, f".migd-direct-io-probe-{os.getpid()}")
        # Opened once, new (O_EXCL, no link followed), and O_DIRECT added to that very fd:
        # opening the name again let another user swap a link in between and have the
        # probe's 4 KiB of zeros written over any file (red-team, session 14).
        fd = os.open(
            probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | o_direct)
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # the filesystem refuses O_DIRECT
                    return False
                raise
            return _odirect_io(fd, write=True)
        finally:
            created = os.fstat(fd)
            os.close(fd)
            with contextlib.suppress(OSError):
                now = os.lstat(probe)
                if (now.st_dev, now.st_ino) == (created.st_dev, created.st_ino):
                    os.unlink(probe)
    except OSError:
        return False


# --- progress -----------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal; otherwise a plain line at most once a second."""

    def __init__(self, direction: str, stream: TextIO, quiet: bool = False) -> None:
        self.direction, self.stream, self.quiet = direction, stream, quiet
        self.bar: Any = None
        self._tqdm: Any = None
        self._last_line = time.monotonic()  # the first line comes after a second of work
        self._samples: list[tuple[float, int]] = [(self._last_line, 0)]
        if stream.isatty() and not quiet:
            try:
                from tqdm import tqdm
            except ImportError:  # plain lines, then
                pass
            else:
                self._tqdm = tqdm

    def _rate(self, now: float, done: int) -> float:
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > 3.0:
            self._samples.pop(0)
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def update(self, info: Mapping[str, Any]) -> None:
        ram = info.get("ram")
        if self.quiet or not ram or info.get("status") not in ("active", "completed"):
            return
        total = ram.get("total", 0)
        done = max(0, total - ram.get("remaining", 0))
        now = time.monotonic()
        rate = self._rate(now, done)
        if self._tqdm is not None:
            if self.bar is None:  # made once the total is known
                self.bar = self._tqdm(
                    desc=self.direction,
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=self.stream,
                    dynamic_ncols=True,
                )
            self.bar.update(done - self.bar.n)
            return
        if info.get("status") != "active" or now - self._last_line < LINE_PERIOD:
            return  # the summary line reports the end
        self._last_line = now
        pct = 100 * done / total if total else 100.0
        print(
            f"{self.direction} {pct:.0f}% {human_bytes(done)}/{human_bytes(total)} "
            f"{rate / GiB:.2f} GiB/s",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = self._tqdm = None
        self.quiet = True  # nothing more after the bar is gone (e.g. while cancelling)


def summary_line(direction: str, target: str, info: Mapping[str, Any]) -> str:
    ram = info.get("ram") or {}
    total = ram.get("total", 0)
    seconds = max(info.get("total-time", 0), 1) / 1000
    data = ram.get("normal-bytes", 0)
    zero = ram.get("duplicate", 0) * (ram.get("page-size", 4096) or 4096)
    return (
        f"{direction} completed: {human_bytes(total)} in {seconds:.2f} s, "
        f"{total / seconds / GiB:.2f} GiB/s ({human_bytes(data)} data, "
        f"{human_bytes(zero)} zero pages) {'->' if direction == 'save' else '<-'} {target}"
    )


# --- save / restore -----------------------------------------------------------------------


@dataclass
class MigrateOptions:
    file: str
    offset: int = 0
    backends: list[str] = field(default_factory=list)
    mem_path: str | None = None
    size: int | None = None
    id: str | None = None
    block_name: str | None = None
    channels: int | None = None
    direct_io: bool | None = None  # None: probe the filesystem
    skip_unmatched: bool = False
    quiet: bool = False
    max_bandwidth: int = 0  # bytes/s, 0 = unlimited
    job_id: str | None = None

    @property
    def as_job(self) -> bool:
        """--job-id or --backend: a memory-save / memory-restore job of chosen backends,
        alongside other jobs; otherwise migrate / migrate-incoming of every backend."""
        return self.job_id is not None or bool(self.backends)


# --mem-path's backend id, and so its block name: QEMU's usual id for a guest's RAM, so a
# save made by the CLI restores over QMP into a backend named ram0 (and the other way round).
DEFAULT_BACKEND_ID = "ram0"


def _uri_arguments(path: str, offset: int) -> dict[str, Any]:
    if "," in path:  # a comma would end the path inside a file: URI
        addr = {"transport": "file", "filename": path, "offset": offset}
        return {"channels": [{"channel-type": "main", "addr": addr}]}
    return {"uri": f"file:{path}" + (f",offset={offset}" if offset else "")}


def _file_backend(direction: str, opts: MigrateOptions) -> dict[str, Any] | None:
    """object-add arguments for --mem-path; a restore takes size and block name from FILE."""
    if opts.mem_path is None:
        if opts.size is not None or opts.id is not None or opts.block_name is not None:
            raise UsageError("--size, --id and --block-name go with --mem-path")
        return None
    # A job's backend is named after the job (and so, in a save, is its block): backend
    # ids and block names are unique in a daemon, and other jobs may run beside this one.
    backend_id = opts.id or opts.job_id or DEFAULT_BACKEND_ID
    size, block_name = opts.size, opts.block_name
    if direction == "restore" and (size is None or block_name is None):
        from .inspect import InspectError, inspect_file

        try:
            saved = inspect_file(opts.file, opts.offset)
        except (InspectError, OSError) as exc:
            raise UsageError(
                f"cannot read {opts.file} to choose the block ({exc}): give --size and --block-name"
            ) from None
        if block_name is None:
            if opts.id and any(b.name == opts.id for b in saved.blocks):
                block_name = opts.id
            elif len(saved.blocks) == 1:
                block_name = saved.blocks[0].name
            else:
                names = ", ".join(b.name for b in saved.blocks)
                raise UsageError(
                    f"{opts.file} has {len(saved.blocks)} blocks ({names}): "
                    "say which one goes to --mem-path with --block-name"
                )
        if size is None:
            sizes = [b.size for b in saved.blocks if b.name == block_name]
            if not sizes:
                raise UsageError(f"{opts.file} has no block named '{block_name}'")
            size = sizes[0]
    if size is None:
        try:
            size = os.stat(opts.mem_path).st_size or None
        except OSError:
            size = None
        if size is None:
            raise UsageError(f"--size is required: {opts.mem_path} does not exist or is empty")
    args: dict[str, Any] = {
        "qom-type": "memory-backend-file",
        "id": backend_id,
        "size": size,
        "mem-path": os.path.abspath(opts.mem_path),
        "share": True,
    }
    if block_name is not None and block_name != backend_id:
        args["ramblock-name"] = block_name
    return args


def _backend_line(backend: Mapping[str, Any]) -> str:
    """What --mem-path was called: a QMP restore of the save needs a backend of that block."""
    block = backend.get("ramblock-name", backend["id"])
    return f"block '{block}' (memory backend '{backend['id']}' on {backend['mem-path']})"


async def _check_backends(client: Any, direction: str, wanted: list[str], job: bool) -> None:
    """--backend: each must exist; a migrate must cover all of them, since it saves every
    one (a job saves only its own)."""
    have = [m["id"] for m in await execute(client, "query-memdev")]
    missing = [b for b in wanted if b not in have]
    if missing:
        raise ClientError(f"no memory backend {', '.join(repr(b) for b in missing)} in migd")
    others = [b for b in have if b not in wanted]
    if direction == "save" and others and not job:
        raise ClientError(
            "migd saves every memory backend, and it also has "
            f"{', '.join(repr(b) for b in others)}: list them with --backend "
            "or remove them with object-del"
        )


class Interrupt:
    """SIGINT/SIGTERM/SIGHUP during a migration: ask for migrate_cancel, don't die
    mid-way. SIGHUP too: a client whose terminal or ssh session went away died at once,
    leaving its backend and job in the daemon for the next run to trip over (red-team,
    session 14)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.count = 0
        self.received: list[int] = []
        self._loop = asyncio.get_running_loop()
        self._installed: dict[int, Any] = {}  # signal -> its handler before

    def _fire(self, sig: int) -> None:
        self.count += 1
        self.received.append(sig)
        self.event.set()

    def __enter__(self) -> Interrupt:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                before = signal.getsignal(sig)
                self._loop.add_signal_handler(sig, self._fire, sig)
                self._installed[sig] = before
        return self

    def __exit__(self, *exc: object) -> None:
        """The handlers from before put back (asyncio's remove_signal_handler sets the
        default ones), and a signal caught here handed on to a handler of the caller's
        own: an in-process caller (`migd bench --vm`) otherwise never saw the SIGTERM
        that ended the command, and went on to its next round (and a later SIGTERM then
        killed it outright, its daemon and memory files left behind)."""
        for sig, before in self._installed.items():
            self._loop.remove_signal_handler(sig)
            if before is not None:
                signal.signal(sig, before)
        for sig in dict.fromkeys(self.received):
            if wants_caught_signals(self._installed.get(sig)):
                signal.raise_signal(sig)  # the caller's handler acts now (or raises)


async def _follow_until_final(
    poll: Callable[[], Awaitable[dict[str, Any]]],
    is_final: Callable[[dict[str, Any]], bool],
    cancel: Callable[[], Awaitable[object]],
    interrupt: Interrupt,
    progress: Progress,
    direction: str,
    still_cancelling: str,
) -> tuple[dict[str, Any], bool]:
    """Poll until `is_final`; (the last answer, whether the user cancelled). The first
    Ctrl-C cancels through `cancel`; a second, or no end within CANCEL_TIMEOUT, gives up
    with `still_cancelling`."""
    cancelled_at: float | None = None
    while True:
        answer = await poll()
        if is_final(answer):
            return answer, cancelled_at is not None
        if interrupt.event.is_set():
            if cancelled_at is None:
                progress.close()
                print(f"interrupted: cancelling the {direction}", file=sys.stderr, flush=True)
                cancelled_at = time.monotonic()
                await cancel()
            elif interrupt.count > 1 or time.monotonic() - cancelled_at > CANCEL_TIMEOUT:
                raise ClientError(f"{direction} interrupted; {still_cancelling}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(interrupt.event.wait(), POLL_PERIOD)
        if cancelled_at is not None:
            await asyncio.sleep(POLL_PERIOD)  # the event stays set: don't spin


async def _follow(
    client: Any, interrupt: Interrupt, progress: Progress, direction: str
) -> tuple[dict[str, Any], bool]:
    """Poll query-migrate until a final state; (last info, whether the user cancelled)."""

    async def poll() -> dict[str, Any]:
        info = await execute(client, "query-migrate")
        progress.update(info)
        return info

    return await _follow_until_final(
        poll,
        lambda info: info.get("status") in FINAL_STATES,
        lambda: execute(client, "migrate_cancel"),
        interrupt,
        progress,
        direction,
        "it may still be cancelling in migd",
    )


def _default_job_id(direction: str) -> str:
    """A job id for --backend without --job-id: unique among this host's clients."""
    return f"{direction}-{os.getpid()}"


async def run_migration(
    direction: str, socket_path: str, opts: MigrateOptions, out: TextIO, err: TextIO
) -> int:
    """`migd save` / `migd restore`: set up, start, follow to a final state, clean up."""
    from qemu.qmp import Runstate

    assert direction in ("save", "restore")
    opts.file = os.path.abspath(opts.file)  # the daemon has its own working directory
    if opts.as_job and opts.job_id is None:
        opts.job_id = _default_job_id(direction)
    backend = _file_backend(direction, opts)
    if opts.channels is None:
        opts.channels = min(4, os.cpu_count() or 1)
    direct_io = opts.direct_io
    if direct_io is None:
        direct_io = probe_direct_io(opts.file, for_write=direction == "save")

    # Scoped: killed midway, its backend, migration or job goes with its connection (its
    # own cleanup below and on SIGINT/SIGTERM does the same when it can run).
    client = await connect(socket_path, scoped=True)
    added = False
    try:
        with Interrupt() as interrupt:
            if backend is not None:
                try:
                    await execute(client, "object-add", backend)
                except ClientError as exc:
                    if "already exists" not in str(exc):
                        raise
                    # Most likely left by an earlier run killed before it could clean up.
                    raise ClientError(
                        f"{exc} (left by an earlier run that was killed? `migd call "
                        f"object-del '{{\"id\": \"{backend['id']}\"}}'` removes it, or give "
                        "another --id)"
                    ) from None
                added = True
            wanted = list(opts.backends) + ([backend["id"]] if backend else [])
            if wanted:
                await _check_backends(client, direction, wanted, opts.as_job)
            if opts.as_job:
                return await _run_job(
                    client, interrupt, direction, opts, wanted, direct_io, out, err, backend
                )
            await _start_migration(client, interrupt, direction, opts, direct_io)
            progress = Progress(direction, err, quiet=opts.quiet)
            try:
                info, by_user = await _follow(client, interrupt, progress, direction)
            finally:
                progress.close()
    finally:
        # Once the connection is gone there is no one to ask, and nothing to ask for: migd
        # deletes a connection's backends as it ends, or its process is gone with them.
        if added and backend is not None and client.runstate == Runstate.RUNNING:
            try:
                await execute(client, "object-del", {"id": backend["id"]})
            except ClientError as exc:
                print(f"warning: {exc}", file=err)
        await disconnect(client)

    status = info.get("status")
    if status == "completed":
        print(summary_line(direction, opts.file, info), file=out, flush=True)
        checks = info.get("x-checksums") or {}
        if direction == "restore" and checks.get("state") == "unverified":
            # Said where it is seen, not only in query-migrate: a file that lost its
            # checksums (or never had them) restores with nothing checked.
            print(f"not verified: {checks.get('note', 'the file has no checksums')}",
                  file=out, flush=True)  # fmt: skip
        if backend is not None:
            print(_backend_line(backend), file=out, flush=True)
        skipped = info.get("x-skipped-blocks")
        if skipped:
            print(f"skipped blocks without a backend: {', '.join(skipped)}", file=out)
        return 0
    if status == "cancelled" or by_user:
        raise ClientError(info.get("error-desc") or f"{direction} cancelled")
    raise ClientError(f"{direction} failed: {info.get('error-desc', 'unknown error')}")


async def _start_migration(
    client: Any, interrupt: Interrupt, direction: str, opts: MigrateOptions, direct_io: bool
) -> None:
    """migrate / migrate-incoming, with the daemon's capabilities and parameters set first."""
    caps = [{"capability": name, "state": True} for name in ("mapped-ram", "multifd", "events")]
    await execute(client, "migrate-set-capabilities", {"capabilities": caps})
    await execute(
        client,
        "migrate-set-parameters",
        {
            "multifd-channels": opts.channels,
            "direct-io": direct_io,
            "max-bandwidth": opts.max_bandwidth,
        },
    )
    if interrupt.event.is_set():
        raise ClientError(f"{direction} interrupted before it started")
    arguments = _uri_arguments(opts.file, opts.offset)
    if direction == "restore" and opts.skip_unmatched:
        arguments["skip-unmatched-blocks"] = True
    await execute(client, "migrate" if direction == "save" else "migrate-incoming", arguments)


# --- jobs (memory-save, memory-restore, query-jobs) ---------------------------------------


async def _run_job(
    client: Any,
    interrupt: Interrupt,
    direction: str,
    opts: MigrateOptions,
    backends: list[str],
    direct_io: bool,
    out: TextIO,
    err: TextIO,
    backend: Mapping[str, Any] | None,
) -> int:
    """memory-save / memory-restore with the job's own settings (the daemon's parameters,
    which other clients' jobs use too, are left alone), followed through query-jobs and
    dismissed once concluded."""
    assert opts.job_id is not None
    arguments: dict[str, Any] = {
        "job-id": opts.job_id,
        **_uri_arguments(opts.file, opts.offset),
        "multifd-channels": opts.channels,
        "direct-io": direct_io,
        "max-bandwidth": opts.max_bandwidth,
    }
    if backends:
        arguments["backends"] = backends
    if direction == "restore" and opts.skip_unmatched:
        arguments["skip-unmatched-blocks"] = True
    if interrupt.event.is_set():
        raise ClientError(f"{direction} interrupted before it started")
    started = time.monotonic()
    await execute(client, "memory-save" if direction == "save" else "memory-restore", arguments)
    progress = Progress(direction, err, quiet=opts.quiet)
    try:
        job, by_user = await _follow_job(client, interrupt, progress, direction, opts.job_id)
    finally:
        progress.close()
    seconds = time.monotonic() - started
    try:  # the job's outcome is known: failing to dismiss it does not change it
        await execute(client, "job-dismiss", {"id": opts.job_id})
    except ClientError as exc:
        print(f"warning: {exc}", file=err)
    error = job.get("error")
    if error is None:
        print(job_summary_line(direction, opts.file, job, seconds), file=out, flush=True)
        if backend is not None:
            print(_backend_line(backend), file=out, flush=True)
        return 0
    if by_user:
        raise ClientError(error)
    raise ClientError(f"{direction} failed: {error}")


def job_as_migration(job: Mapping[str, Any]) -> dict[str, Any]:
    """A query-jobs entry in query-migrate's terms, for Progress."""
    total, current = job.get("total-progress", 0), job.get("current-progress", 0)
    concluded = job.get("status") == "concluded"
    status = "active" if job.get("status") == "running" else "setup"
    if concluded:
        status = "completed" if job.get("error") is None else "failed"
    return {"status": status, "ram": {"total": total, "remaining": max(0, total - current)}}


async def _query_job(client: Any, job_id: str) -> dict[str, Any]:
    for job in await execute(client, "query-jobs"):
        if job.get("id") == job_id:
            return dict(job)
    raise ClientError(f"job '{job_id}' is gone from query-jobs (dismissed by another client?)")


async def _follow_job(
    client: Any, interrupt: Interrupt, progress: Progress, direction: str, job_id: str
) -> tuple[dict[str, Any], bool]:
    """Poll query-jobs until the job concludes; (its entry, whether the user cancelled)."""

    async def poll() -> dict[str, Any]:
        job = await _query_job(client, job_id)
        progress.update(job_as_migration(job))
        return job

    return await _follow_until_final(
        poll,
        lambda job: job.get("status") == "concluded",
        lambda: execute(client, "job-cancel", {"id": job_id}),
        interrupt,
        progress,
        direction,
        f"job '{job_id}' may still be cancelling in migd",
    )


def job_summary_line(direction: str, target: str, job: Mapping[str, Any], seconds: float) -> str:
    """As summary_line, for a job: its size, the client's wall time, the daemon's average."""
    total = job.get("total-progress", 0)
    gib_s = job.get("x-mbps", 0.0) * 1e6 / 8 / GiB
    backends = ", ".join(job.get("x-backends", [])) or "-"
    return (
        f"{direction} completed: {human_bytes(total)} in {max(seconds, 0.001):.2f} s, "
        f"{gib_s:.2f} GiB/s (job {job.get('id')}, backends {backends}) "
        f"{'->' if direction == 'save' else '<-'} {target}"
    )


JOB_TYPES = {"snapshot-save": "save", "snapshot-load": "restore"}
JOB_COLUMNS = ("ID", "TYPE", "STATUS", "PROGRESS", "MB/s", "FILE", "BACKENDS", "ERROR")


def job_row(job: Mapping[str, Any]) -> tuple[str, ...]:
    """One query-jobs entry as the cells of JOB_COLUMNS (MB/s: 10^6 bytes a second)."""
    total, current = job.get("total-progress", 0), job.get("current-progress", 0)
    percent = f"{100 * current / total:.0f}%" if total else "-"
    return (
        str(job.get("id", "?")),
        JOB_TYPES.get(job.get("type", ""), str(job.get("type", "?"))),
        str(job.get("status", "?")),
        percent,
        f"{job.get('x-mbps', 0.0) / 8:.1f}",
        str(job.get("x-file", "")),
        ",".join(job.get("x-backends", [])) or "-",
        str(job.get("error") or ""),
    )


def format_jobs(jobs: Sequence[Mapping[str, Any]]) -> list[str]:
    """query-jobs as an aligned table, or one line saying there are none."""
    if not jobs:
        return ["no jobs"]
    rows = [JOB_COLUMNS, *(job_row(job) for job in jobs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(JOB_COLUMNS))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


WATCH_PERIOD = 0.5  # `migd jobs --watch`: the table is redrawn about twice a second
CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, erase the screen


async def run_jobs(socket_path: str, out: TextIO, watch: bool, as_json: bool) -> int:
    """`migd jobs`: query-jobs once, or with `watch` until SIGINT/SIGTERM (exit 0)."""
    import json

    client = await connect(socket_path)
    try:
        if not watch:
            jobs = await execute(client, "query-jobs")
            print(json.dumps(jobs, indent=2) if as_json else "\n".join(format_jobs(jobs)), file=out)
            return 0
        tty = out.isatty()
        with Interrupt() as interrupt:
            while not interrupt.event.is_set():
                jobs = await execute(client, "query-jobs")
                stamp = time.strftime("%H:%M:%S")
                if as_json:
                    text = json.dumps(jobs)
                else:
                    text = "\n".join([f"migd jobs at {socket_path}, {stamp}", *format_jobs(jobs)])
                    if tty:
                        write_control(out, CLEAR_SCREEN)
                    else:
                        text += "\n"
                print(text, file=out, flush=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(interrupt.event.wait(), WATCH_PERIOD)
        return 0
    finally:
        await disconnect(client)
