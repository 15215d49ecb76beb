"""Shared fixtures: a real migd daemon process on a short UNIX socket path, raw clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from migd.state.partial import SHARED_DIR_ENV

START_TIMEOUT = 15.0
# An illegal job status change raises in every daemon the tests run (in-process or not).
os.environ["MIGD_STRICT_STATUS"] = "1"
# Files the tests create hold "guest RAM" that migd refuses to restore into, or save
# into, while others may read them (a mem-path or save file at 0644): tests create theirs
# as a careful operator would. A test that needs a readable file says so with chmod.
os.umask(0o077)
T = TypeVar("T")


@pytest.fixture(autouse=True, scope="session")
def partial_marks_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every daemon of the session (subprocess or in-process) shares one partial-marks
    directory of the session's, not the host's /run/migd/partial-restores."""
    path = tmp_path_factory.mktemp("marks") / "partial-restores"
    os.environ[SHARED_DIR_ENV] = str(path)
    yield path
    del os.environ[SHARED_DIR_ENV]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: UNIX socket paths must stay under 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="migd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def rest_of_output(proc: subprocess.Popen[Any], timeout: float) -> tuple[Any, Any]:
    """(stdout, stderr) that `proc` writes from here until it exits, for a test that has
    already read lines of them. Popen.communicate(timeout=...) reads the pipes' raw fds,
    so what their buffered readers took in beside the lines read is lost: a daemon's
    warning logged in the same instant as the line a test waited for was missing, two
    runs in eight (test_systemd, round 10c). Each pipe is read to its end through its
    own reader, in a thread, while the process is waited for."""
    got: dict[str, Any] = {}
    pipes = {"out": proc.stdout, "err": proc.stderr}
    readers = [
        threading.Thread(target=lambda n=name, p=pipe: got.__setitem__(n, p.read()), daemon=True)
        for name, pipe in pipes.items()
        if pipe is not None
    ]
    for reader in readers:
        reader.start()
    proc.wait(timeout)
    for reader in readers:
        reader.join(timeout)
    return got.get("out"), got.get("err")


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll until the daemon accepts connections (or dies); raises on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"migd exited with {proc.returncode}: {proc.stderr.read().decode()}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise TimeoutError(f"migd did not listen on {path} within {timeout}s")


class DaemonProcess:
    def __init__(self, socket_path: Path, proc: subprocess.Popen[bytes]) -> None:
        self.socket_path = socket_path
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_daemon(
    socket_path: Path, *extra: str, env: dict[str, str] | None = None
) -> DaemonProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", "migd", "serve", "--socket", str(socket_path), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    wait_for_socket(socket_path, proc, START_TIMEOUT)
    return DaemonProcess(socket_path, proc)


