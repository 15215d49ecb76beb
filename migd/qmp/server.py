"""UNIX socket listener and QMP sessions: greeting, read loop, SCM_RIGHTS, event broadcast.

Knows nothing of migration: each decoded request goes to the `dispatch` callable the
daemon hands in. Sockets are read with recvmsg (asyncio streams cannot carry fds).

Serving stays fair and bounded whatever a client does: a session handles one request
at a time and yields to the event loop after every read and every request, so a client
streaming requests without pause cannot starve other clients, running jobs or SIGTERM.
It reads no more requests while more than REPLY_PAUSE_BYTES of its replies are unsent
(the client is not reading them), and a client whose unsent replies and events pass
REPLY_LIMIT_BYTES is dropped: a client that never reads costs a bounded amount of memory.
So do many: while all sessions' unsent bytes pass DAEMON_REPLY_LIMIT_BYTES, the session
of another uid than root's or migd's with the most is dropped, if it took none of them
for STALL_SECONDS (a client reading a large reply takes bytes all along; one that does
not read is the one to go, the one holding the most first).
Root's and migd's own clients, the management, are never dropped for what others left
unread: only their own bound applies to them.

Stopping is in two steps, as uvicorn's: `stop_accepting` closes the listener (a connect
is refused from then on), `close_sessions` ends every session. A closing session reads
no more requests, not even those already received in the same read: the request being
handled gets its reply (within a grace period, else it is cancelled), and whatever was
queued for the client is sent before the connection closes.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import ConfigError, FdError, InvalidRequest, MigdError
from ..io import blocking
from ..state.fdsets import check_room_for_passed_fds
from ..state.paths import (
    MAX_SOCKET_PATH_BYTES,
    FileRefused,
    is_root_or_migd,
    resolve_trusted,
)
from ..state.peer_view import check_client_view
from ..state.serving import serve_client
from .refusals import RefusalLog
from .wire import (
    MessageSplitter,
    Refused,
    Request,
    decode_request,
    encode,
    error_reply,
    event_message,
)

log = logging.getLogger(__name__)

RECV_BYTES = 65536
FEED_BYTES = 4096  # framed between two yields to the event loop
# Clients served at once; a connection over it is closed at once. Each costs an fd and
# memory: a flood of idle ones took every fd, so that jobs failed to open their files.
MAX_SESSIONS = 1000
# ... of which the last ones only root's and migd's own uid may take: a client of another
# uid holding 1000 idle connections locked every management client out for as long as it
# liked (red-team, session 14).
ROOT_RESERVED_SESSIONS = 16
MAX_FDS_PER_MESSAGE = 16  # QEMU's TCP_MAX_FDS
# Stop reading a client's requests while this much of its replies is unsent...
REPLY_PAUSE_BYTES = 1 << 20
# ... and drop it when its unsent replies and events pass this (one message may go over).
REPLY_LIMIT_BYTES = 16 << 20
# ... and, across all sessions, drop the ones holding the most past this: a thousand
# silent clients each asking once for a 20 MB query-fdsets (or left with 16 MiB of events)
# held about 24 MiB each, as much memory as the machine had (red-team, session 14). Then
# the clients that read nothing cost the daemon at most this much together.
DAEMON_REPLY_LIMIT_BYTES = 64 << 20
# ... but only a client that took none of its bytes for this long: one reading a reply of
# a few MiB (a query-fdsets of many fds) holds more than REPLY_PAUSE_BYTES while it
# reads, and was dropped for what silent clients held (review, session 15).
STALL_SECONDS = 1.0
# Seconds a closing session's writer gets to send what is queued for its client.
FLUSH_SECONDS = 2.0
# Seconds the shutdown waits for the closes of the fds ended sessions left unused. A
# close of a client of another uid than root's and migd's waits in its uid's pool behind
# that uid's other calls (io/blocking.py), which may never return (its dead FUSE mount):
# waited for without a bound, the shutdown stopped there, its jobs never cancelled. A
# memfd's last close takes 50 ms per GiB.
FD_CLOSE_WAIT = 1.0

Dispatch = Callable[["Session", Request], Awaitable[dict[str, Any]]]
# Called once a session has ended, however it ended (EOF, reset, dropped, closed): the
# daemon hands in what the layers above need to do then (api/scope.py), so that this
# layer knows nothing of them. It must return at once: it runs in the session's task.
SessionEnded = Callable[["Session"], None]


class SocketInUse(MigdError):
    """Another live daemon answers on the socket path."""


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def _listener_description(probe: socket.socket) -> str:
    """Who listens on a live socket path, for the refusal: the process that made the
    listening socket (SO_PEERCRED) and whether it is a migd. Every live socket was called
    "another migd" before, a QEMU's QMP socket or another service's included (red-team,
    session 17)."""
    pid, uid, _ = _peer_credentials(probe)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [os.fsdecode(arg) for arg in f.read().split(b"\0") if arg]
    except OSError:
        argv = []
    if not argv:
        return (
            f"a live socket is there, made by pid {pid} (uid {uid}), which no longer runs "
            "(a child it passed the socket to serves it)"
        )
    is_migd = any(os.path.basename(arg) == "migd" for arg in argv[:3]) and "serve" in argv
    program = os.path.basename(argv[0])
    if is_migd:
        return f"another migd is serving it (pid {pid}, uid {uid})"
    # Not "not a migd": systemd (or systemd-socket-activate) listens for the migd it starts.
    return (
        f"it is in use: {program!r} (pid {pid}, uid {uid}) listens on it; choose another "
        "--socket, or stop that program"
    )


class Session:
    """One client connection."""

    def __init__(
        self,
        server: Server,
        sock: socket.socket,
        number: int,
        peer_uid: int | None,
        peer_pid: int | None = None,
    ) -> None:
        self.server = server
        self.sock = sock
        self.number = number
        # The client's uid (SO_PEERCRED, read once at accept): it may own the existing
        # files it names.
        self.peer_uid = peer_uid
        # Its pid (SO_PEERCRED): whose view of the files it names counts (refuse_other_view).
        self.peer_pid = peer_pid
        self.negotiated = False
        self.pending_fds: list[int] = []
        self._fd_taken = False
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._unsent = _UnsentBytes(server.unsent)
        self._fds_refused: FdError | None = None
        self._closing = False
        # What the api layer ties to this connection (x-migd-session-scope): carried here
        # for it, never looked into by this layer.
        self.scope: Any = None

    def refuse_other_view(self, path: str) -> None:
        """Refuse a file the client names whose directory it sees elsewhere than migd
        (another mount namespace). Blocking: call it in a worker thread."""
        check_client_view(path, self.peer_pid, self.sock)

    # -- fds -------------------------------------------------------------------------

    def take_fd(self) -> int:
        """Hand the oldest fd received with this command to the caller, who then owns it."""
        if not self.pending_fds:
            refused, self._fds_refused = self._fds_refused, None
            raise refused or FdError("No file descriptor supplied via SCM_RIGHTS")
        self._fd_taken = True
        return self.pending_fds.pop(0)

    async def _replace_pending_fds(self, fds: list[int]) -> None:
        # As QEMU's chardev: a new batch of fds drops whatever the last batch left unused.
        unused = self._take_pending_fds()
        self.pending_fds = fds
        self._fds_refused = None
        try:
            # This task serves the session's uid (blocking.serve_uid).
            check_room_for_passed_fds(capped=blocking.capped_uid() is not None)
        except FdError as exc:
            # Over the cap: close the batch now; the command meant to take it says why.
            unused += self._take_pending_fds()
            self._fds_refused = exc
        await _close_off_loop(unused)

    def _take_pending_fds(self) -> list[int]:
        fds, self.pending_fds = self.pending_fds, []
        return fds

    def _close_pending_fds(self) -> None:
        """At disconnect: handed to a worker thread and not awaited. Not on the loop: the
        close of a memfd's last reference frees its memory, 50 ms per GiB, in which no
        other client was answered (red-team, session 16). Not awaited: the finally that
        calls this could be cancelled midway and leak the rest; the server keeps the
        close's future and waits for it when it closes every session."""
        fds = self._take_pending_fds()
        if fds:
            self.server.close_later(fds)

    # -- I/O -------------------------------------------------------------------------

    def send(self, msg: dict[str, Any], check_daemon_budget: bool = True) -> None:
        if self._unsent.dropped:
            return
        if self._unsent.count > REPLY_LIMIT_BYTES:
            self._drop()
            return
        data = encode(msg)
        self._unsent.add(len(data))
        self._out.put_nowait(data)
        if check_daemon_budget:
            self.server.enforce_reply_budget()

    @property
    def unsent_bytes(self) -> int:
        return self._unsent.count

    def stalled(self, now: float) -> bool:
        """Bytes are waiting and the client took none of them for STALL_SECONDS."""
        return self._unsent.count > 0 and now - self._unsent.progress >= STALL_SECONDS

    def _drop(self, why: str | None = None) -> None:
        """End a client that does not read what it asked for, freeing what it left unread."""
        log.warning(
            "client %d dropped: %s",
            self.number,
            why or f"more than {REPLY_LIMIT_BYTES} bytes of replies and events left unread",
        )
        self._unsent.drop()
        while not self._out.empty():
            self._out.get_nowait()
        self._out.put_nowait(None)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the read loop with EOF

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Read no more requests (shutdown): the one being handled still gets its reply,
        then the connection closes."""
        if self._closing:
            return
        self._closing = True
        self._unsent.stop_waiting()  # a read loop paused on unread replies goes on
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)  # wakes a read loop waiting for data

    async def _wait(self, add: Callable[..., None], remove: Callable[[int], Any]) -> None:
        fut = self._loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        add(fd, ready)
        try:
            await fut
        finally:
            remove(fd)

    async def _recv(self) -> tuple[bytes, list[int]]:
        cmsg_space = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(RECV_BYTES, cmsg_space)
            except (BlockingIOError, InterruptedError):
                await self._wait(self._loop.add_reader, self._loop.remove_reader)
                continue
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            return data, fds

    async def _writer(self) -> None:
        try:
            await self._write_queued()
        except OSError as exc:
            # The client is gone: wake a read loop paused on the replies it left unread.
            log.debug("session %d: %s", self.number, exc)
            self._unsent.drop()
            while not self._out.empty():
                self._out.get_nowait()

    async def _write_queued(self) -> None:
        while True:
            data = await self._out.get()
            if data is None:
                return
            view = memoryview(data)
            while view:
                try:
                    sent = self.sock.send(view)
                except (BlockingIOError, InterruptedError):
                    await self._wait(self._loop.add_writer, self._loop.remove_writer)
                    continue
                view = view[sent:]
                self._unsent.sent(sent)

    async def run(self, dispatch: Dispatch) -> None:
        writer = asyncio.create_task(self._writer())
        splitter = MessageSplitter()
        flush = True
        try:
            self.send(self.server.greeting)
            while not self._unsent.dropped and not self._closing:
                await self._pause_while_replies_unread()
                data, fds = await self._recv()
                if fds:
                    await self._replace_pending_fds(fds)
                if not data or self._closing:
                    break  # a read that raced with close() is not handled
                # Framed a slice at a time, yielding after each: the splitter's cost is
                # per structural byte, and a client streaming commas made a 64 KiB read
                # hold the loop for 45 ms (other clients' replies 300x slower).
                for at in range(0, len(data), FEED_BYTES):
                    await self._handle_all(splitter.feed(data[at : at + FEED_BYTES]), dispatch)
                    await asyncio.sleep(0)  # even a slice that completes no request yields
        except (ConnectionError, OSError) as exc:
            log.debug("session %d: %s", self.number, exc)
        except asyncio.CancelledError:
            flush = False  # the server stopped waiting for this session: close at once
            raise
        finally:
            self._close_pending_fds()
            self._out.put_nowait(None)
            try:
                if flush:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(writer, FLUSH_SECONDS)
            finally:  # also when the server cancels this task meanwhile
                writer.cancel()
                self.sock.close()
                self._unsent.drop()  # whatever the writer had not sent counts no more

    async def _pause_while_replies_unread(self) -> None:
        """Backpressure: a client that does not read its replies is not read either."""
        if self._unsent.count > REPLY_PAUSE_BYTES:
            log.debug(
                "client %d: %d bytes of replies unread, reading paused",
                self.number,
                self._unsent.count,
            )
            await self._unsent.below(REPLY_PAUSE_BYTES)

    async def _handle_all(self, texts: list[bytes | Refused], dispatch: Dispatch) -> None:
        """Handle the requests of one read in order, one at a time, yielding after each:
        a handler that never awaits would otherwise hold the event loop for the whole read."""
        for text in texts:
            # Before each request, not only between reads: one read of small requests
            # with large replies (query-qmp-schema) queued 15 MiB of them at once.
            await self._pause_while_replies_unread()
            if self._unsent.dropped or self._closing:
                return
            self.send(await self._handle(text, dispatch))
            await asyncio.sleep(0)

    async def _handle(self, text: bytes | Refused, dispatch: Dispatch) -> dict[str, Any]:
        command = None
        if isinstance(text, Refused):  # over a bound of the framing: QEMU's text, no id
            reply = error_reply(InvalidRequest(text.desc), None)
        else:
            try:
                req = decode_request(text)
            except InvalidRequest as exc:
                reply = error_reply(exc, getattr(exc, "request", None))
            else:
                command = req.execute
                reply = await self._run(req, dispatch)
        if "error" in reply:
            self.server.refusals.refused(self.number, command, reply["error"])
        return reply

    async def _run(self, req: Request, dispatch: Dispatch) -> dict[str, Any]:
        self._fd_taken = False
        try:
            return await dispatch(self, req)
        finally:
            if self._fd_taken:
                # As QEMU: a command consumes one fd of a batch and the extras are closed.
                await _close_off_loop(self._take_pending_fds())


def close_fds(fds: list[int]) -> None:
    """Close passed fds a client left unused (blocking: see _close_off_loop)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def _close_off_loop(fds: list[int]) -> None:
    """Close fds in a worker thread: the close of the last reference to a memfd frees its
    memory, 50 ms per GiB, in which no other client would be answered (red-team,
    session 16); the caller goes on once they are closed."""
    if fds:
        await blocking.to_thread(close_fds, fds)


