"""The daemon: owns the server and the services; signals, readiness, shutdown order.

Shutdown (SIGTERM or SIGINT, with its own socket or one systemd passed) goes in uvicorn's
order, so that no client can start or change anything once the job is being stopped:

1. stop accepting: the listener is closed, a connect is refused from then on (a socket
   systemd passed stays open in systemd, which queues clients for the next migd);
2. close the client sessions: none reads another request (one already received but not
   started is not run), the request being handled gets SESSION_GRACE seconds to reply,
   queued replies and events are sent, the connections close, and the fds they left
   unused are closed (waited for qmp.server.FD_CLOSE_WAIT seconds at most);
3. cancel the job and release the services: MigrationEngine.close (the job gets
   STOP_TIMEOUT seconds to stop), the memory backends (but those of a job still stopping,
   whose threads may use them: left to the process's exit), the passed fds; last the
   socket file, if it is still the one this daemon made.

Each step is logged ("shutting down: ...", then "migd stopped"). The whole stays under
2 s: SESSION_GRACE plus the engine's STOP_TIMEOUT (plus FD_CLOSE_WAIT where a close
waits behind a client uid's stuck calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import resource
import signal
import socket
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sdnotify

from .. import __version__
from ..api.commands import Context, dispatch
from ..api.memory import create_backend
from ..api.scope import release, scope_of
from ..errors import ConfigError, MigdError
from ..io import blocking
from ..io.target import open_channel_fd
from ..io.threads import WORKERS
from ..migration.engine import MigrationEngine
from ..migration.job import Job
from ..qmp.dispatch import version_numbers
from ..qmp.server import Server, Session, bind_unix_socket
from ..qmp.wire import Request, greeting
from ..state.fdsets import FdStore
from ..state.memory import MemoryRegistry
from ..state.partial import SIDECAR_DIR, PartialMarks, shared_dir
from ..state.paths import ChannelOpener, PathPolicy
from .config import Config
from .services import Services

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
# Seconds a request being handled at shutdown gets to finish and reply (step 2 above).
SESSION_GRACE = 0.25
# Seconds between the reports of the job threads and calls the exit still waits for.
STUCK_REPORT_INTERVAL = 10.0
# Threads of the event loop's default executor, which root's and migd's own clients and
# the daemon's own steps use (io/blocking.py: other uids have pools of their own): see run().
DEFAULT_EXECUTOR_THREADS = 64
# Signals whose default action would end migd, socket left behind and jobs cut off, that
# an operator's tools send for other reasons: logged and ignored. SIGHUP asks a daemon to
# reload and reaches one started from a terminal that closes (red-team, session 14);
# SIGUSR1 and SIGUSR2 are what log rotation and reload scripts send many daemons
# (nginx, rsyslog: "reopen your logs"), and killed migd mid-save without a log line
# (red-team, round 10c). SIGQUIT keeps its core dump: it is asked for on purpose.
IGNORED_SIGNALS = {
    signal.SIGHUP: "migd has no configuration to reload",
    signal.SIGUSR1: "migd has no use for it (it logs to stderr: no log file to reopen)",
    signal.SIGUSR2: "migd has no use for it (it logs to stderr: no log file to reopen)",
}


def inherited_listener() -> socket.socket | None:
    """The socket systemd passed us (LISTEN_FDS/LISTEN_PID), if any.

    Taken before the event loop exists (Daemon.__init__): the loop's own fds (epoll, its
    signal pipe, the executor's) take the lowest free numbers, so with fd 3 not passed
    after all the loop's epoll fd was found there and called "the fd systemd passed",
    "not a socket" (red-team, session 17)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    raw = os.environ.get("LISTEN_FDS", "0") or "0"
    if not raw.isdigit():
        raise ConfigError(f"LISTEN_FDS={raw!r} is not a number of passed sockets")
    count = int(raw)
    if count < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # children must not think the socket is theirs
    if count > 1:
        raise ConfigError(
            f"systemd passed {count} sockets: migd serves one QMP socket (one ListenStream=)"
        )
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise ConfigError(
                f"LISTEN_FDS={count} says a socket was passed, but fd {SD_LISTEN_FDS_START} "
                "is not open: migd was not started by systemd's socket activation (or the "
                "program that started it closed the socket); unset LISTEN_FDS and LISTEN_PID "
                "to have migd bind its own socket"
            ) from None
        raise ConfigError(
            f"the fd systemd passed ({SD_LISTEN_FDS_START}) is not a socket: {exc.strerror}"
        ) from None
    check_listener(sock)
    os.set_inheritable(sock.fileno(), False)
    return sock


