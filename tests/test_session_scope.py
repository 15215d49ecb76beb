"""x-migd-session-scope: what a scoped session created ends with its connection; an
unscoped session's stays (QEMU's semantics). An in-process daemon (its sessions and
release tasks can be looked at), a raw async client for the session that goes away
abruptly, qemu.qmp clients for the others."""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from migd.io.engine import Counters, Transfer

from .conftest import InProcessDaemon, add_file_backend, open_fds, poll_until, qmp_error
from .fake_engine import FakeEngine

MiB = 1 << 20
SIZE = 4 * MiB


class AsyncRawClient:
    """A plain QMP client on a non-blocking socket of the test's loop, sending fds with
    the command itself; close() drops the connection at once, mid-job or not."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    @classmethod
    async def connect(cls, path: Path) -> AsyncRawClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(path))
        client = cls(sock)
        await client._recv()  # the greeting
        assert await client.execute("qmp_capabilities") == {"return": {}}
        return client

    async def _recv(self) -> dict[str, Any]:
        while b"\r\n" not in self._buf:
            chunk = await asyncio.wait_for(
                asyncio.get_running_loop().sock_recv(self.sock, 65536), 10
            )
            if not chunk:
                raise ConnectionError("connection closed by migd")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return dict(json.loads(line))

    async def execute(
        self, name: str, arguments: dict[str, Any] | None = None, fd: int | None = None
    ) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        if fd is None:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
        else:  # a few bytes: the socket buffer takes them at once
            rights = array.array("i", [fd])
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        while True:
            reply = await self._recv()
            if "event" not in reply:
                return reply

    async def ok(self, name: str, arguments: dict[str, Any] | None = None, **kw: Any) -> Any:
        reply = await self.execute(name, arguments, **kw)
        assert "return" in reply, (name, reply)
        return reply["return"]

    def close(self) -> None:
        self.sock.close()


@dataclass
class GatedEngine:
    """An IOEngine whose transfer moves nothing, and once cancelled still takes until
    `gate` opens to stop: a job slow to end, as one stuck in a disk's I/O call."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    moving: bool = False  # the transfer began (the job is past its setup)

    async def run(self, transfer: Transfer) -> None:
        transfer.counters.append(Counters())
        self.moving = True
        try:
            while not transfer.cancel.is_set():
                await asyncio.sleep(0.01)
            await self.gate.wait()
        except BaseException:
            transfer.cancel.set()  # the IOEngine contract
            raise


def _memfd(size: int = SIZE) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


async def _scoped_save(client: AsyncRawClient, short_dir: Path, scope: bool = True) -> None:
    """What `migd vm save` does: a backend on a passed memfd, a job saving it."""
    if scope:
        assert await client.ok("x-migd-session-scope") == {}
    fd = _memfd()
    try:
        added = await client.ok("add-fd", {"opaque": "guest RAM"}, fd=fd)
    finally:
        os.close(fd)  # migd has its own
    ram = f"/dev/fdset/{added['fdset-id']}"
    await client.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram",
                                   "size": SIZE, "mem-path": ram})  # fmt: skip
    await client.ok("memory-save", {"job-id": "vm-save", "backends": ["ram"],
                                    "uri": f"file:{short_dir}/vm.sav"})  # fmt: skip


async def _left(qmp: Any) -> list[Any]:
    return [await qmp.execute(c) for c in ("query-jobs", "query-memdev", "query-fdsets")]


async def _session_gone(migd: InProcessDaemon, count: int) -> None:
    """Until migd has seen the connection end and no release runs any more."""
    daemon = migd.daemon

    async def state() -> tuple[int, int]:
        assert daemon.server is not None
        return len(daemon.server.sessions), len(daemon._releases)

    await poll_until(state, lambda s: s == (count, 0), "the session's end")


async def _job_status(qmp: Any, job_id: str) -> str | None:
    return next((j["status"] for j in await qmp.execute("query-jobs") if j["id"] == job_id), None)


async def test_the_command_is_listed_and_takes_no_arguments(qmp: Any) -> None:
    names = {c["name"] for c in await qmp.execute("query-commands")}
    assert "x-migd-session-scope" in names
    assert await qmp.execute("x-migd-session-scope") == {}
    assert await qmp.execute("x-migd-session-scope") == {}  # idempotent
    desc = await qmp_error(qmp, "x-migd-session-scope", {"id": "x"})
    assert "id" in desc


async def test_a_scoped_session_s_backend_fdset_and_running_job_go_with_its_connection(
    migd_inproc: InProcessDaemon, qmp: Any, short_dir: Path
) -> None:
    migd_inproc.daemon.services.engine.io_engine = fake = FakeEngine(hang=True)
    client = await AsyncRawClient.connect(migd_inproc.socket_path)
    await _scoped_save(client, short_dir)

    async def hanging() -> bool:
        return fake.hanging

    await poll_until(hanging, bool, "the job's transfer")
    assert await _job_status(qmp, "vm-save") == "running"
    client.close()  # mid-job, without a word: as a killed client
    jobs, memdevs, fdsets = await poll_until(
        lambda: _left(qmp), lambda lists: not any(lists), "the scoped session's release"
    )
    assert (jobs, memdevs, fdsets) == ([], [], [])
    # The memfd is closed in migd too: no fd of the daemon (this process) points at it.
    assert not [entry for entry in open_fds() if "guest-ram" in entry]


