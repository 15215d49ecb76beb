"""Faults during a migration: the job fails clearly, nothing leaks, the daemon keeps serving.

Each test also checks that no file left behind can be taken for a complete save.
Disk full, O_DIRECT refusal, cancel and corrupt files are in test_save_errors.py and
test_restore.py; these are the faults that need a filesystem failing with EIO (FUSE, see
below), a file changing under a restore, a client going away, or the daemon dying.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import errno
import fcntl
import gc
import hashlib
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from migd.app.daemon import DEFAULT_EXECUTOR_THREADS
from migd.io.blocking import UID_WORKER_THREADS
from migd.migration.mapped_ram import format

from .conftest import (
    RawClient,
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    migd_threads,
    open_fds,
    poll_until,
    reached,
    save,
    start_daemon,
    wait_job_concluded,
    wait_migration,
)
from .test_serving import LogWatcher

MiB = 1 << 20
PAGE = 4096
POLL = 0.005


def is_complete(path: Path, offset: int = 0) -> bool:
    """True only if a reader would take the file for a complete save."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return format.parse_stream(
                lambda at, n: os.pread(f.fileno(), n, at), offset, size
            ).complete
    except (format.FormatError, OSError):
        return False


def inspect_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migd", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout}s: {what}")
        await asyncio.sleep(POLL)


async def wait_progress(client, pages: int, timeout: float = 10.0) -> dict:
    """Poll query-migrate until at least `pages` pages went through the channels."""
    deadline = time.monotonic() + timeout
    while True:
        info = await client.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            raise AssertionError(f"migration ended before the fault was injected: {info}")
        if info.get("status") == "active" and info["ram"]["normal"] >= pages:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"no progress to {pages} pages within {timeout}s: {info}")
        await asyncio.sleep(POLL)


# --- a filesystem that fails with EIO on command -------------------------------------------
#
# Why FUSE and not a failing block device: this kernel has no device-mapper (CONFIG_MD is
# off, no /dev/mapper/control, no modules), and the other block-level way to get EIO under
# ext4 (shrinking a mounted loop device with `losetup -c`) hit a kernel BUG in ext4's
# mballoc on writeback errors here (6.18: oops, tasks stuck in D state, sync(2) hanging
# machine-wide). A FUSE filesystem returns a real EIO to migd's syscalls, exactly where
# and when the test says, and its error paths cannot take the kernel down.

_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ..
_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # struct fuse_attr
_ENTRY = struct.Struct("<QQQQII")  # nodeid, generation, entry/attr validity
_ATTR_OUT = struct.Struct("<QII")
_OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
_INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
_IO_IN = struct.Struct("<QQIIQII")  # fuse_read_in / fuse_write_in: fh, offset, size, ...
_SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
_KSTATFS = struct.Struct("<QQQQQIIII24x")
F_LOOKUP, F_FORGET, F_GETATTR, F_SETATTR, F_UNLINK = 1, 2, 3, 4, 10
F_OPEN, F_READ, F_WRITE, F_STATFS, F_RELEASE, F_FSYNC = 14, 15, 16, 17, 18, 20
F_FLUSH, F_INIT, F_OPENDIR, F_READDIR, F_RELEASEDIR = 25, 26, 27, 28, 29
F_ACCESS, F_CREATE, F_INTERRUPT, F_DESTROY, F_BATCH_FORGET = 34, 35, 36, 38, 42
_NO_REPLY = {F_FORGET, F_BATCH_FORGET, F_INTERRUPT}
_FATTR_SIZE = 1 << 3
_FUSE_BIG_WRITES = 1 << 5
_MAX_WRITE = 128 << 10
_ROOT = 1


class _Errno(Exception):
    def __init__(self, err: int) -> None:
        self.err = err