def check_listener(sock: socket.socket) -> None:
    """A passed socket must be a listening UNIX stream socket. A TCP one (a wrong
    ListenStream= in a drop-in) served root's QMP to the network, which the unit's
    address-family and IP filters do not stop for passed sockets; a datagram one killed
    the accept loop at the first datagram, leaving a migd that serves no one (red-team,
    session 14)."""
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        kind = f"{sock.family.name} {sock.type.name}" + ("" if listening else ", not listening")
        sock.detach()  # systemd's fd: left as it is
        raise ConfigError(
            f"the socket systemd passed is {kind}: migd serves QMP only on a listening UNIX "
            "stream socket (ListenStream=/run/migd/....sock)"
        )


def passed_socket_mode(sock: socket.socket, fallback: int) -> int:
    """Who may connect to a passed socket: its file's mode (SocketMode=), not the
    configuration's socket-mode, which applies only to a socket migd binds itself. The
    warning about a socket open to others read socket-mode alone, so a drop-in's
    SocketMode=0666 went unmentioned (red-team, round 10c). An abstract socket
    (ListenStream=@name) has no file and no mode: every local user may connect."""
    name = sock.getsockname()
    if isinstance(name, bytes) or not name or name.startswith("\0"):
        return 0o777
    try:
        return stat.S_IMODE(os.stat(name).st_mode)
    except OSError:  # the name was unlinked (or is out of this mount namespace)
        return fallback


