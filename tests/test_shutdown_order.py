"""Shutdown in uvicorn's order: stop accepting, close the sessions, then cancel the job and
release the services (backends, fds, the socket file).

A job whose channel thread is held in a WRITE (a FUSE filesystem that holds page writes
until the test lets them go) keeps the daemon in "cancelling the job" for as long as the
test needs: what a client can still do at that moment is what these tests look at. The
old order cancelled the job first and kept serving clients (and the listener) meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migd.migration.mapped_ram import format
from migd.qmp.server import Server, Session, bind_unix_socket
from migd.qmp.wire import Request, greeting, return_reply

from .conftest import DaemonProcess, RawClient, fill_random, poll_until, start_daemon
from .test_faults import _IO_IN, FaultFS, mounted_fuse
from .test_serving import LogWatcher
from .test_systemd import HeldLookupFS

MiB = 1 << 20
SIZE = 4 * MiB
PAGES_AT = format.plan_save([("ram0", SIZE)]).blocks[0].pages_offset  # ram0's page data
DEADLINE = 10.0  # seconds: a bound on "at all", never a speed assertion
HOLD_LIMIT = 60.0  # a held WRITE goes on by itself after this: a failed test cannot hang


class HeldWritesFS(FaultFS):
    """FaultFS that holds every WRITE of page data until `release` is set."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        super().__init__(backing, mountpoint)
        self.holding = threading.Event()  # a page WRITE is being held
        self.release = threading.Event()

    def _write(self, body: memoryview) -> bytes:
        offset = _IO_IN.unpack_from(body)[1]
        if PAGES_AT <= offset < PAGES_AT + SIZE and not self.release.is_set():
            self.holding.set()
            self.release.wait(HOLD_LIMIT)
        return super()._write(body)


@pytest.fixture
def held_fs(short_dir: Path) -> Iterator[HeldWritesFS]:
    for fs in mounted_fuse(short_dir, "held", HeldWritesFS):
        try:
            yield fs
        finally:
            fs.release.set()  # before the unmount, whatever the test did


@pytest.fixture
def stopping(short_dir: Path, shm: Path, held_fs: HeldWritesFS) -> Iterator[Any]:
    """A daemon whose save is held in a page WRITE, a client with events on, and the
    daemon's log; the test sends the SIGTERM."""
    yield from _held_save(short_dir, shm, held_fs)


def _held_save(
    short_dir: Path, shm: Path, held_fs: HeldWritesFS, env: dict[str, str] | None = None
) -> Iterator[Any]:
    daemon = start_daemon(short_dir / "qmp.sock", env=env)
    log = LogWatcher(daemon.proc)
    try:
        fill_random(shm / "ram0", SIZE, seed=3)
        client = RawClient(daemon.socket_path, timeout=DEADLINE).negotiate()
        client.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram0",
                                 "size": SIZE, "mem-path": str(shm / "ram0")})  # fmt: skip
        caps = [{"capability": c, "state": True} for c in ("mapped-ram", "events")]
        client.ok("migrate-set-capabilities", {"capabilities": caps})
        client.ok("migrate", {"uri": f"file:{held_fs.mountpoint / 'save.img'}"})
        assert held_fs.holding.wait(DEADLINE), "the save's page WRITE never came"
        assert client.ok("query-migrate")["status"] == "active"
        yield daemon, client, log, held_fs
    finally:
        held_fs.release.set()
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        daemon.proc.wait()


def _sigterm_and_wait_for_the_cancel(daemon: DaemonProcess, log: LogWatcher) -> None:
    daemon.proc.send_signal(signal.SIGTERM)
    # The job is being cancelled now, and stays so while its WRITE is held.
    log.wait_for(b"save.img: cancelling", DEADLINE)


def _rest_until_closed(client: RawClient) -> list[dict[str, Any]]:
    """Every message still to come on a connection the daemon closes."""
    messages = []
    while True:
        try:
            messages.append(client.recv())
        except TimeoutError:
            raise AssertionError(f"the connection stays open; got {messages}") from None
        except OSError:  # EOF (ConnectionError) or a reset: closed
            return messages