class FaultFS:
    """A flat passthrough FUSE filesystem in pure Python (no libfuse) that fails on command.

    Files live in `backing`; `mountpoint` shows them. Faults: `fail_writes_after` (bytes
    of WRITE accepted, then every WRITE fails with EIO), `fail_write_range` (a WRITE that
    touches [start, end) fails with EIO), `fail_fsync` (every fsync/fdatasync fails).
    """

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing, self.mountpoint = backing, mountpoint
        self.fail_writes_after: int | None = None
        self.fail_write_range: tuple[int, int] | None = None
        self.fail_fsync = False
        self.written = self.failures = 0
        self.error: BaseException | None = None  # a bug in this server, reported by stop()
        self._names: dict[str, int] = {}
        self._paths: dict[int, str] = {}
        self._fhs: dict[int, int] = {}
        self._next_node, self._next_fh = 2, 1
        self._fd = -1
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        libc = ctypes.CDLL(None, use_errno=True)
        opts = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0".encode()
        if libc.mount(b"migd-faultfs", str(self.mountpoint).encode(), b"fuse", 0, opts) != 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, os.strerror(err))
        self._thread = threading.Thread(target=self._serve, name="faultfs", daemon=True)
        self._thread.start()
        os.stat(self.mountpoint)  # returns once INIT is answered

    def stop(self) -> None:
        _run("umount", "-l", str(self.mountpoint))
        if self._thread is not None:
            self._thread.join(10)
        for fd in [*self._fhs.values(), self._fd]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fhs.clear()
        if self.error is not None:
            raise self.error

    def _serve(self) -> None:
        while True:
            try:
                req = os.read(self._fd, _MAX_WRITE + 4096)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue
                return  # ENODEV: unmounted
            opcode, unique, node = _IN_HEADER.unpack_from(req)[1:4]
            try:
                out, err = self._handle(opcode, node, memoryview(req)[_IN_HEADER.size :]), 0
            except _Errno as exc:
                out, err = b"", -exc.err
            except OSError as exc:
                out, err = b"", -(exc.errno or errno.EIO)
            except Exception as exc:  # a bug here must not hang the mount's users
                self.error = self.error or exc
                out, err = b"", -errno.EIO
            if opcode in _NO_REPLY:
                continue
            reply = _OUT_HEADER.pack(_OUT_HEADER.size + len(out), err, unique) + out
            with contextlib.suppress(OSError):  # ENOENT: the caller was interrupted
                os.write(self._fd, reply)
            if opcode == F_DESTROY:
                return

    def _attr(self, node: int) -> bytes:
        if node == _ROOT:
            mode, size, blocks, nlink, t = stat.S_IFDIR | 0o755, 4096, 8, 2, 0
        else:
            if node not in self._paths:
                raise _Errno(errno.ENOENT)
            st = os.stat(self._paths[node])
            mode, size, blocks, nlink, t = stat.S_IFREG | 0o600, st.st_size, st.st_blocks, 1, 0
            t = int(st.st_mtime)
        return _ATTR.pack(node, size, blocks, t, t, t, 0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0)

    def _entry(self, node: int) -> bytes:
        return _ENTRY.pack(node, 0, 0, 0, 0, 0) + self._attr(node)  # nothing cached

    def _node(self, name: str) -> int:
        if name not in self._names:
            self._names[name] = self._next_node
            self._paths[self._next_node] = str(self.backing / name)
            self._next_node += 1
        return self._names[name]

    def _open(self, node: int) -> bytes:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        self._fhs[fh] = os.open(self._paths[node], os.O_RDWR | os.O_CLOEXEC)
        return _OPEN_OUT.pack(fh, 0, 0)

    def _write(self, body: memoryview) -> bytes:
        fh, offset, size = _IO_IN.unpack_from(body)[:3]
        after, span = self.fail_writes_after, self.fail_write_range
        if (after is not None and self.written >= after) or (
            span is not None and offset < span[1] and offset + size > span[0]
        ):
            self.failures += 1
            raise _Errno(errno.EIO)
        done = os.pwrite(self._fhs[fh], body[_IO_IN.size : _IO_IN.size + size], offset)
        self.written += done
        return struct.pack("<II", done, 0)

    def _readdir(self, body: memoryview) -> bytes:
        offset, size = _IO_IN.unpack_from(body)[1:3]
        entries = [(".", _ROOT, stat.S_IFDIR), ("..", _ROOT, stat.S_IFDIR)]
        entries += [(n, self._node(n), stat.S_IFREG) for n in sorted(os.listdir(self.backing))]
        out = b""
        for index in range(offset, len(entries)):
            name, ino, kind = entries[index]
            raw = name.encode("utf-8", "surrogateescape")
            entry = struct.pack("<QQII", ino, index + 1, len(raw), kind >> 12) + raw
            entry += b"\0" * (-len(entry) % 8)
            if len(out) + len(entry) > size:
                break
            out += entry
        return out

    def _handle(self, op: int, node: int, body: memoryview) -> bytes:
        name = bytes(body).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if op == F_INIT:
            readahead = struct.unpack_from("<III", body)[2]
            flags = _FUSE_BIG_WRITES
            return _INIT_OUT.pack(7, 31, readahead, flags, 16, 12, _MAX_WRITE, 1, 32, 0, 0, 0, 0)
        if op == F_LOOKUP:
            if not os.path.exists(self.backing / name):
                raise _Errno(errno.ENOENT)
            return self._entry(self._node(name))
        if op == F_GETATTR:
            return _ATTR_OUT.pack(0, 0, 0) + self._attr(node)
        if op == F_SETATTR:
            fields = _SETATTR_IN.unpack_from(body)
            if fields[0] & _FATTR_SIZE:
                os.truncate(self._paths[node], fields[3])
            return _ATTR_OUT.pack(0, 0, 0) + self._attr(node)
        if op == F_CREATE:
            name = bytes(body[16:]).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            node = self._node(name)
            os.close(os.open(self._paths[node], os.O_RDWR | os.O_CREAT, 0o600))
            return self._entry(node) + self._open(node)
        if op in (F_OPEN, F_OPENDIR):
            return self._open(node) if op == F_OPEN else _OPEN_OUT.pack(0, 0, 0)
        if op == F_READ:
            fh, offset, size = _IO_IN.unpack_from(body)[:3]
            return os.pread(self._fhs[fh], size, offset)
        if op == F_WRITE:
            return self._write(body)
        if op == F_FSYNC:
            if self.fail_fsync:
                self.failures += 1
                raise _Errno(errno.EIO)
            return b""
        if op == F_RELEASE:
            with contextlib.suppress(KeyError, OSError):
                os.close(self._fhs.pop(struct.unpack_from("<Q", body)[0]))
            return b""
        if op == F_UNLINK:
            os.unlink(self.backing / name)
            self._paths.pop(self._names.pop(name, 0), None)
            return b""
        if op == F_READDIR:
            return self._readdir(body)
        if op == F_STATFS:
            s = os.statvfs(self.backing)
            return _KSTATFS.pack(
                s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, 255,
                s.f_frsize, 0,
            )  # fmt: skip
        if op in (F_FLUSH, F_ACCESS, F_RELEASEDIR, F_DESTROY):
            return b""
        raise _Errno(errno.ENOSYS)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


FS = TypeVar("FS", bound="FaultFS")


