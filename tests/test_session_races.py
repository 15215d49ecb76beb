"""Several clients at once against one daemon: what one session's command does while
another's runs (red-team of the protocol and multi-client side, session 16)."""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from migd.errors import BackendError
from migd.qmp import server
from migd.qmp.wire import decode_request
from migd.state import fdsets
from migd.state.memory import MemoryBackend, create_file_backend

from .conftest import (
    START_TIMEOUT,
    DaemonProcess,
    RawClient,
    is_complete_save,
    open_fds,
    poll_until,
    wait_for_socket,
)

PAGE = 4096


@pytest.fixture
def logged_daemon(short_dir: Path) -> Iterator[tuple[DaemonProcess, Path]]:
    """A migd whose log goes to a file (the test reads it; a pipe nobody reads would
    fill up with the tracebacks of a failing run and stop the daemon)."""
    log = short_dir / "migd.log"
    socket_path = short_dir / "qmp.sock"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "migd", "serve", "--socket", str(socket_path)],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    daemon = DaemonProcess(socket_path, proc)
    try:
        wait_for_socket(socket_path, proc, START_TIMEOUT)
        yield daemon, log
    finally:
        daemon.stop()


def _add_and_delete(
    socket_path: Path, backend_id: str, mem_path: Path, rounds: int, errors: Counter[str]
) -> None:
    """One client: object-add of a file backend, then object-del of it, `rounds` times;
    every error text counted."""
    client = RawClient(socket_path).negotiate()
    try:
        for _ in range(rounds):
            reply = client.execute(
                "object-add",
                {
                    "qom-type": "memory-backend-file",
                    "id": backend_id,
                    "size": PAGE,
                    "mem-path": str(mem_path),
                },
            )
            if "error" in reply:
                errors[reply["error"]["desc"]] += 1
                continue
            assert client.execute("object-del", {"id": backend_id}) == {"return": {}}
    finally:
        client.close()


def test_object_adds_of_two_clients_at_once_never_fail_with_an_internal_error(
    logged_daemon: tuple[DaemonProcess, Path], shm: Path
) -> None:
    """object-add checks, in a worker thread, that no backend maps its file yet; that
    walked the daemon's dict of backends (fstat of each, which lets the event loop run)
    while another client's object-add or object-del changed it: "Internal error:
    RuntimeError: dictionary changed size during iteration" and a traceback in the log,
    for about one object-add in ten with 100 backends (red-team, session 16). Two clients
    each adding and deleting a backend of its own file must both always succeed."""
    daemon, log = logged_daemon
    setup = RawClient(daemon.socket_path).negotiate()
    for i in range(300):  # a long walk, with an fstat per backend
        setup.ok(
            "object-add",
            {
                "qom-type": "memory-backend-file",
                "id": f"f{i}",
                "size": PAGE,
                "mem-path": str(shm / f"f{i}"),
            },
        )
    errors: Counter[str] = Counter()
    clients = [
        threading.Thread(
            target=_add_and_delete, args=(daemon.socket_path, name, shm / name, 500, errors)
        )
        for name in ("a", "b")
    ]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    assert not errors, errors
    assert len(setup.ok("query-memdev")) == 300
    setup.close()
    assert "Traceback" not in log.read_text()


# What a save may rightly answer while another client deletes and re-adds its backend.
_SAVE_REFUSALS = re.compile(
    r"Memory backend 'x' not found"
    r"|The memory backends changed while the migration started .*"
    r"|Memory backend 'x' is in use by job 'j\d+'"
)


def _save_repeatedly(socket_path: Path, where: Path, rounds: int, errors: Counter[str]) -> None:
    client = RawClient(socket_path).negotiate()
    try:
        for n in range(rounds):
            reply = client.execute(
                "memory-save",
                {
                    "job-id": f"j{n}",
                    "backends": ["x"],
                    "uri": f"file:{where / str(n)}",
                    "auto-dismiss": True,
                },
            )
            if "error" in reply and not _SAVE_REFUSALS.fullmatch(reply["error"]["desc"]):
                errors[reply["error"]["desc"]] += 1
    finally:
        client.close()