def _connect(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    finally:
        s.close()


def _line_index(text: bytes, part: bytes) -> int:
    lines = text.splitlines()
    found = [i for i, line in enumerate(lines) if part in line]
    assert found, f"no log line with {part!r}:\n{text.decode(errors='replace')}"
    return found[0]


def test_sigterm_stops_accepting_and_closes_sessions_before_cancelling_the_job(stopping):
    daemon, client, log, held_fs = stopping
    _sigterm_and_wait_for_the_cancel(daemon, log)
    # (a) the listener is gone: nobody connects while the job is being cancelled (the
    # socket file goes last, so the connect is refused, or finds no file at the very end)
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        _connect(daemon.socket_path)
    # (b) the client's session was closed before the cancel: it saw no `cancelling`
    for msg in _rest_until_closed(client):
        assert "event" in msg and msg["data"]["status"] != "cancelling", msg
    held_fs.release.set()
    assert daemon.proc.wait(DEADLINE) == 0
    assert not daemon.socket_path.exists()
    text = log.all()
    order = [
        _line_index(text, b"shutting down: no longer accepting clients"),
        _line_index(text, b"client 2 disconnected"),  # 1: start_daemon's probe
        _line_index(text, b"save.img: cancelling"),
        _line_index(text, b"migd stopped"),
    ]
    assert order == sorted(order), text.decode(errors="replace")


def test_a_request_sent_once_the_job_is_being_cancelled_is_not_run(stopping, short_dir):
    daemon, client, log, held_fs = stopping
    _sigterm_and_wait_for_the_cancel(daemon, log)
    late = short_dir / "late.save"
    # OSError: the daemon closed the connection already, the request went nowhere.
    with contextlib.suppress(OSError):
        client.send({"execute": "migrate", "arguments": {"uri": f"file:{late}"}, "id": "late"})
    replies = [m for m in _rest_until_closed(client) if "event" not in m]
    assert replies == []
    held_fs.release.set()
    assert daemon.proc.wait(DEADLINE) == 0
    assert not late.exists()
    assert b"late.save" not in log.all()


def test_a_socket_file_another_migd_took_over_is_left_in_place(short_dir):
    """Once migd's listener is closed, a new migd may take the path for stale and bind
    there while the old one is still stopping its job: the old one must not unlink it."""
    daemon = start_daemon(short_dir / "qmp.sock")
    path = daemon.socket_path
    path.unlink()  # what a new migd does to a socket nobody answers on...
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        successor.bind(str(path))  # ... before it binds its own
        successor.listen(1)
        assert daemon.stop(signal.SIGTERM, timeout=DEADLINE) == 0
        _connect(path)  # still there, and still the successor's
    finally:
        successor.close()
        if daemon.proc.stderr:
            daemon.proc.stderr.close()


async def test_a_closing_session_answers_the_request_it_handles_and_runs_no_other(short_dir):
    """The server's two steps on their own, with a dispatch that holds its first request:
    the listener closes, then the session replies to what it is handling, runs nothing
    it had already received after it, and closes."""
    path = short_dir / "s.sock"
    handling, finish = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    async def dispatch(session: Session, req: Request) -> dict[str, Any]:
        ran.append(req.execute)
        if req.execute == "held":
            handling.set()
            await finish.wait()
        return return_reply({}, req)

    server = Server(bind_unix_socket(str(path), 0o600), greeting(1, 0, 0, "test"), dispatch)
    server.start()
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        assert "QMP" in json.loads(await reader.readline())
        # Both requests in one write: the second is read before the first is answered.
        writer.write(b'{"execute": "held", "id": 1}\n{"execute": "late", "id": 2}\n')
        await writer.drain()
        await asyncio.wait_for(handling.wait(), DEADLINE)
        await server.stop_accepting()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_unix_connection(str(path))
        closing = asyncio.create_task(server.close_sessions(grace=DEADLINE))

        async def closing_states() -> list[bool]:
            return [s.closing for s in server.sessions]

        await poll_until(closing_states, lambda states: all(states), "the session closing")
        finish.set()
        await asyncio.wait_for(closing, DEADLINE)
        rest = await asyncio.wait_for(reader.read(), DEADLINE)  # up to EOF
        assert [json.loads(line) for line in rest.splitlines()] == [{"return": {}, "id": 1}]
        assert ran == ["held"]
        assert server.sessions == set()
    finally:
        writer.close()


def _fds_of(pid: int, path: Path) -> int:
    """How many of the process's fds are open on `path`."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd) == str(path)
    return count


def test_a_backend_a_stuck_job_thread_uses_is_left_open_at_shutdown(stopping, shm):
    """The job's channel thread is held in a WRITE past the engine's STOP_TIMEOUT: the
    shutdown gives up waiting for it and releases the services, but leaves the backend the
    thread writes from open, for the process's exit (before: its fd was closed under the
    thread, which could then get EBADF, or use the number once another file had it)."""
    daemon, _client, log, held_fs = stopping
    before = _fds_of(daemon.pid, shm / "ram0")  # the backend's, and its mapping's dup
    daemon.proc.send_signal(signal.SIGTERM)
    log.wait_for(b"migd stopped", DEADLINE)  # step 3 done: the WRITE is still held
    assert held_fs.holding.is_set() and not held_fs.release.is_set()
    assert _fds_of(daemon.pid, shm / "ram0") == before
    assert log.has(b"memory backend 'ram0': a stopping job's thread may still use it")
    held_fs.release.set()
    assert daemon.proc.wait(DEADLINE) == 0


def test_shutdown_says_which_job_thread_stuck_in_io_its_exit_waits_for(short_dir, shm, held_fs):
    """The save's channel thread is held in a WRITE (as on a dead NFS mount): after step 3
    the exit waits for it, and says so in the log and in sd_notify's STATUS=, naming the
    job, its file and how long (before: nothing after "migd stopped" until SIGKILL)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    notify.settimeout(DEADLINE)
    env = {**os.environ, "NOTIFY_SOCKET": str(short_dir / "notify")}
    try:
        for daemon, _client, log, fs in _held_save(short_dir, shm, held_fs, env):
            daemon.proc.send_signal(signal.SIGTERM)
            # How long is the time it has waited: any number of seconds.
            wanted = re.compile(
                r"a job thread stuck in I/O for \d+ s: job 'migration' "
                + re.escape(f"(save file:{fs.mountpoint / 'save.img'})")
            )
            log.wait_for(b"shutting down: the exit waits for a job thread stuck in I/O", DEADLINE)
            line = next(x.decode() for x in log.lines if b"the exit waits for" in x)
            assert wanted.search(line), line
            while not (status := notify.recv(4096).decode()).startswith("STATUS=stopping"):
                assert status.startswith(("READY=1", "STATUS=", "STOPPING=1")), status
            assert re.fullmatch("STATUS=stopping: waiting for " + wanted.pattern, status), status
            assert daemon.proc.poll() is None and not fs.release.is_set()
            fs.release.set()
            assert daemon.proc.wait(DEADLINE) == 0
    finally:
        notify.close()