def mounted_fuse(short_dir: Path, name: str, make: Callable[[Path, Path], FS]) -> Iterator[FS]:
    """A FaultFS (or subclass), make(backing, mountpoint), mounted at short_dir/name for a
    fixture's duration; the test is skipped where FUSE cannot be mounted."""
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root to mount a FUSE filesystem")
    (short_dir / "backing").mkdir()
    (short_dir / name).mkdir()
    fs = make(short_dir / "backing", short_dir / name)
    try:
        fs.start()
    except OSError as exc:
        pytest.skip(f"cannot mount a FUSE filesystem here: {exc}")
    yield fs
    fs.stop()


@pytest.fixture
def faultfs(short_dir: Path) -> Iterator[FaultFS]:
    yield from mounted_fuse(short_dir, "faulty", FaultFS)


def snapshot_fds() -> set[str]:
    """open_fds() once garbage left by earlier tests is gone: each test counts its own."""
    gc.collect()
    return open_fds()


async def settled_fds(expected: set[str], timeout: float = 5.0) -> set[str]:
    """open_fds(), given a moment to reach `expected`: FUSE releases files asynchronously."""
    with contextlib.suppress(TimeoutError):
        await wait_until(lambda: open_fds() == expected, timeout)
    return open_fds()


SIZE = 32 * MiB
LAYOUT = format.plan_save([("ram0", SIZE)])
BITMAP_AT = LAYOUT.blocks[0].bitmap_offset
FAULTS = {
    # name: (how to break the filesystem, the verb of the error, direct-io)
    "page-write-direct": (lambda fs: setattr(fs, "fail_writes_after", 4 * MiB), "write", True),
    "page-write-buffered": (lambda fs: setattr(fs, "fail_writes_after", 4 * MiB), "write", False),
    "page-sync": (lambda fs: setattr(fs, "fail_fsync", True), "sync", True),
    "bitmap-write": (
        lambda fs: setattr(fs, "fail_write_range", (BITMAP_AT, BITMAP_AT + 1)),
        "write",
        True,
    ),
    "end-section-write": (
        lambda fs: setattr(fs, "fail_write_range", (LAYOUT.end_offset, LAYOUT.end_offset + 1)),
        "write",
        True,
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_io_error_during_a_save_fails_it_clearly_and_leaves_no_complete_file(
    qmp, shm, short_dir, faultfs, fault
):
    breaks, verb, direct_io = FAULTS[fault]
    data = fill_random(shm / "ram0", SIZE)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE)
    await enable_mapped_ram(qmp, channels=2, direct_io=direct_io)
    fds_before, target = snapshot_fds(), faultfs.mountpoint / "save.img"
    breaks(faultfs)
    info = await save(qmp, target)

    assert info["status"] == "failed", info
    assert info["error-desc"] == f"Could not {verb} '{target}': Input/output error"
    assert faultfs.failures > 0
    assert await settled_fds(fds_before) == fds_before and migd_threads() == []
    assert not is_complete(target)
    result = inspect_cli(target)
    assert result.returncode == 1, result
    assert "incomplete" in result.stdout.lower(), result

    # the daemon keeps serving: once the filesystem heals, the same save completes
    faultfs.fail_writes_after = faultfs.fail_write_range = None
    faultfs.fail_fsync = False
    assert (await qmp.execute("query-version"))["package"].startswith("migd ")
    info = await save(qmp, target)
    assert info["status"] == "completed", info
    assert is_complete(target)
    assert inspect_cli(target).returncode == 0
    with open(target, "rb") as f:
        assert os.pread(f.fileno(), SIZE, LAYOUT.blocks[0].pages_offset) == data


@pytest.mark.parametrize("fault", ["page-write-direct", "page-sync"])
async def test_object_del_after_a_failed_save_unmaps_the_backend_at_once(
    qmp, shm, short_dir, faultfs, fault
):
    """Guards the bug this test found (fixed with it, in e22c9ed) for a channel write
    error: the ChannelError raised out of _run_channels kept, through its traceback, the
    frame whose `results`/`failures` lists held the exception itself (a cycle), and the
    channel thread's frames with memoryviews of the mapping; object-del's mmap.close()
    then hit BufferError (which MemoryBackend.close suppresses), so the mapping and the
    fd mmap dup'ed stayed until a cyclic GC pass. The GC is off here so that only migd
    itself can release them."""
    fill_random(shm / "ram0", SIZE)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    fds_before = snapshot_fds()
    FAULTS[fault][0](faultfs)
    gc.disable()
    try:
        assert (await save(qmp, faultfs.mountpoint / "save.img"))["status"] == "failed"
        await qmp.execute("object-del", {"id": "ram0"})
        maps = Path("/proc/self/maps").read_text().splitlines()
        mapped = [line for line in maps if str(shm / "ram0") in line]
        still_open = {fd for fd in open_fds() if str(shm / "ram0") in fd}
        assert (mapped, still_open) == ([], set())
        # The filesystem's own handle of save.img goes when the kernel's RELEASE reaches
        # it, after migd's close and asynchronously (before: 2 runs in 6 of a larger
        # suite failed here on that handle); a leak of migd's fd would keep it for ever.
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: not faultfs._fhs, 5.0)
        assert open_fds() < fds_before
    finally:
        gc.enable()


# --- the save file truncated under a running restore ---------------------------------------