def allowed_dir_problem(directory: str) -> str | None:
    """Why no file can be made in an allowed directory, said at the start: a typo in
    allowed-dirs, or a directory added there but not to the unit's ReadWritePaths= (read
    only under ProtectSystem=strict), showed only as each client's save failing
    (red-team, round 10c). Not an error: the directory may be mounted later."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        return f"cannot be used: {exc.strerror}; requests naming files there fail until it can"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory: requests naming files there fail"
    read_only = 0
    with contextlib.suppress(OSError):
        read_only = os.statvfs(directory).f_flag & os.ST_RDONLY
    if read_only:
        return (
            "is on a read-only mount here (under ProtectSystem=strict, a directory missing "
            "from the unit's ReadWritePaths=): saves and restores into files there fail"
        )
    return None


def _fdset_opener(fdsets: FdStore) -> ChannelOpener:
    """The engine's opener of /dev/fdset/N, for the uid whose job opens it: a job's steps
    run in its session's context (io/blocking.py), so a job of a uid other than root's
    and migd's opens only its own uid's sets (state/fdsets.py), as its commands do."""

    def open_path(path: str, flags: int, direct: bool) -> int:
        return fdsets.open_path(path, flags, direct, blocking.capped_uid())

    return open_path


def raise_open_file_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (the usual soft 1024 is easily reached by
    passed fds and a job's channels); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:  # an unlimited hard limit still stops at the kernel's nr_open
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = soft
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft
        log.info("open-file limit raised from %d to %d", soft, target)
        return target
    return soft


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        memory = MemoryRegistry()
        paths = PathPolicy(config.allowed_dirs)
        fdsets = FdStore(functools.partial(open_channel_fd, open_file=paths.open))
        engine = MigrationEngine(
            memory, self._emit, self.notify, _fdset_opener(fdsets), fdsets.close_dup, paths.open
        )
        # Partial-restore marks where memory files have no xattrs: in the directory every
        # migd shares (state/partial.py), or next to the socket where that is unusable.
        engine.partial = PartialMarks(
            os.path.join(os.path.dirname(config.socket_path), SIDECAR_DIR), shared_dir()
        )
        self.services = Services(memory, engine, fdsets, paths)
        self._inherited = inherited_listener()  # before any fd of the loop's: see there
        self.server: Server | None = None
        self._stop: asyncio.Event | None = None
        self._notifier: sdnotify.SystemdNotifier | None = None  # made at the first notify
        self._own_socket: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we bound
        # Releases of ended scoped sessions still running (held: the loop keeps only weak
        # references to tasks).
        self._releases: set[asyncio.Task[None]] = set()

    def notify(self, state: str) -> None:
        """sd_notify; a failure is logged (sdnotify's default swallowed it: a Type=notify
        unit then waited for READY=1 until its start timed out, with no word why)."""
        address = os.environ.get("NOTIFY_SOCKET")
        if not address:
            return
        try:
            if self._notifier is None:
                self._notifier = sdnotify.SystemdNotifier(debug=True)
            self._notifier.notify(state)
        except OSError as exc:
            self._notifier = None  # the next notify tries again
            what = state.splitlines()[0]
            log.warning(
                "cannot send %s to systemd at NOTIFY_SOCKET=%r: %s",
                what,
                address,
                exc.strerror or exc,
            )

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        if self.server is not None:
            self.server.broadcast_event(name, data)

    def request_stop(self, sig: signal.Signals | None = None) -> None:
        if sig is not None:
            log.info("%s received: stopping", sig.name)
        if self._stop is not None:
            self._stop.set()

    async def _dispatch(self, session: Session, req: Request) -> dict[str, Any]:
        return await dispatch(Context(session=session, services=self.services), req)

    def _session_ended(self, session: Session) -> None:
        """The server's session-end hook: a scoped session's jobs, backends and fd sets
        are released in a task of their own, so that neither the loop nor the other
        clients wait for its jobs to stop. Not at shutdown: step 3 ends them all."""
        scope = scope_of(session)
        if not scope or (self._stop is not None and self._stop.is_set()):
            return
        task = asyncio.create_task(release(scope, self.services))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # Before the socket listens: a client may connect and a SIGTERM come at once, and
        # the default action would kill migd without its shutdown (socket left behind).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        for sig, why in IGNORED_SIGNALS.items():
            loop.add_signal_handler(sig, log.warning, "%s ignored: %s", sig.name, why)
        raise_open_file_limit()
        # The job threads exist before the first client: made when the first job starts,
        # they kept the event loop from answering for some 20 ms (thread stacks are mapped
        # under the mm lock that running jobs' populators hold).
        WORKERS.warm()
        # The commands' and jobs' own blocking steps (opens, closes, unmaps, syncs) run in
        # the loop's default executor: min(32, CPUs + 4) threads, 6 on two CPUs. Six of
        # them stuck on a dead filesystem (an NFS or FUSE mount one VM's memory file is on)
        # held every other client's object-add, object-del, closefd and job step. Clients
        # of other uids than root's and migd's use pools of their own instead, capped
        # (io/blocking.py): 64 of theirs stuck on their own FUSE mount held them all.
        loop.set_default_executor(
            ThreadPoolExecutor(max_workers=DEFAULT_EXECUTOR_THREADS, thread_name_prefix="asyncio")
        )
        try:
            await self._apply_config()
            if self._stop.is_set():
                # SIGTERM while the configured backends were made: stop without serving,
                # and without READY=1 (systemd would take migd for up, then stopping).
                log.info("stopped before serving: nothing was listening yet")
                self.services.memory.close_all()
                return
            listener, self._inherited = self._inherited, None
            if listener is None:
                listener = bind_unix_socket(self.config.socket_path, self.config.socket_mode)
                self._own_socket = file_identity(self.config.socket_path)
                where, mode = self.config.socket_path, self.config.socket_mode
            else:
                where = f"inherited socket {listener.getsockname()!r}"
                mode = passed_socket_mode(listener, self.config.socket_mode)
        except BaseException:
            self.services.memory.close_all()
            raise
        major, minor, micro = version_numbers()
        self.server = Server(
            listener,
            greeting(major, minor, micro, f"migd {__version__}"),
            self._dispatch,
            self._session_ended,
        )
        self.server.start()
        log.info("migd %s serving QMP on %s", __version__, where)
        self._log_path_policy(mode)
        self.notify("READY=1\nSTATUS=serving")
        try:
            await self._stop.wait()
        finally:
            self.notify("STOPPING=1")
            await self.shutdown()

    def _log_path_policy(self, socket_mode: int) -> None:
        paths = self.services.paths
        if paths.restricted:
            log.info("files and mem-paths named by path are confined to %s",
                     ", ".join(paths.allowed))  # fmt: skip
        for directory in self.config.allowed_dirs:
            problem = allowed_dir_problem(directory)
            if problem is not None:
                log.warning("allowed-dirs: '%s' %s", directory, problem)
        if socket_mode & 0o066:
            # Access to the socket is control of every backend: allowed-dirs limits the
            # names clients give, not the fds they pass nor what they do to backends.
            log.warning(
                "socket mode %04o lets other users control migd: they can save any backend "
                "into fds they pass, restore into it, or delete it%s",
                socket_mode,
                "" if paths.restricted else ", and make migd open any file it can open",
            )

    async def _apply_config(self) -> None:
        """The configured capabilities, parameters and memory backends, before serving."""
        engine, memory = self.services.engine, self.services.memory
        engine.set_capabilities(self.config.capabilities.model_dump(exclude_none=True))
        engine.set_parameters(self.config.parameters.model_dump(exclude_none=True))
        engine.set_daemon_bandwidth(self.config.max_bandwidth)
        if self.config.max_bandwidth:
            log.info("all jobs' page I/O together capped at %d bytes/s (max-bandwidth)",
                     self.config.max_bandwidth)  # fmt: skip
        for i, spec in enumerate(self.config.memory_backends):
            if self._stop is not None and self._stop.is_set():
                return  # SIGTERM meanwhile: the rest are not made (run stops)
            try:
                # As object-add: a file an interrupted restore left partial is refused.
                backend = await blocking.to_thread(
                    create_backend, spec, self.services.paths, engine.partial
                )
            except MigdError as exc:
                # Named as the file's own errors are (the journal showed the id alone).
                raise MigdError(
                    f"{self.config.where(f'memory-backend[{i}]')}"
                    f"Cannot create memory backend '{spec.id}': {exc.desc}"
                ) from None
            try:
                memory.add(backend)  # no clash: the config model checks ids and block names
            except BaseException:
                backend.close()
                raise
            log.info("created memory backend %r (%s, %d bytes)", spec.id, spec.qom_type, spec.size)

    async def shutdown(self) -> None:
        """Stop accepting, close the sessions, then end the job and release the services
        (the order of the module docstring)."""
        assert self.server is not None
        await self.server.stop_accepting()
        log.info("shutting down: no longer accepting clients")
        await self.server.close_sessions(SESSION_GRACE)
        log.info("shutting down: client sessions closed; stopping the job and the services")
        stopping_since = time.monotonic()
        # A release under way would race step 3 for the same jobs and backends.
        for task in list(self._releases):
            task.cancel()
        await asyncio.gather(*self._releases, return_exceptions=True)
        await self.services.close()
        blocking.POOLS.shutdown()
        if self._own_socket is not None:
            remove_socket_file(self.config.socket_path, self._own_socket)
        log.info("migd stopped")
        await self._wait_for_stuck_jobs(stopping_since)

    async def _wait_for_stuck_jobs(self, since: float) -> None:
        """Wait for the jobs and worker-thread calls still in a syscall (a dead NFS mount,
        a suspended device): the process's exit would wait for those threads anyway, until
        systemd's SIGKILL, and said nothing of it (an operator saw a migd that would not
        stop). Say which, at once and every STUCK_REPORT_INTERVAL, in the log and in
        sd_notify's STATUS=."""
        engine = self.services.engine
        while True:
            stuck, calls = engine.unfinished_jobs(), blocking.RUNNING.snapshot()
            if not stuck and not calls:
                return
            text = stuck_text(stuck, calls, time.monotonic() - since)
            log.warning("shutting down: the exit waits for %s", text)
            self.notify(f"STATUS=stopping: waiting for {text}")
            waits: set[asyncio.Future[Any]] = {job.task for job in stuck if job.task is not None}
            if calls:
                waits.add(blocking.RUNNING.idle())
            await asyncio.wait(waits, timeout=STUCK_REPORT_INTERVAL)


def stuck_text(jobs: list[Job], calls: list[tuple[str, float]], waited: float) -> str:
    """What the exit waits for: each job's id, direction and file, and for how long; each
    worker-thread call still running, and for how long."""
    parts = []
    if jobs:
        each = ", ".join(f"job '{job.id}' ({job.direction} {job.target})" for job in jobs)
        what = "a job thread" if len(jobs) == 1 else f"{len(jobs)} jobs' threads"
        parts.append(f"{what} stuck in I/O for {waited:.0f} s: {each}")
    if calls:
        each = ", ".join(f"{name} for {seconds:.0f} s" for name, seconds in calls)
        what = "a worker-thread call" if len(calls) == 1 else f"{len(calls)} worker-thread calls"
        parts.append(f"{what} still running: {each}")
    return "; ".join(parts)


def file_identity(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def remove_socket_file(path: str, identity: tuple[int, int]) -> None:
    """Unlink the socket file if it is still ours: once the listener is closed, a new
    migd may have taken the path for stale and bound its own socket there."""
    with contextlib.suppress(FileNotFoundError):
        if file_identity(path) != identity:
            log.info("socket %s is another migd's now: left in place", path)
            return
        os.unlink(path)