async def test_the_report_of_a_stuck_job_repeats_until_its_thread_returns(short_dir, monkeypatch):
    """The report's loop on its own: with the interval at 0, each round reports again (log
    and STATUS=) while the job's task runs, and the wait ends once it is done."""
    from types import SimpleNamespace

    from migd.app import daemon as daemon_module
    from migd.app.config import Config

    monkeypatch.setattr(daemon_module, "STUCK_REPORT_INTERVAL", 0)
    d = daemon_module.Daemon(Config(socket=str(short_dir / "unused.sock")))
    thread_returned = asyncio.get_running_loop().create_future()
    job = SimpleNamespace(
        id="s1", direction="save", target="file:/nfs/vm.sav", task=thread_returned
    )
    monkeypatch.setattr(
        d.services.engine, "unfinished_jobs", lambda: [] if thread_returned.done() else [job]
    )
    statuses: list[str] = []

    def notify(state: str) -> None:
        statuses.append(state)
        if len(statuses) == 3:
            thread_returned.set_result(None)

    monkeypatch.setattr(d, "notify", notify)
    await d._wait_for_stuck_jobs(time.monotonic())
    assert len(statuses) == 3
    for status in statuses:
        assert re.fullmatch(
            r"STATUS=stopping: waiting for a job thread stuck in I/O for \d+ s: "
            r"job 's1' \(save file:/nfs/vm.sav\)",
            status,
        ), status


def test_shutdown_says_which_worker_thread_call_its_exit_waits_for(short_dir, shm):
    """An object-add whose mem-path's LOOKUP a FUSE server holds (a dead NFS mount): its
    worker thread is still in the call after step 3, and the exit waits for it; the log and
    STATUS= name the call and how long (before: "migd stopped", then nothing)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    notify.settimeout(DEADLINE)
    env = {**os.environ, "NOTIFY_SOCKET": str(short_dir / "notify")}
    for fs in mounted_fuse(short_dir, "hang", HeldLookupFS):
        daemon = start_daemon(short_dir / "qmp.sock", env=env)
        log = LogWatcher(daemon.proc)
        try:
            client = RawClient(daemon.socket_path, timeout=DEADLINE).negotiate()
            client.send({"execute": "object-add", "arguments": {
                "qom-type": "memory-backend-file", "id": "ram0", "size": MiB,
                "mem-path": str(fs.mountpoint / "hung-ram0")}})  # fmt: skip
            assert fs.held.wait(DEADLINE), "the mem-path was never looked up"
            daemon.proc.send_signal(signal.SIGTERM)
            log.wait_for(b"shutting down: the exit waits for a worker-thread call", DEADLINE)
            wanted = re.compile(r"a worker-thread call still running: create_backend for \d+ s")
            line = next(x.decode() for x in log.lines if b"the exit waits for" in x)
            assert wanted.search(line), line
            while not (status := notify.recv(4096).decode()).startswith("STATUS=stopping"):
                pass  # READY=1, STOPPING=1
            assert re.fullmatch("STATUS=stopping: waiting for " + wanted.pattern, status), status
            assert daemon.proc.poll() is None
            fs.release.set()
            assert daemon.proc.wait(DEADLINE) == 0
            client.close()
        finally:
            fs.release.set()
            if daemon.proc.poll() is None:
                daemon.proc.kill()
            daemon.proc.wait()
    notify.close()