def _pages_equal(path: Path, data: bytes) -> int:
    """How many pages of the file at `path` equal the same pages of `data`."""
    have = np.frombuffer(path.read_bytes(), dtype=np.uint8).reshape(-1, PAGE)
    want = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE)
    return int((have == want).all(axis=1).sum())


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct-io", "buffered"])
async def test_file_truncated_under_a_running_restore_fails_clearly_and_leaks_nothing(
    qmp, shm, short_dir, direct_io
):
    size = 48 * MiB
    data = fill_random(shm / "src", size, seed=3)
    await add_file_backend(qmp, "ram0", shm / "src", size)
    await enable_mapped_ram(qmp, channels=2, direct_io=direct_io)
    target = short_dir / "save.img"
    assert (await save(qmp, target))["status"] == "completed"
    await qmp.execute("object-del", {"id": "ram0"})
    fill_random(shm / "dst", size, seed=4)
    await add_file_backend(qmp, "ram0", shm / "dst", size)
    with open(target, "rb") as f:
        block = format.parse_stream(
            lambda at, n: os.pread(f.fileno(), n, at), 0, os.fstat(f.fileno()).st_size
        ).blocks[0]

    saved = target.read_bytes()
    fds_before = snapshot_fds()
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 16 * MiB})
    await qmp.execute("migrate-incoming", {"uri": f"file:{target}"})
    await wait_progress(qmp, pages=2048)  # 8 MiB of pages are in memory
    cut = block.pages_offset + 16 * MiB
    os.truncate(target, cut)
    info = await wait_migration(qmp, timeout=60)

    assert info["status"] == "failed", info
    desc = info["error-desc"]
    assert desc.startswith(f"Could not read '{target}': file ends at offset "), desc
    assert desc.endswith("; memory backends 'ram0' hold partial data"), desc
    assert open_fds() == fds_before and migd_threads() == []
    # The 2048 pages counted before the cut hold the saved bytes (dst held other random
    # data, seed 4: no page of it equals one of the save's by chance).
    assert _pages_equal(shm / "dst", data) >= 2048
    # A restore only reads its file: it is left exactly as cut, head and pages.
    assert target.read_bytes() == saved[:cut]

    # the daemon keeps serving: a whole file restores afterwards
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 0})
    await qmp.execute("object-del", {"id": "ram0"})
    (shm / "src").write_bytes(data)
    await add_file_backend(qmp, "ram0", shm / "src", size)
    assert (await save(qmp, target))["status"] == "completed"
    info = await qmp.execute("migrate-incoming", {"uri": f"file:{target}"})
    assert (await wait_migration(qmp))["status"] == "completed"
    assert (shm / "src").read_bytes() == data


# --- a client that goes away while its migration runs --------------------------------------


class RawAsyncClient:
    """A bare QMP connection that can vanish without saying goodbye."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> RawAsyncClient:
        reader, writer = await asyncio.open_unix_connection(str(path))
        client = cls(reader, writer)
        await client.recv()  # greeting
        assert "return" in await client.execute("qmp_capabilities")
        return client

    async def recv(self) -> dict:
        import json

        line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), 10)
        return json.loads(line)

    def send(self, name: str, arguments: dict | None = None) -> None:
        import json

        msg: dict = {"execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        self.writer.write(json.dumps(msg).encode() + b"\n")

    async def execute(self, name: str, arguments: dict | None = None) -> dict:
        self.send(name, arguments)
        await self.writer.drain()
        while True:
            msg = await self.recv()
            if "event" not in msg:
                return msg

    def vanish(self) -> None:
        """Close the socket at once: no QMP goodbye, unread replies and events dropped."""
        self.writer.transport.abort()


@pytest.mark.parametrize("how", ["clean", "abrupt", "abrupt-with-a-reply-in-flight"])
async def test_client_disconnecting_mid_save_leaves_the_save_running_to_completion(
    migd_inproc, shm, short_dir, how
):
    size = 32 * MiB
    data = fill_random(shm / "ram0", size, seed=5)
    fds_base = snapshot_fds()
    target = short_dir / "save.img"

    first = await RawAsyncClient.connect(migd_inproc.socket_path)
    add = {"qom-type": "memory-backend-file", "id": "ram0", "size": size}
    add["mem-path"] = str(shm / "ram0")
    assert "return" in await first.execute("object-add", add)
    caps = [{"capability": c, "state": True} for c in ("mapped-ram", "multifd", "events")]
    assert "return" in await first.execute("migrate-set-capabilities", {"capabilities": caps})
    params = {"multifd-channels": 2, "direct-io": True, "max-bandwidth": 16 * MiB}
    assert "return" in await first.execute("migrate-set-parameters", params)
    assert "return" in await first.execute("migrate", {"uri": f"file:{target}"})
    await poll_until(
        lambda: first.execute("query-migrate"),
        lambda reply: reached(reply["return"], "active"),
        "the save running",
    )
    if how == "clean":
        first.writer.close()
        await first.writer.wait_closed()
    elif how == "abrupt":
        first.vanish()
    else:
        first.send("query-migrate")
        await first.writer.drain()
        first.vanish()

    second = await migd_inproc.client("second")
    try:
        assert (await second.execute("query-migrate"))["status"] == "active"
        info = await wait_migration(second, timeout=60)
        assert info["status"] == "completed", info
        assert is_complete(target)
        with open(target, "rb") as f:
            block = format.parse_stream(
                lambda at, n: os.pread(f.fileno(), n, at), 0, os.fstat(f.fileno()).st_size
            ).blocks[0]
            assert os.pread(f.fileno(), size, block.pages_offset) == data
        await second.execute("object-del", {"id": "ram0"})
    finally:
        await second.disconnect()
    # both connections' server sides are closed, and so is every fd of the save
    await wait_until(lambda: open_fds() == fds_base, what="fds back to the start")
    assert migd_threads() == []


# --- migd killed in the middle of a save ---------------------------------------------------


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _wait_status(client: RawClient, wanted: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = client.execute("query-migrate")["return"]
        if info.get("status") == wanted:
            return info
        assert time.monotonic() < deadline, f"status {info.get('status')}, not {wanted}"
        time.sleep(POLL)


def test_sigkill_mid_save_leaves_a_file_that_is_inspected_and_refused_as_incomplete(shm, short_dir):
    size = 48 * MiB
    fill_random(shm / "ram0", size, seed=6)
    target = short_dir / "save.img"
    add = {"qom-type": "memory-backend-file", "id": "ram0", "size": size}
    add["mem-path"] = str(shm / "ram0")
    caps = [{"capability": c, "state": True} for c in ("mapped-ram", "multifd")]

    first = start_daemon(short_dir / "a.sock")
    try:
        client = RawClient(first.socket_path).negotiate()
        assert "return" in client.execute("object-add", add)
        assert "return" in client.execute("migrate-set-capabilities", {"capabilities": caps})
        params = {"multifd-channels": 2, "direct-io": True, "max-bandwidth": 16 * MiB}
        assert "return" in client.execute("migrate-set-parameters", params)
        assert "return" in client.execute("migrate", {"uri": f"file:{target}"})
        deadline = time.monotonic() + 10
        while _wait_status(client, "active")["ram"]["normal"] < 1024:
            assert time.monotonic() < deadline
            time.sleep(POLL)
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(10) == -signal.SIGKILL
        client.close()
    finally:
        first.stop(signal.SIGKILL)
        if first.proc.stderr:
            first.proc.stderr.close()

    assert target.stat().st_size > 0  # the head and some pages made it to the file
    assert not is_complete(target)
    result = inspect_cli(target)
    assert result.returncode == 1, result
    assert "incomplete" in result.stdout.lower()

    second = start_daemon(short_dir / "b.sock")
    try:
        client = RawClient(second.socket_path).negotiate()
        assert "return" in client.execute("object-add", add)
        assert "return" in client.execute("migrate-set-capabilities", {"capabilities": caps})
        before, fds = digest(shm / "ram0"), _fd_count(second.pid)
        reply = client.execute("migrate-incoming", {"uri": f"file:{target}"})
        assert reply["error"]["desc"] == (
            f"'{target}': save file is incomplete (no RAM end section: the save was "
            "interrupted or the file is truncated)"
        ), reply
        assert digest(shm / "ram0") == before
        assert client.execute("query-migrate") == {"return": {}}
        assert _fd_count(second.pid) == fds
        assert "return" in client.execute("query-version")
        client.close()
    finally:
        assert second.stop() == 0
        if second.proc.stderr:
            second.proc.stderr.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(short_dir / "a.sock")


class HangFS(FaultFS):
    """FaultFS whose LOOKUP of a name starting with "hung" waits until `release`, as a
    dead NFS server or a stopped FUSE daemon does: every later request on the filesystem
    waits behind it (the server is one thread)."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        super().__init__(backing, mountpoint)
        self.release = threading.Event()

    def _handle(self, op: int, node: int, body: memoryview) -> bytes:
        if op == F_LOOKUP and bytes(body).startswith(b"hung"):
            self.release.wait(60)  # bounded: a failing test must not hang the mount
        return super()._handle(op, node, body)