async def test_an_object_add_whose_check_another_client_overtakes_sees_a_copy(
    migd_inproc, shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race above made certain: object-add compares its file with every backend in a
    worker thread; here that walk stops at its first backend until another client's
    object-add has changed the registry, which the walk must not see ("dictionary
    changed size during iteration" before)."""
    entered, proceed = threading.Event(), threading.Event()
    real_identity = MemoryBackend.file_identity
    held: list[bool] = []

    def held_identity(self: MemoryBackend) -> tuple[int, int] | None:
        if threading.current_thread() is not threading.main_thread() and not held:
            held.append(True)
            entered.set()
            proceed.wait(5)
        return real_identity(self)

    first, second = await migd_inproc.client("first"), await migd_inproc.client("second")
    for name in ("a", "b", "c", "d"):
        (shm / name).write_bytes(b"")
    spec = {"qom-type": "memory-backend-file", "size": PAGE, "share": True}
    await first.execute("object-add", {**spec, "id": "a", "mem-path": str(shm / "a")})
    monkeypatch.setattr(MemoryBackend, "file_identity", held_identity)
    adding = asyncio.create_task(
        first.execute("object-add", {**spec, "id": "b", "mem-path": str(shm / "b")})
    )
    assert await asyncio.to_thread(entered.wait, 5)
    await second.execute("object-add", {**spec, "id": "c", "mem-path": str(shm / "c")})
    proceed.set()
    assert await adding == {}
    ids = sorted(m["id"] for m in await second.execute("query-memdev"))
    assert ids == ["a", "b", "c"]
    await first.disconnect()
    await second.disconnect()


def test_a_save_started_while_another_client_deletes_its_backend_is_refused_cleanly(
    logged_daemon: tuple[DaemonProcess, Path], shm: Path, short_dir: Path
) -> None:
    """A save reads its backends' partial-restore marks in a worker thread, through their
    fds; another client's object-del closed a backend's fd meanwhile: "Internal error:
    OSError: [Errno 9] Bad file descriptor" and a traceback, for about one save in twenty
    (red-team, session 16), or a read of whatever file took the fd's number. The save must
    be refused as a save whose backend went ("not found", "changed"), or run."""
    daemon, log = logged_daemon
    saves = short_dir / "saves"
    saves.mkdir(mode=0o700)
    errors: Counter[str] = Counter()
    saver = threading.Thread(target=_save_repeatedly, args=(daemon.socket_path, saves, 600, errors))
    saver.start()
    client = RawClient(daemon.socket_path).negotiate()
    spec = {"qom-type": "memory-backend-file", "id": "x", "size": PAGE, "mem-path": str(shm / "x")}
    while saver.is_alive():
        client.execute("object-add", spec)  # "already exists" while a save holds it
        client.execute("object-del", {"id": "x"})  # "in use by job" while a save runs
    saver.join()
    client.close()
    assert not errors, errors
    assert "Traceback" not in log.read_text()


async def test_another_client_is_answered_while_object_del_unmaps_a_backend(
    migd_inproc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """object-del unmapped the backend on the event loop: a populated mapping takes
    20-25 ms per GiB to unmap (2 GiB: 44-51 ms measured, a memory-backend-ram restored
    into or a saved memory file; a 64 GiB guest over a second), and no other client was
    answered meanwhile (red-team, session 16). Here the unmap waits, as a long munmap does,
    until another client has been answered, or 5 s."""
    unmapping = threading.Event()
    answered = threading.Event()
    woke: list[bool] = []
    real_close = MemoryBackend.close

    def slow_close(self: MemoryBackend) -> None:
        if self.id == "big":
            unmapping.set()
            woke.append(answered.wait(5))
        real_close(self)

    monkeypatch.setattr(MemoryBackend, "close", slow_close)
    deleter = await migd_inproc.client("deleter")
    other = await migd_inproc.client("other")
    spec = {"qom-type": "memory-backend-ram", "id": "big", "size": 1 << 20}
    await deleter.execute("object-add", spec)
    deleting = asyncio.create_task(deleter.execute("object-del", {"id": "big"}))
    assert await asyncio.to_thread(unmapping.wait, 5)
    await asyncio.wait_for(other.execute("query-version"), 5)
    answered.set()
    assert await deleting == {}
    assert woke == [True], "no other client was answered while object-del unmapped"
    assert await other.execute("query-memdev") == []
    await deleter.disconnect()
    await other.disconnect()


@pytest.mark.parametrize("command", ["remove-fd", "closefd", "getfd"])
async def test_another_client_is_answered_while_a_passed_fd_is_closed(
    migd_inproc, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """remove-fd, closefd and getfd (replacing a namesake) closed the stored fd on the
    event loop; when it is the last reference to a memfd, the close frees its memory:
    105 ms for 2 GiB, 400 ms for 8 GiB measured, in which no other client was answered
    (red-team, session 16). Here the close waits, as such a close does, until another
    client has been answered, or 5 s."""
    closing = threading.Event()
    answered = threading.Event()
    woke: list[bool] = []
    real_close = fdsets._close
    slow: set[int] = set()

    def slow_close(fd: int) -> None:
        if fd in slow:
            closing.set()
            woke.append(answered.wait(5))
        real_close(fd)

    monkeypatch.setattr(fdsets, "_close", slow_close)
    owner = await migd_inproc.client("owner")
    other = await migd_inproc.client("other")
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    try:
        owner.send_fd_scm(memfd)
        if command == "remove-fd":
            added = await owner.execute("add-fd", {"fdset-id": 7})
            slow.add(added["fd"])
            closing_it = owner.execute("remove-fd", {"fdset-id": 7})
        else:
            await owner.execute("getfd", {"fdname": "ram"})
            slow.add(migd_inproc.daemon.services.fdsets._named[(None, "ram")])  # root's
            if command == "closefd":
                closing_it = owner.execute("closefd", {"fdname": "ram"})
            else:
                owner.send_fd_scm(memfd)
                closing_it = owner.execute("getfd", {"fdname": "ram"})
    finally:
        os.close(memfd)  # the daemon's is the last reference
    pending = asyncio.create_task(closing_it)
    assert await asyncio.to_thread(closing.wait, 5)
    await asyncio.wait_for(other.execute("query-version"), 5)
    answered.set()
    assert await pending == {}
    assert woke == [True], f"no other client was answered while {command} closed the fd"
    await owner.disconnect()
    await other.disconnect()


async def _concluded(client, job_id: str) -> dict:
    """Poll query-jobs until the job is concluded; dismiss it and return its entry."""

    async def job() -> dict:
        return next(j for j in await client.execute("query-jobs") if j["id"] == job_id)

    info = await poll_until(job, lambda j: j["status"] == "concluded", f"job {job_id}")
    await client.execute("job-dismiss", {"id": job_id})
    return info


async def test_a_restore_into_a_passed_memfd_lands_though_its_holder_set_o_append(
    qmp, short_dir: Path
) -> None:
    """A passed fd shares its open file description with whoever passed it (and with a
    VMM given the same memfd); migd clears O_APPEND when it takes a dup, but a holder may
    set it again later. A staged restore (direct-io into memory on 4 KiB pages) pwrites
    into the memory file, and Linux's pwrite on an O_APPEND description appends: the
    restore ended 'completed', the memory as it was before, the file grown by the restored
    bytes (red-team, session 16). The restored bytes must land in the memory."""
    size = 8 << 20
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, size)
        data = os.urandom(size)
        os.pwrite(memfd, data, 0)
        qmp.send_fd_scm(memfd)
        await qmp.execute("add-fd", {"fdset-id": 5})
        spec = {"qom-type": "memory-backend-file", "id": "m", "size": size}
        await qmp.execute("object-add", {**spec, "mem-path": "/dev/fdset/5"})
        uri = f"file:{short_dir / 'm.sav'}"
        job = {"backends": ["m"], "uri": uri, "direct-io": True}
        await qmp.execute("memory-save", {"job-id": "save", **job})
        assert (await _concluded(qmp, "save")).get("error") is None
        os.pwrite(memfd, b"\xaa" * size, 0)  # the guest ran on
        flags = fcntl.fcntl(memfd, fcntl.F_GETFL)
        fcntl.fcntl(memfd, fcntl.F_SETFL, flags | os.O_APPEND)  # the holder's own business
        await qmp.execute("memory-restore", {"job-id": "restore", **job})
        restored = await _concluded(qmp, "restore")
        assert restored["x-migration-status"] == "completed", restored
        assert os.fstat(memfd).st_size == size
        assert os.pread(memfd, size, 0) == data
        await qmp.execute("object-del", {"id": "m"})
        await qmp.execute("remove-fd", {"fdset-id": 5})
    finally:
        os.close(memfd)


def test_before_rwf_noappend_a_memory_file_open_for_appending_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, shm: Path
) -> None:
    """Kernels before 6.9 refuse RWF_NOAPPEND (EOPNOTSUPP): there a staged restore's write
    into a memory file whose description has O_APPEND fails naming O_APPEND, instead of
    appending."""
    real_pwritev = os.pwritev

    def old_kernel(fd: int, buffers: list, offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", old_kernel)
    path = shm / "ram"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    backend = create_file_backend("m", 2 * PAGE, str(path), fd=fd)
    try:
        backend.write_at(memoryview(b"\x01" * PAGE), PAGE)  # no O_APPEND: written
        assert path.read_bytes() == bytes(PAGE) + b"\x01" * PAGE
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        with pytest.raises(BackendError, match=r"is open for appending \(O_APPEND"):
            backend.write_at(memoryview(b"\x02" * PAGE), 0)
        assert path.stat().st_size == 2 * PAGE
    finally:
        backend.close()


async def test_a_save_through_a_passed_fd_never_completes_with_a_broken_file_under_o_append(
    qmp, shm: Path, short_dir: Path
) -> None:
    """The save's side of the shared description: the client set O_APPEND on the fd it
    passed while the save ran, and the save ended 'completed' with its pages appended past
    its layout (118 MB for 64 MiB of memory), a file every reader refuses as incomplete
    (red-team, session 16). Its pages must land at their offsets; its metadata, written
    with plain pwrite, is refused under O_APPEND: the save fails naming it, or completes
    with a whole file."""
    size = 8 << 20
    memory = shm / "ram"
    memory.write_bytes(os.urandom(size))
    spec = {"qom-type": "memory-backend-file", "id": "m", "size": size, "mem-path": str(memory)}
    await qmp.execute("object-add", spec)
    path = short_dir / "m.sav"
    passed = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        qmp.send_fd_scm(passed)
        await qmp.execute("add-fd", {"fdset-id": 6})
        job = {"backends": ["m"], "uri": "file:/dev/fdset/6", "multifd-channels": 1}
        await qmp.execute("memory-save", {"job-id": "save", "max-bandwidth": 4 << 20, **job})

        async def progress() -> dict:
            return next(j for j in await qmp.execute("query-jobs") if j["id"] == "save")

        await poll_until(progress, lambda j: j["current-progress"] > 0, "save under way")
        flags = fcntl.fcntl(passed, fcntl.F_GETFL)
        fcntl.fcntl(passed, fcntl.F_SETFL, flags | os.O_APPEND)
        saved = await _concluded(qmp, "save")
    finally:
        os.close(passed)
    if saved["x-migration-status"] == "completed":
        assert is_complete_save(path), f"'completed', but {path} is no complete save"
    else:
        assert "O_APPEND" in saved["error"], saved
    await qmp.execute("remove-fd", {"fdset-id": 6})


def test_two_object_adds_extending_one_empty_file_at_once_never_cut_the_added_one(
    logged_daemon: tuple[DaemonProcess, Path], shm: Path
) -> None:
    """Two clients name one existing empty file at once, with other ids: one of 8 MiB,
    one of a size that cannot be mapped. Both saw the file empty and extended it; the
    refused one then cut it back to empty under the other's mapping: 25 of 300 rounds
    answered the 8 MiB object-add {} with its file at 0 bytes (each save of it then
    fails), and some answered "Internal error: ValueError: mmap length is greater than
    file size" (red-team, session 16). A backend that was added keeps its file's size."""
    daemon, log = logged_daemon
    clients = {name: RawClient(daemon.socket_path).negotiate() for name in ("a", "b")}
    sizes = {"a": 8 << 20, "b": (1 << 62) - PAGE}  # b: refused, "Cannot allocate memory"
    wrong: Counter[str] = Counter()
    for n in range(300):
        path = shm / f"f{n}"
        path.touch(mode=0o600)
        start = threading.Barrier(2)
        replies: dict[str, dict] = {}

        def add(
            name: str,
            path: Path = path,
            start: threading.Barrier = start,
            replies: dict[str, dict] = replies,
        ) -> None:
            spec = {"qom-type": "memory-backend-file", "id": name, "size": sizes[name]}
            start.wait()
            replies[name] = clients[name].execute("object-add", {**spec, "mem-path": str(path)})

        threads = [threading.Thread(target=add, args=(name,)) for name in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name, reply in replies.items():
            if "Internal error" in reply.get("error", {}).get("desc", ""):
                wrong[reply["error"]["desc"]] += 1
            elif "return" in reply:
                if name == "a" and path.stat().st_size != sizes["a"]:
                    wrong[f"added, its file then {path.stat().st_size} bytes"] += 1
                clients[name].ok("object-del", {"id": name})
        path.unlink()
    for client in clients.values():
        client.close()
    assert not wrong, wrong
    assert "Traceback" not in log.read_text()


def test_a_reply_naming_a_file_whose_name_is_not_utf8_is_json_qemu_reads(
    daemon: DaemonProcess, short_dir: Path
) -> None:
    """Errors name a passed fd's file by the name the kernel gives (os.readlink), which
    keeps a byte that is not UTF-8 as a lone surrogate: the reply carried an escape like
    \\udcff, which QEMU's JSON parser and migd's own refuse ("\\udcff is not a valid
    Unicode character") (red-team, session 16). As QEMU's writer does, such a byte is
    U+FFFD on the wire."""
    name = os.fsencode(short_dir) + b"/ram-\xff"
    fd = os.open(name, os.O_RDONLY | os.O_CREAT, 0o600)
    client = RawClient(daemon.socket_path).negotiate()
    try:
        client.sock.sendmsg(
            [b'{"execute": "add-fd", "arguments": {"fdset-id": 3}}'],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
        )
        assert client.recv_reply()["return"]["fdset-id"] == 3
        client.send(
            {"execute": "memory-restore", "arguments": {"job-id": "r", "uri": "file:/dev/fdset/3"}}
        )
        while b"\r\n" not in client._buf:
            client._buf += client.sock.recv(65536)
        line, client._buf = client._buf.split(b"\r\n", 1)
        decode_request(b'{"execute": "x", "id": ' + line + b"}")  # raises on a lone surrogate
        desc = json.loads(line)["error"]["desc"]
        assert desc == f"'{short_dir}/ram-\ufffd': the file is empty: not a save file"
    finally:
        os.close(fd)
        client.close()


async def test_another_client_is_answered_while_a_clients_unused_fds_are_closed(
    migd_inproc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fds a client passed and left unused (a new batch replaces them, or a command took
    one fd of a batch) were closed on the event loop: for the last reference to a memfd,
    50 ms per GiB, in which no other client was answered (red-team, session 16). Here the
    close waits, as such a close does, until another client has been answered, or 5 s."""
    closing = threading.Event()
    answered = threading.Event()
    woke: list[bool] = []
    real_close_fds = getattr(server, "close_fds", None)

    def slow_close_fds(fds: list[int]) -> None:
        closing.set()
        woke.append(answered.wait(5))
        real_close_fds(fds)

    monkeypatch.setattr(server, "close_fds", slow_close_fds, raising=False)
    passer = await migd_inproc.client("passer")
    other = await migd_inproc.client("other")
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    try:
        passer.send_fd_scm(memfd)  # a batch no command takes
        passer.send_fd_scm(memfd)  # the next batch replaces it: the first one is closed
        replaced = asyncio.create_task(passer.execute("add-fd", {"fdset-id": 9}))
        assert await asyncio.to_thread(closing.wait, 5)
        await asyncio.wait_for(other.execute("query-version"), 5)
        answered.set()
        assert (await replaced)["fdset-id"] == 9
        assert woke[0] is True, "no other client was answered while unused fds were closed"
        await passer.execute("remove-fd", {"fdset-id": 9})
    finally:
        os.close(memfd)
        answered.set()
    await passer.disconnect()
    await other.disconnect()


async def test_another_client_is_answered_while_a_gone_clients_unused_fds_are_closed(
    migd_inproc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same at disconnect: fds a client passed and no command took were closed on the
    event loop when its connection ended (50 ms per GiB of a memfd's last reference).
    They are closed in a worker thread now, and the daemon's stop waits for that."""
    closing, answered, closed = threading.Event(), threading.Event(), threading.Event()
    woke: list[bool] = []
    real_close_fds = server.close_fds

    def slow_close_fds(fds: list[int]) -> None:
        closing.set()
        woke.append(answered.wait(5))
        real_close_fds(fds)
        closed.set()

    monkeypatch.setattr(server, "close_fds", slow_close_fds)
    passer = await migd_inproc.client("passer")
    other = await migd_inproc.client("other")
    memfd = os.memfd_create("gone-guest-ram", os.MFD_CLOEXEC)
    try:
        passer.send_fd_scm(memfd)  # a batch no command takes, then the client goes
        await passer.execute("query-version")
        await passer.disconnect()
    finally:
        os.close(memfd)
    try:
        assert await asyncio.to_thread(closing.wait, 5)
        await asyncio.wait_for(other.execute("query-version"), 5)
    finally:
        answered.set()
    assert await asyncio.to_thread(closed.wait, 5)
    assert woke == [True], "no other client was answered while the gone client's fds closed"
    await other.disconnect()
    await migd_inproc.stop()  # waits for the close: no fd of the memfd is left
    assert not [entry for entry in open_fds() if "gone-guest-ram" in entry]