class _DaemonUnsent:
    """All sessions' unsent bytes together."""

    def __init__(self) -> None:
        self.count = 0


class _UnsentBytes:
    """How many bytes of a session's replies and events are queued or being sent, kept
    in the daemon's total too."""

    def __init__(self, total: _DaemonUnsent) -> None:
        self.count = 0
        self.dropped = False
        self.progress = time.monotonic()  # when the client last took bytes, or had none
        self._total = total
        self._waiting = True
        self._changed = asyncio.Event()

    def add(self, n: int) -> None:
        if self.dropped:
            return
        if self.count == 0:
            self.progress = time.monotonic()  # nothing was waiting: the clock starts now
        self.count += n
        self._total.count += n

    def sent(self, n: int) -> None:
        if self.dropped:  # the rest of a message being sent when the client was dropped
            return
        self.count -= n
        self._total.count -= n
        self.progress = time.monotonic()
        self._changed.set()

    def drop(self) -> None:
        """Count nothing more for this session (dropped, gone or closed)."""
        self.dropped = True
        self._total.count -= self.count
        self.count = 0
        self._changed.set()

    def stop_waiting(self) -> None:
        """End a wait in below() now and any later one at once (the session closes)."""
        self._waiting = False
        self._changed.set()

    async def below(self, limit: int) -> None:
        """Wait until at most `limit` bytes are unsent (or the client was dropped, or the
        session closes)."""
        while self.count > limit and not self.dropped and self._waiting:
            self._changed.clear()
            await self._changed.wait()