def _threads_waiting_on_fuse(pid: int) -> int:
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            wchan = (task / "wchan").read_text()
            count += "fuse" in wchan or "request_wait_answer" in wchan
    return count


def wait_fuse_threads(pid: int, count: int) -> None:
    """Until `count` of the daemon's threads wait on a FUSE request (bounded)."""
    deadline = time.monotonic() + 30
    while _threads_waiting_on_fuse(pid) < count:
        assert time.monotonic() < deadline, "the requests did not reach the filesystem"
        time.sleep(0.01)


def stick_object_adds(
    socket_path: Path, fs: FaultFS, count: int, uid: int | None = None
) -> list[RawClient]:
    """`count` clients (of `uid`, else root), each with an object-add sent onto a name
    of HangFS `fs` that it never answers, and not read: they stay in the daemon."""
    stuck = []
    for i in range(count):
        if uid is None:
            client = RawClient(socket_path, timeout=90).negotiate()
        else:
            client = _connect_as(uid, socket_path, timeout=90)
        client.send({"execute": "object-add", "arguments": {
            "qom-type": "memory-backend-file", "id": f"stuck{i}", "size": 1 << 20,
            "mem-path": str(fs.mountpoint / f"hung{i}"), "share": True}})  # fmt: skip
        stuck.append(client)
    return stuck


def send_with_fd(client: RawClient, request: dict, fd: int) -> None:
    """Send `request` with `fd` passed along (SCM_RIGHTS), as a management app does."""
    client.sock.sendmsg(
        [json.dumps(request).encode() + b"\n"],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
    )


def test_requests_stuck_on_a_dead_filesystem_do_not_hold_other_clients(short_dir, shm):
    """A dozen object-adds whose mem-paths are on a filesystem that no longer answers each
    hold a worker thread; another client's object-add and object-del are still answered
    (before: asyncio's default executor had 6 threads on two CPUs, and six such requests
    held every other client's commands that use one)."""
    fs_iter = mounted_fuse(short_dir, "dead", HangFS)
    fs = next(fs_iter)
    daemon = start_daemon(short_dir / "qmp.sock")
    stuck: list[RawClient] = []
    try:
        stuck.extend(stick_object_adds(daemon.socket_path, fs, 12))
        wait_fuse_threads(daemon.pid, len(stuck))

        other = RawClient(daemon.socket_path, timeout=30).negotiate()
        (shm / "ram").write_bytes(b"")
        assert "return" in other.execute("object-add", {
            "qom-type": "memory-backend-file", "id": "ram", "size": 1 << 20,
            "mem-path": str(shm / "ram"), "share": True})  # fmt: skip
        assert "return" in other.execute("object-del", {"id": "ram"})
        other.close()
    finally:
        fs.release.set()
        for client in stuck:
            with contextlib.suppress(OSError):
                client.recv_reply()
            client.close()
        daemon.stop()
        with contextlib.suppress(StopIteration):
            next(fs_iter)