async def test_an_unscoped_session_s_objects_stay_after_it_ends(
    migd_inproc: InProcessDaemon, qmp: Any, short_dir: Path
) -> None:
    migd_inproc.daemon.services.engine.io_engine = FakeEngine(hang=True)
    client = await AsyncRawClient.connect(migd_inproc.socket_path)
    await _scoped_save(client, short_dir, scope=False)
    client.close()
    await _session_gone(migd_inproc, 1)  # only `qmp` is left
    jobs, memdevs, fdsets = await _left(qmp)
    assert [(j["id"], j["status"]) for j in jobs] == [("vm-save", "running")]
    assert [m["id"] for m in memdevs] == ["ram"]
    assert len(fdsets) == 1 and len(fdsets[0]["fds"]) == 1
    await qmp.execute("job-cancel", {"id": "vm-save"})  # QEMU's semantics: ours to end
    await poll_until(lambda: _job_status(qmp, "vm-save"), lambda s: s == "concluded", "cancel")


async def test_a_backend_another_session_s_job_uses_is_left(
    migd_inproc: InProcessDaemon, qmp: Any, shm: Path, short_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    migd_inproc.daemon.services.engine.io_engine = FakeEngine(hang=True)
    client = await AsyncRawClient.connect(migd_inproc.socket_path)
    await client.ok("x-migd-session-scope")
    await client.ok("object-add", {"qom-type": "memory-backend-file", "id": "shared",
                                   "size": SIZE, "mem-path": str(shm / "shared")})  # fmt: skip
    # Another session (not scoped) saves the scoped session's backend.
    await qmp.execute("memory-save", {"job-id": "other", "backends": ["shared"],
                                      "uri": f"file:{short_dir}/other.sav"})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="migd.api.scope"):
        client.close()
        await _session_gone(migd_inproc, 1)
    assert [m["id"] for m in await qmp.execute("query-memdev")] == ["shared"]
    assert await _job_status(qmp, "other") == "running"
    assert "'shared' is left, in use by job 'other'" in caplog.text
    await qmp.execute("job-cancel", {"id": "other"})
    await poll_until(lambda: _job_status(qmp, "other"), lambda s: s == "concluded", "cancel")


async def test_another_client_is_served_while_the_release_waits_for_the_job(
    migd_inproc: InProcessDaemon, qmp: Any, short_dir: Path
) -> None:
    engine = GatedEngine()
    migd_inproc.daemon.services.engine.io_engine = engine
    client = await AsyncRawClient.connect(migd_inproc.socket_path)
    await _scoped_save(client, short_dir)

    async def moving() -> bool:
        return engine.moving

    await poll_until(moving, bool, "the job's transfer")
    client.close()
    # The release cancelled the job, which takes until the gate opens to stop.
    await poll_until(lambda: _job_status(qmp, "vm-save"), lambda s: s == "aborting", "cancel")
    # Meanwhile a new client connects and is served; the release holds nothing up.
    other = await migd_inproc.client("other")
    try:
        assert (await other.execute("query-version"))["package"].startswith("migd")
        assert [m["id"] for m in await other.execute("query-memdev")] == ["ram"]
        await add_file_backend(other, "b", short_dir / "b.ram", SIZE)
        assert [m["id"] for m in await other.execute("query-memdev")] == ["ram", "b"]
    finally:
        await other.disconnect()
    assert len(migd_inproc.daemon._releases) == 1  # still waiting for the job
    engine.gate.set()
    _, memdevs, _ = await poll_until(
        lambda: _left(qmp), lambda lists: not lists[0] and not lists[2], "the release"
    )
    assert [m["id"] for m in memdevs] == ["b"]


async def test_what_the_client_deleted_itself_or_another_session_reused_is_left(
    migd_inproc: InProcessDaemon, qmp: Any, shm: Path
) -> None:
    client = await AsyncRawClient.connect(migd_inproc.socket_path)
    await client.ok("x-migd-session-scope")
    await client.ok("object-add", {"qom-type": "memory-backend-file", "id": "a",
                                   "size": SIZE, "mem-path": str(shm / "a")})  # fmt: skip
    fd = _memfd()
    try:
        added = await client.ok("add-fd", {"fdset-id": 7}, fd=fd)
    finally:
        os.close(fd)
    # The client cleans up after itself, and another session takes the names.
    await client.ok("object-del", {"id": "a"})
    await client.ok("remove-fd", {"fdset-id": added["fdset-id"]})
    await add_file_backend(qmp, "a", shm / "a2", SIZE)
    qmp.send_fd_scm(fd2 := _memfd())
    os.close(fd2)
    await qmp.execute("add-fd", {"fdset-id": 7})
    client.close()
    await _session_gone(migd_inproc, 1)
    assert [m["mem-path"] for m in await qmp.execute("query-memdev")] == [str(shm / "a2")]
    assert [s["fdset-id"] for s in await qmp.execute("query-fdsets")] == [7]