class Server:
    """Accepts clients on a listening UNIX socket and broadcasts events to them."""

    def __init__(
        self,
        listener: socket.socket,
        greeting: dict[str, Any],
        dispatch: Dispatch,
        session_ended: SessionEnded | None = None,
    ):
        self.listener = listener
        self.greeting = greeting
        self._dispatch = dispatch
        self._session_ended = session_ended
        self.sessions: set[Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Closes of the fds ended sessions left unused, under way in worker threads.
        self._fd_closes: set[asyncio.Future[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self._count = 0
        self._refused = 0  # connections closed at once: MAX_SESSIONS were connected
        self.unsent = _DaemonUnsent()
        self.refusals = RefusalLog()  # error replies, logged at a bounded rate

    def start(self) -> None:
        self.listener.setblocking(False)
        self._accepting = asyncio.create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self.listener)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept a client: %s", exc)
                    await asyncio.sleep(0.1)  # back off: the limit may clear
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR):
                    log.warning("a connection could not be accepted: %s", exc.strerror)
                    continue  # that client's trouble, not the listener's
                raise
            try:
                pid, uid, gid = _peer_credentials(sock)
            except OSError:
                pid = uid = gid = -1
            if len(self.sessions) >= MAX_SESSIONS - (
                0 if is_root_or_migd(uid) else ROOT_RESERVED_SESSIONS
            ):
                sock.close()
                self._refused += 1
                if self._refused in (1, 10, 100) or self._refused % 1000 == 0:
                    log.warning(
                        "%d connections refused: %d clients are connected, the most migd "
                        "serves at once",
                        self._refused,
                        MAX_SESSIONS,
                    )
                continue
            sock.setblocking(False)
            self._count += 1
            log.info("client %d connected: pid=%d uid=%d gid=%d", self._count, pid, uid, gid)
            session = Session(
                self, sock, self._count, uid if uid >= 0 else None, pid if pid > 0 else None
            )
            # In the set before its task runs: close_sessions() must find it.
            self.sessions.add(session)
            task = asyncio.create_task(self._serve(session))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, session: Session) -> None:
        # Its worker-thread calls, and those of the jobs and releases it starts, run under
        # its uid's cap (io/blocking.py): this task's context, which they inherit.
        blocking.serve_uid(session.peer_uid)
        serve_client(f"client {session.number}")  # named in its jobs' log lines
        try:
            await session.run(self._dispatch)
        finally:
            self.sessions.discard(session)
            log.info("client %d disconnected", session.number)
            self._end(session)

    def _end(self, session: Session) -> None:
        """The session-end hook, which must not take the server's bookkeeping with it."""
        if self._session_ended is None:
            return
        try:
            self._session_ended(session)
        except Exception:
            log.exception("client %d: the session-end hook failed", session.number)

    def enforce_reply_budget(self) -> None:
        """Drop the sessions holding the most unsent bytes while all of them together
        pass DAEMON_REPLY_LIMIT_BYTES: sessions of another uid than root's or migd's
        (else clients of another uid, each holding a little, could have management's
        large replies dropped) that took none of their bytes for STALL_SECONDS, whatever
        they hold. Bytes are unsent here only once the kernel's socket buffer is full, so
        such a client left a buffer's worth unread for a second: a thousand of them each
        holding just under REPLY_PAUSE_BYTES, never dropped before, held about 1 GiB
        (session 15's note)."""
        now = time.monotonic()
        while self.unsent.count > DAEMON_REPLY_LIMIT_BYTES:
            # Each holding something: a drop must free bytes, or this loop would not end.
            others = (
                s
                for s in self.sessions
                if s.unsent_bytes > 0 and not is_root_or_migd(s.peer_uid) and s.stalled(now)
            )
            biggest = max(others, key=lambda s: s.unsent_bytes, default=None)
            if biggest is None:
                return
            biggest._drop(
                f"{biggest.unsent_bytes} bytes of replies and events left unread while "
                f"all clients' unread ones passed {DAEMON_REPLY_LIMIT_BYTES} bytes"
            )

    def broadcast_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        msg = event_message(name, data)
        for session in list(self.sessions):
            if session.negotiated:
                session.send(msg, check_daemon_budget=False)
        self.enforce_reply_budget()  # once, not once per session

    async def stop_accepting(self) -> None:
        """Accept no more clients and close the listener: a connect is refused from now
        on (with socket activation, it waits in systemd's socket for the next migd)."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        self.listener.close()

    def close_later(self, fds: list[int]) -> None:
        """Close fds in a worker thread, without waiting (Session._close_pending_fds). In
        the uid's cleanups pool, not its calls pool: there they queued behind that uid's
        stuck calls (a dead FUSE mount of theirs), and a gone client's fds (guest RAM
        memfds, say) stayed open for as long as the filesystem did not answer."""
        closing = blocking.submit_cleanup(close_fds, fds)
        self._fd_closes.add(closing)
        closing.add_done_callback(self._fd_closes.discard)

    async def close_sessions(self, grace: float) -> None:
        """End every session: none reads another request, the request being handled
        gets `grace` seconds to finish and reply, then is cancelled. Returns once the
        fds the sessions left unused are closed, or after FD_CLOSE_WAIT seconds."""
        for session in list(self.sessions):
            session.close()
        tasks = set(self._tasks)
        if tasks:
            _, unfinished = await asyncio.wait(tasks, timeout=grace)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.refusals.close()
        if self._fd_closes:
            _, late = await asyncio.wait(set(self._fd_closes), timeout=FD_CLOSE_WAIT)
            if late:
                # Still queued ones are dropped with their pools (blocking.POOLS.shutdown).
                log.warning(
                    "shutting down: %d closes of fds clients left unused are still waiting "
                    "for a worker thread: those fds are left to the process's exit",
                    len(late),
                )


def check_socket_directory(path: str) -> None:
    """Refuse a socket path another local user controls: they could replace the socket
    with their own listener (clients would hand it the memory fds they pass, read-write),
    and migd keeps its state (partial-restore marks) next to it.

    Every directory on the way must belong to root or migd's uid and be one no other
    user can change, and every symbolic link on the way must be root's or migd's
    (state/paths.py resolve_trusted, as for the files migd opens by name): a link of
    another user's in /tmp, or a directory of theirs higher up, let them swap the socket's
    directory after migd started (red-team, session 13). The socket's own directory may
    not be writable by others at all, sticky or not: there they could squat the names migd
    creates beside the socket (partial-restores/)."""
    try:
        real, _ = resolve_trusted(path, {0, os.geteuid()})
    except FileRefused as exc:
        raise MigdError(f"Cannot listen on '{path}': {exc}") from None
    directory = os.path.dirname(real)
    try:
        # Its owner is checked on the way (resolve_trusted); its mode more strictly here.
        st = os.stat(directory)
    except FileNotFoundError:
        return  # not made yet (bind_unix_socket checks again once it is)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise MigdError(
            f"Cannot listen on '{path}': its directory '{directory}' is writable by group or "
            f"others (mode {stat.S_IMODE(st.st_mode):04o}): another user could replace the "
            "socket or squat the names migd keeps beside it; give the socket a directory of "
            "its own (as /run/migd)"
        )


def bind_unix_socket(path: str, mode: int) -> socket.socket:
    """Create the listening socket, replacing a stale one and refusing a live one."""
    # Before anything is created on the way (a refused start left the directories), and
    # as a configuration error (exit 2: no restart makes the name fit).
    if "\0" in path:
        raise ConfigError(f"Socket path {path!r} holds a NUL byte")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(f"Socket path '{path}' is longer than {MAX_SOCKET_PATH_BYTES} bytes")
    parent = os.path.dirname(os.path.abspath(path))
    check_socket_directory(path)
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    except OSError as exc:
        # A directory that cannot be made (read-only under the unit's ProtectSystem=strict,
        # a file on the way) was a traceback in the journal (red-team, round 10c).
        why = "it exists and is not a directory" if exc.errno == errno.EEXIST else exc.strerror
        raise MigdError(
            f"Cannot listen on '{path}': cannot create its directory '{exc.filename}': {why}"
        ) from None
    check_socket_directory(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise MigdError(f"Cannot listen on '{path}': it exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Without blocking: a UNIX connect to a listener whose backlog is full (a hung or
        # stopped migd its clients piled up on) waited for ever, migd's start with it.
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except OSError as exc:  # EACCES, EAGAIN (a backlog full): not known to be stale
            raise MigdError(
                f"Cannot listen on '{path}': a socket is there and migd cannot tell whether "
                f"it is in use (connecting to it failed: {exc.strerror}); remove it if it is "
                "stale"
            ) from None
        else:
            raise SocketInUse(f"Cannot listen on '{path}': {_listener_description(probe)}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bind under a tight umask so the socket is never briefly wider than `mode`.
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise MigdError(f"Cannot listen on '{path}': {exc.strerror}") from None
    return sock