OTHER_UID = 65534  # nobody
THIRD_UID = 1234


def _connect_as(uid: int, path: Path, timeout: float) -> RawClient:
    """A client whose peer credentials are uid's: SO_PEERCRED records them at connect."""
    os.seteuid(uid)
    try:
        return RawClient(path, timeout=timeout).negotiate()
    finally:
        os.seteuid(0)


def test_one_uids_requests_stuck_on_a_dead_filesystem_do_not_hold_other_uids(short_dir, shm):
    """A local user let on the socket (nobody here) who controls a filesystem that stops
    answering (its FUSE mount) sends as many object-adds onto it as the daemon has worker
    threads: at most UID_WORKER_THREADS of them hold a thread, the rest wait their turn,
    and root's and a third uid's object-add and object-del are answered (before: all 64
    threads of the default executor were held, and every other client's command that
    needs one waited as long as the filesystem did)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    fs_iter = mounted_fuse(short_dir, "dead", HangFS)
    fs = next(fs_iter)
    short_dir.chmod(0o711)
    daemon = start_daemon(short_dir / "qmp.sock", "--socket-mode", "0666")
    stuck: list[RawClient] = []
    try:
        stuck.extend(
            stick_object_adds(daemon.socket_path, fs, DEFAULT_EXECUTOR_THREADS, OTHER_UID)
        )
        holding = min(len(stuck), UID_WORKER_THREADS)
        wait_fuse_threads(daemon.pid, holding)

        for uid, name in ((0, "root"), (THIRD_UID, "third")):
            # A bound on "at all": before, these waited as long as the filesystem did.
            other = _connect_as(uid, daemon.socket_path, timeout=30)
            assert "return" in other.execute("object-add", {
                "qom-type": "memory-backend-file", "id": name, "size": 1 << 20,
                "mem-path": str(shm / name), "share": True})  # fmt: skip
            assert "return" in other.execute("object-del", {"id": name})
            other.close()
        # The capped uid's own requests are held, never lost: each is answered in turn.
        assert _threads_waiting_on_fuse(daemon.pid) == holding
        fs.release.set()
        for client in stuck:
            assert "id" not in client.recv_reply()  # answered (an error or a backend)
    finally:
        fs.release.set()
        for client in stuck:
            client.close()
        daemon.stop()
        with contextlib.suppress(StopIteration):
            next(fs_iter)


def _eof_within(fd: int, timeout: float) -> bool:
    """True once the pipe's read end `fd` reads EOF (every write end closed), within
    `timeout` (a bound on "at all")."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready) and os.read(fd, 1) == b""


def test_a_gone_clients_fds_are_closed_while_its_uids_calls_are_stuck(short_dir, shm):
    """A uid's UID_WORKER_THREADS calls are stuck on its dead FUSE mount; a client of
    that uid passes an fd no command takes and goes: the fd is closed at once, in the
    uid's cleanups pool (before: in its calls pool, queued behind the stuck calls, the fd
    stayed open for as long as the filesystem did not answer, and SIGTERM waited for it
    FD_CLOSE_WAIT). The fd is a pipe's write end: its read end reads EOF once closed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    fs_iter = mounted_fuse(short_dir, "dead", HangFS)
    fs = next(fs_iter)
    short_dir.chmod(0o711)
    daemon = start_daemon(short_dir / "qmp.sock", "--socket-mode", "0666")
    log = LogWatcher(daemon.proc)
    clients: list[RawClient] = []
    read_end, write_end = os.pipe()
    try:
        clients.extend(stick_object_adds(daemon.socket_path, fs, UID_WORKER_THREADS, OTHER_UID))
        wait_fuse_threads(daemon.pid, UID_WORKER_THREADS)
        holder = _connect_as(OTHER_UID, daemon.socket_path, timeout=30)
        try:
            send_with_fd(holder, {"execute": "query-version"}, write_end)
        finally:
            os.close(write_end)
        assert "return" in holder.recv_reply()  # the fd is the session's now
        holder.close()
        assert _eof_within(read_end, 30), "the gone client's fd was not closed"
        assert not fs.release.is_set()

        daemon.proc.send_signal(signal.SIGTERM)
        log.wait_for(b"migd stopped", 30)
        assert not log.has(b"closes of fds clients left unused are still waiting")
        fs.release.set()
        assert daemon.proc.wait(30) == 0
    finally:
        os.close(read_end)
        fs.release.set()
        for client in clients:
            client.close()
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        daemon.proc.wait()
        with contextlib.suppress(StopIteration):
            next(fs_iter)


def test_shutdown_goes_on_while_the_close_of_a_clients_unused_fd_waits(short_dir, shm):
    """A client of a capped uid leaves a passed fd unused, of a file on a FUSE mount
    that holds the FLUSH of its close: SIGTERM's step 2 waits FD_CLOSE_WAIT for that
    close, logs it, goes on and leaves the fd to the process's exit (before the wait was
    bounded: the daemon stopped nothing further, its jobs never cancelled)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    fs_iter = mounted_fuse(short_dir, "slow", FlushHoldFS)
    fs = next(fs_iter)
    short_dir.chmod(0o711)
    daemon = start_daemon(short_dir / "qmp.sock", "--socket-mode", "0666")
    log = LogWatcher(daemon.proc)
    fd = -1
    try:
        holder = _connect_as(OTHER_UID, daemon.socket_path, timeout=30)
        fd = os.open(fs.mountpoint / "passed", os.O_RDWR | os.O_CREAT, 0o600)
        send_with_fd(holder, {"execute": "query-version"}, fd)
        assert "return" in holder.recv_reply()  # the fd is the session's now
        fs.armed = True  # from here on, every close's FLUSH waits

        daemon.proc.send_signal(signal.SIGTERM)
        log.wait_for(b"migd stopped", 30)  # a bound on "at all": before, never
        assert log.has(b"1 closes of fds clients left unused are still waiting")
        assert fs.held.is_set() and not fs.release.is_set()
        fs.release.set()
        assert daemon.proc.wait(30) == 0
        holder.close()
    finally:
        fs.release.set()
        if fd >= 0:
            os.close(fd)
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        daemon.proc.wait()
        with contextlib.suppress(StopIteration):
            next(fs_iter)