@pytest.fixture
def daemon(short_dir: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(short_dir / "qmp.sock")
    yield d
    d.stop()
    if d.proc.stderr:
        d.proc.stderr.close()


class RawClient:
    """A plain socket client that reads whole QMP messages (CRLF-terminated lines)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""
        self.greeting = self.recv()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg: dict[str, Any]) -> None:
        self.send_raw(json.dumps(msg).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by migd")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return json.loads(line)

    def recv_reply(self) -> dict[str, Any]:
        """The next reply, skipping events."""
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg

    def execute(
        self, name: str, arguments: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        self.send(msg)
        return self.recv_reply()

    def ok(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """execute() that must succeed: its `return` value."""
        reply = self.execute(name, arguments)
        assert "return" in reply, (name, reply)
        return reply["return"]

    def poll_migrate(self, done: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> Any:
        """query-migrate until done(info) holds; fails at the deadline, or at once when the
        job ended in a final state that done() does not accept (a bounded busy wait)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.ok("query-migrate")
            if done(info):
                return info
            assert info.get("status") not in FINAL_STATES, f"migration ended: {info}"
            assert time.monotonic() < deadline, f"not reached within {timeout}s: {info}"
            time.sleep(0.005)

    def wait_final(self, timeout: float = 60.0) -> Any:
        """query-migrate until the job is completed, failed or cancelled; its info."""
        return self.poll_migrate(lambda info: info.get("status") in FINAL_STATES, timeout)

    def negotiate(self) -> RawClient:
        assert self.execute("qmp_capabilities") == {"return": {}}
        return self

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def open_daemon(short_dir: Path) -> Iterator[DaemonProcess]:
    """A daemon whose socket other uids may reach (mode 0666 in a searchable dir)."""
    short_dir.chmod(0o711)
    d = start_daemon(short_dir / "qmp.sock", "--socket-mode", "0666")
    yield d
    d.stop()
    if d.proc.stderr:
        d.proc.stderr.close()


@pytest.fixture
def raw(daemon: DaemonProcess) -> Iterator[RawClient]:
    client = RawClient(daemon.socket_path)
    yield client
    client.close()


def open_fds(pid: int | None = None) -> set[str]:
    """'fd -> target' of every open fd, without the one listing the directory itself."""
    where = f"/proc/{pid}/fd" if pid else "/proc/self/fd"
    out = set()
    for name in os.listdir(where):
        try:
            target = os.readlink(f"{where}/{name}")
        except FileNotFoundError:
            continue  # the listing's own fd, closed by now
        if not target.endswith("/fd") or "/proc/" not in target:
            out.add(f"{name} -> {target}")
    return out


# --- in-process daemon: lets tests look at this process's fds and threads -------------

FINAL_STATES = {"completed", "failed", "cancelled"}


class InProcessDaemon:
    """A Daemon running on the test's own event loop, with a connected QMPClient."""

    def __init__(self, socket_path: Path, **config: Any) -> None:
        from migd.app.config import Config
        from migd.app.daemon import Daemon

        self.socket_path = socket_path
        self.daemon = Daemon(Config(socket_path=str(socket_path), **config))
        self.task: Any = None

    async def start(self) -> None:
        import asyncio

        self.task = asyncio.create_task(self.daemon.run())
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket_path.exists():
            if self.task.done():
                self.task.result()
            if time.monotonic() > deadline:
                raise TimeoutError("in-process migd did not start")
            await asyncio.sleep(0.01)

    async def client(self, name: str = "test") -> Any:
        from qemu.qmp import QMPClient

        c = QMPClient(name)
        await c.connect(str(self.socket_path))
        return c

    async def stop(self) -> None:
        import asyncio

        self.daemon.request_stop()
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def migd_inproc(short_dir: Path):
    d = InProcessDaemon(short_dir / "qmp.sock")
    await d.start()
    yield d
    await d.stop()


@pytest.fixture
async def qmp(migd_inproc: InProcessDaemon):
    """A negotiated qemu.qmp client of an in-process daemon."""
    client = await migd_inproc.client()
    yield client
    await client.disconnect()


def wait_job_concluded(client: RawClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """query-jobs until the job is concluded; its entry (a bounded poll: its event may
    come before the reply that started it, which RawClient.execute skips)."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = {job["id"]: job for job in client.ok("query-jobs")}
        if jobs[job_id]["status"] == "concluded":
            return jobs[job_id]
        assert time.monotonic() < deadline, jobs[job_id]
        time.sleep(0.005)


async def wait_migration(client: Any, timeout: float = 120.0) -> dict[str, Any]:
    """Poll query-migrate until the job reaches a final state; return its info."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        info = await client.execute("query-migrate")
        if info.get("status") in FINAL_STATES:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration still {info.get('status')} after {timeout}s")
        await asyncio.sleep(0.01)


def reached(info: dict[str, Any], wanted: str) -> bool:
    """Has a job reached `wanted`? Fails at once if it ended in another final state, so
    that a wait for "active" does not spin until its deadline on a job that already
    failed (and says why)."""
    status = info.get("status")
    if status == wanted:
        return True
    if status in FINAL_STATES:
        raise AssertionError(f"migration ended {status}, never {wanted}: {info}")
    return False


async def poll_until(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    what: str,
    timeout: float = 30.0,
    interval: float = 0.01,
) -> T:
    """Await probe() until done(value) holds and return that value; fail with `what` and
    the last value once `timeout` seconds have passed (a bounded busy wait)."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout}s; last: {value!r}")
        await asyncio.sleep(interval)


async def wait_status(client: Any, wanted: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll query-migrate (a qemu.qmp client) until the job's status is `wanted`."""
    return await poll_until(
        lambda: client.execute("query-migrate"),
        lambda info: reached(info, wanted),
        f"migration status {wanted}",
        timeout,
    )


async def enable_mapped_ram(
    client: Any,
    *,
    multifd: bool = True,
    channels: int = 2,
    direct_io: bool = False,
    events: bool = True,
    **params: Any,
) -> None:
    caps = [
        {"capability": "mapped-ram", "state": True},
        {"capability": "multifd", "state": multifd},
        {"capability": "events", "state": events},
    ]
    await client.execute("migrate-set-capabilities", {"capabilities": caps})
    await client.execute(
        "migrate-set-parameters",
        {"multifd-channels": channels, "direct-io": direct_io, **params},
    )


async def add_file_backend(client: Any, id: str, path: Path | str, size: int, **extra: Any) -> None:
    await client.execute(
        "object-add",
        {"qom-type": "memory-backend-file", "id": id, "size": size, "mem-path": str(path), **extra},
    )


async def save(client: Any, path: Path | str, offset: int | None = None) -> dict[str, Any]:
    uri = f"file:{path}" + (f",offset={offset}" if offset is not None else "")
    await client.execute("migrate", {"uri": uri})
    return await wait_migration(client)


async def restore(
    client: Any, path: Path | str, offset: int | None = None, **extra: Any
) -> dict[str, Any]:
    uri = f"file:{path}" + (f",offset={offset}" if offset is not None else "")
    await client.execute("migrate-incoming", {"uri": uri, **extra})
    return await wait_migration(client)


def fill_random(path: Path, size: int, seed: int = 1) -> bytes:
    """Write `size` random bytes to `path` (deterministic by seed); return them."""
    import numpy as np

    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def shm_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="migd-test-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shm() -> Iterator[Path]:
    """A fresh directory on tmpfs (/dev/shm), for memory backends."""
    yield from shm_dir()


# --- special filesystems ------------------------------------------------------------------


def _mount(args: list[str], where: Path) -> bool:
    result = subprocess.run(["mount", *args, str(where)], capture_output=True)
    return result.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _mounted(where: Path, args: list[str], what: str) -> Iterator[Path]:
    """Mount a filesystem on a new directory for one test, or skip the test."""
    where.mkdir()
    if not _mount(args, where):
        pytest.skip(f"cannot mount {what} here (needs root)")
    yield where
    _umount(where)


@pytest.fixture
def ramfs(short_dir: Path) -> Iterator[Path]:
    """A ramfs mount: a filesystem that refuses O_DIRECT with EINVAL."""
    yield from _mounted(short_dir / "ramfs", ["-t", "ramfs", "ramfs"], "ramfs")


@pytest.fixture
def small_ext4(short_dir: Path) -> Iterator[Path]:
    """A 24 MiB ext4 filesystem on a loop device, for 'disk full'."""
    image = short_dir / "small.img"
    where = short_dir / "small"
    where.mkdir()
    subprocess.run(["truncate", "-s", "24M", str(image)], check=True)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True)
    if made.returncode != 0 or not _mount(["-o", "loop", str(image)], where):
        pytest.skip("cannot make and loop-mount an ext4 image here (needs root)")
    yield where
    _umount(where)


@pytest.fixture
def small_tmpfs(short_dir: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: memory backends on it run out of room (ENOSPC) when filled."""
    yield from _mounted(short_dir / "tmpfs8", ["-t", "tmpfs", "-o", "size=8M", "tmpfs"], "tmpfs")


@pytest.fixture
def huge_tmpfs(short_dir: Path) -> Iterator[Path]:
    """A tmpfs whose files get transparent huge pages (huge=always)."""
    args = ["-t", "tmpfs", "-o", "huge=always,size=512M", "tmpfs"]
    yield from _mounted(short_dir / "huge", args, "tmpfs with huge pages")


@pytest.fixture
def readonly_dir(short_dir: Path) -> Iterator[Path]:
    """A read-only tmpfs mount: every create or write fails with EROFS."""
    yield from _mounted(short_dir / "ro", ["-t", "tmpfs", "-o", "ro,size=1M", "tmpfs"], "tmpfs")


def migd_threads() -> list[str]:
    import threading

    # Busy workers only: io/threads.py keeps idle ones, named "idle worker", for the next job.
    return [t.name for t in threading.enumerate() if t.name.startswith("migd-")]


# --- reading what a save wrote, and QMP errors ----------------------------------------------


def parse_save(path: Path | str, offset: int = 0) -> Any:
    """format.parse_stream of a save file on disk."""
    from migd.migration.mapped_ram import format

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return format.parse_stream(lambda at, n: os.pread(f.fileno(), n, at), offset, size)


def is_complete_save(path: Path | str, offset: int = 0) -> bool:
    """Could a reader take this file for a complete save?"""
    from migd.migration.mapped_ram import format

    try:
        return bool(parse_save(path, offset).complete)
    except format.FormatError:
        return False


def read_bitmap(path: Path | str, block: Any) -> Any:
    from migd.migration.mapped_ram import format

    with open(path, "rb") as f:
        data = os.pread(f.fileno(), block.bitmap_size, block.bitmap_offset)
    return format.decode_bitmap(data, block.pages)


def read_pages(path: Path | str, block: Any) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), block.length, block.pages_offset)


async def qmp_error(client: Any, command: str, arguments: dict[str, Any] | None = None) -> str:
    """Run a command that must fail; return QEMU's error text."""
    from qemu.qmp import ExecuteError

    with pytest.raises(ExecuteError) as info:
        await client.execute(command, arguments)
    return info.value.error.error.desc


@pytest.fixture
def setup(short_dir: Path, shm: Path, daemon: DaemonProcess) -> dict[str, Path]:
    """The files of a whole-VM test (tests/test_vm*.py): its directory, the guest's RAM
    file on tmpfs and the image path; the daemon started."""
    return {"dir": short_dir, "ram": shm / "guest-ram", "image": short_dir / "vm.img"}