class HoldFS(FaultFS):
    """FaultFS with a request that, once `armed`, waits in the server until `release`
    (`held` says it is waiting): a FUSE or NFS server that stops answering. Subclasses
    say which request."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        super().__init__(backing, mountpoint)
        self.armed = False
        self.held = threading.Event()
        self.release = threading.Event()

    def hold(self) -> None:
        self.held.set()
        self.release.wait(60)  # bounded: a failing test must not hang the mount


class FlushHoldFS(HoldFS):
    """FaultFS whose FLUSH (sent by every close of an fd of it) waits until `release`
    once `armed`: a close on a FUSE or NFS mount whose server stopped answering."""

    def _handle(self, op: int, node: int, body: memoryview) -> bytes:
        if op == F_FLUSH and self.armed:
            self.hold()
        return super()._handle(op, node, body)


def test_a_save_whose_file_close_waits_does_not_hold_the_daemon(short_dir, shm):
    """The job's closes of its file (its channels' fds once the pages are out, its main
    fd at its end) wait for the filesystem's FLUSH: on the event loop they froze the
    daemon, every client's every command (before: query-version unanswered until the
    filesystem answered); now in a worker thread, and the save completes once it does."""
    fs_iter = mounted_fuse(short_dir, "slow", FlushHoldFS)
    fs = next(fs_iter)
    daemon = start_daemon(short_dir / "qmp.sock")
    try:
        data = fill_random(shm / "ram0", 4 * MiB, seed=7)
        client = RawClient(daemon.socket_path, timeout=90).negotiate()
        client.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram0",
                                 "size": 4 * MiB, "mem-path": str(shm / "ram0")})  # fmt: skip
        caps = [{"capability": c, "state": True} for c in ("mapped-ram", "multifd")]
        client.ok("migrate-set-capabilities", {"capabilities": caps})
        client.ok("migrate-set-parameters", {"multifd-channels": 2})
        target = fs.mountpoint / "save.img"
        fs.armed = True
        client.ok("migrate", {"uri": f"file:{target}"})
        assert fs.held.wait(30), "no close of the save's file reached the filesystem"

        other = RawClient(daemon.socket_path, timeout=30).negotiate()  # bound on "at all"
        assert "return" in other.execute("query-version")
        assert other.ok("query-migrate")["status"] in ("active", "device")
        other.close()

        fs.release.set()
        deadline = time.monotonic() + 60
        while (info := client.ok("query-migrate"))["status"] in ("active", "device"):
            assert time.monotonic() < deadline, info
            time.sleep(0.01)
        assert info["status"] == "completed", info
        layout = format.plan_save([("ram0", 4 * MiB)])
        with open(target, "rb") as f:
            assert os.pread(f.fileno(), 4 * MiB, layout.blocks[0].pages_offset) == data
    finally:
        fs.release.set()
        daemon.stop()
        with contextlib.suppress(StopIteration):
            next(fs_iter)


@pytest.mark.parametrize(
    "arguments",
    [{"fdset-id": -1}, {"opaque": "x" * 1025}],
    ids=["negative-fdset-id", "opaque-too-long"],
)
def test_a_refused_add_fd_of_a_file_whose_close_waits_does_not_hold_the_daemon(
    short_dir, arguments
):
    """add-fd refuses the fd and closes it: a client's file on a FUSE mount of theirs
    that never answers the FLUSH of that close held the event loop (before: no other
    client answered until the filesystem did); now the close is a worker thread's."""
    fs_iter = mounted_fuse(short_dir, "slow", FlushHoldFS)
    fs = next(fs_iter)
    daemon = start_daemon(short_dir / "qmp.sock")
    try:
        client = RawClient(daemon.socket_path, timeout=90).negotiate()
        fd = os.open(fs.mountpoint / "passed", os.O_RDWR | os.O_CREAT, 0o600)
        fs.armed = True
        try:
            send_with_fd(client, {"execute": "add-fd", "arguments": arguments}, fd)
        finally:
            threading.Thread(target=os.close, args=(fd,), daemon=True).start()  # FLUSH too
        assert fs.held.wait(30), "no close of the passed fd reached the filesystem"
        other = RawClient(daemon.socket_path, timeout=30).negotiate()  # bound on "at all"
        assert "return" in other.execute("query-version")
        other.close()
        fs.release.set()
        assert "error" in client.recv_reply()
    finally:
        fs.release.set()
        daemon.stop()
        with contextlib.suppress(StopIteration):
            next(fs_iter)


class GetattrHoldFS(HoldFS):
    """FaultFS whose `hold_at`-th GETATTR of a file (counted from when it is set; an
    fstat of a file here asks the server each time: nothing is cached) waits until
    `release`: a FUSE or NFS server that stops answering in the middle of a job's start."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        super().__init__(backing, mountpoint)
        self.hold_at: int | None = None
        self.getattrs = 0

    def _handle(self, op: int, node: int, body: memoryview) -> bytes:
        if op == F_GETATTR and node != 1 and self.hold_at is not None:
            self.getattrs += 1
            if self.getattrs == self.hold_at:
                self.hold()
        return super()._handle(op, node, body)


@pytest.mark.parametrize("command", ["memory-save", "memory-restore"])
def test_whichever_stat_of_a_jobs_file_waits_the_daemon_answers_others(
    short_dir, shm, command
):
    """Each GETATTR a save (or a restore) of a file on a FUSE mount makes, held in turn
    (the 1st, the 2nd, ... until a job makes no more): meanwhile other clients are
    answered. Before, the start's fstat of its file (the conflict check by device and
    inode) ran on the event loop, and a server that did not answer froze every client;
    each job completes once the filesystem answers."""
    fs_iter = mounted_fuse(short_dir, "slow", GetattrHoldFS)
    fs = next(fs_iter)
    daemon = start_daemon(short_dir / "qmp.sock")
    try:
        fill_random(shm / "ram0", MiB, seed=8)
        client = RawClient(daemon.socket_path, timeout=90).negotiate()
        client.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram0",
                                 "size": MiB, "mem-path": str(shm / "ram0")})  # fmt: skip
        # Bounds on "at all": a frozen daemon answers neither.
        poller = RawClient(daemon.socket_path, timeout=30).negotiate()
        other = RawClient(daemon.socket_path, timeout=30).negotiate()
        saved = fs.mountpoint / "saved.img"
        if command == "memory-restore":
            client.ok("memory-save", {"job-id": "first", "uri": f"file:{saved}"})
            assert "error" not in wait_job_concluded(poller, "first")
        held_at: list[int] = []
        for at in range(1, 100):
            fs.held.clear()
            fs.release.clear()
            fs.getattrs, fs.hold_at = 0, at
            job_id = f"s{at}"
            path = saved if command == "memory-restore" else fs.mountpoint / f"{job_id}.img"
            client.send({"execute": command, "arguments": {
                "job-id": job_id, "uri": f"file:{path}"}})  # fmt: skip
            deadline = time.monotonic() + 30
            while not fs.held.is_set():
                jobs = {j["id"]: j for j in poller.ok("query-jobs")}
                if jobs.get(job_id, {}).get("status") == "concluded":
                    break  # this save made fewer than `at` GETATTRs
                assert time.monotonic() < deadline, jobs
                time.sleep(0.01)
            if fs.held.is_set():
                held_at.append(at)
                assert "return" in other.execute("query-version")
                assert "return" in poller.execute("query-jobs")
            fs.release.set()
            assert client.recv_reply() == {"return": {}}
            job = wait_job_concluded(poller, job_id)
            assert "error" not in job, job
            poller.ok("job-dismiss", {"id": job_id})
            if not held_at or held_at[-1] != at:
                break
        assert len(held_at) >= 2, held_at  # a job stats its file more than once
    finally:
        fs.release.set()
        daemon.stop()
        with contextlib.suppress(StopIteration):
            next(fs_iter)


F_GETLK, F_SETLK, F_SETLKW = 31, 32, 33
_FUSE_POSIX_LOCKS = 1 << 1


class LockHoldFS(HoldFS):
    """FaultFS that handles locks itself (FUSE_POSIX_LOCKS: the kernel then sends it every
    lock request, open-file-description ones too) and, once `armed`, holds a SETLK until
    `release`: a lock server that stops answering, as a hung NFS server's."""

    def _handle(self, op: int, node: int, body: memoryview) -> bytes:
        if op == F_INIT:
            fields = list(_INIT_OUT.unpack(super()._handle(op, node, body)))
            fields[3] |= _FUSE_POSIX_LOCKS
            return _INIT_OUT.pack(*fields)
        if op == F_GETLK:
            return struct.pack("<QQII", 0, 0, fcntl.F_UNLCK, 0)  # nothing in the way
        if op in (F_SETLK, F_SETLKW):
            if self.armed:
                self.hold()
            return b""  # granted: this server keeps no locks
        return super()._handle(op, node, body)


def test_a_memory_files_lock_server_that_stops_answering_does_not_hold_the_daemon(
    short_dir, shm
):
    """A job's hold on its backends' memory files (an OFD lock, which a FUSE server that
    handles locks, or NFS's, is asked for) waits for that server: taken on the event loop
    through the backends' own fds, it froze every client until the server answered; now
    through opens of the job's own in a worker thread, and the save completes after."""
    fs_iter = mounted_fuse(short_dir, "locks", LockHoldFS)
    fs = next(fs_iter)
    daemon = start_daemon(short_dir / "qmp.sock")
    try:
        client = RawClient(daemon.socket_path, timeout=90).negotiate()
        client.ok("object-add", {
            "qom-type": "memory-backend-file", "id": "ram0", "size": MiB,
            "mem-path": str(fs.mountpoint / "ram0"), "share": True})  # fmt: skip
        other = RawClient(daemon.socket_path, timeout=30).negotiate()  # bound on "at all"
        fs.armed = True
        client.send({"execute": "memory-save", "arguments": {
            "job-id": "s", "uri": f"file:{shm / 's.img'}"}})  # fmt: skip
        assert fs.held.wait(30), "the save asked the filesystem for no lock"
        assert "return" in other.execute("query-version")
        fs.release.set()
        assert client.recv_reply() == {"return": {}}
        assert "error" not in wait_job_concluded(other, "s")
    finally:
        fs.release.set()
        daemon.stop()
        with contextlib.suppress(StopIteration):
            next(fs_iter)
