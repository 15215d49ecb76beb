"""Cache-aware restore (x-read-cached): with direct-io, the runs the page cache holds are
read through the buffered main fd, the rest through the O_DIRECT channel fds.

Observed on the syscalls: the restoring daemon runs under `strace -ff` (one log per
thread, so no call is split), and every preadv of page data is attributed to the fd it
used: the main fd (the one the file's head was read through: opened without O_DIRECT)
or a channel fd (O_DIRECT with direct-io, test_direct_io_opens_every_channel_with_o_direct).
The save file lives on the disk's filesystem, where posix_fadvise DONTNEED really drops
its pages (never a global drop_caches), and a chosen part is read back in and pinned
there (mmap + mlock) for the restore, so that memory pressure from other work cannot
evict what a test calls cached. Every restore is compared byte for byte.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from migd.io import residency
from migd.io.residency import PageCacheProbe
from migd.pages import PAGE_SIZE, READ_CHUNK_PAGES

from .conftest import (
    DaemonProcess,
    RawClient,
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    parse_save,
    wait_for_socket,
    wait_job_concluded,
    wait_migration,
)

MiB = 1 << 20
SIZE = 8 * MiB
ENOSYS_EXEC = Path(__file__).with_name("enosys_exec.py")
# `preadv2(FD, [{iov_base=..., iov_len=N}], 1, OFFSET, 0) = RESULT` in a per-thread log
# (os.preadv is preadv2 with no flags under glibc; preadv without them).
# strace -y prints each fd with its path: preadv(5</tmp/x/save.img>, [...], 1, 4096) = 4096
_PREADV = re.compile(r"^preadv2?\((\d+)<([^>]*)>, \[.*\], \d+, (\d+)(?:, 0)?\)\s*= (\d+)$")
_FADVISE = re.compile(r"^fadvise64\((\d+)<([^>]*)>, 0, 0, POSIX_FADV_RANDOM\)\s*= 0$")


def _strace() -> str:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install -y strace)")
    return strace


@dataclass
class Traced:
    daemon: DaemonProcess  # strace, with the daemon its child
    logs: Path  # strace -ff writes logs/t.TID per thread

    def stop(self) -> None:
        """SIGTERM to the daemon, then strace ends with it."""
        proc = self.daemon.proc
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            for pid in f.read().split():
                os.kill(int(pid), signal.SIGTERM)
        proc.wait(30)

    def preadvs(self, path: Path) -> list[tuple[int, int, int]]:
        """(fd, offset, bytes) of every preadv of `path` the daemon made so far (not those
        of the memory files, which the checksums read)."""
        calls = []
        real = os.path.realpath(path)
        for log in self.logs.iterdir():
            for line in log.read_text(errors="replace").splitlines():
                if (m := _PREADV.match(line)) and m[2] == real:
                    calls.append((int(m[1]), int(m[3]), int(m[4])))
        return calls

    def no_readahead(self, path: Path) -> list[int]:
        """The fds of `path` on which the daemon turned readahead off (FADV_RANDOM)."""
        real = os.path.realpath(path)
        return [
            int(m[1])
            for log in self.logs.iterdir()
            for line in log.read_text(errors="replace").splitlines()
            if (m := _FADVISE.match(line)) and m[2] == real
        ]

    def sample(self) -> str:
        """Some lines of the logs, for a failure's message."""
        lines = [
            line
            for log in self.logs.iterdir()
            for line in log.read_text().splitlines()
            if "0x1c3" not in line
        ]
        return "\n".join(lines[:20])

    def traced(self, name: str) -> int:
        """How many calls of syscall `name` the daemon made so far."""
        count = 0
        for log in self.logs.iterdir():
            count += sum(line.startswith(f"{name}(") for line in log.read_text().splitlines())
        return count


def start_traced(short_dir: Path, refuse_cachestat: bool = False) -> Traced:
    logs = short_dir / "strace"
    logs.mkdir()
    sock = short_dir / "traced.sock"
    wrap = [sys.executable, str(ENOSYS_EXEC), str(residency.CACHESTAT_NR)]
    proc = subprocess.Popen(
        [
            _strace(), "-ff", "-qq", "-y", "-s", "0",
            "-e", "trace=preadv,preadv2,mincore,fadvise64",
            "-e", "signal=none", "-o", str(logs / "t"),
            *(wrap if refuse_cachestat else []),
            sys.executable, "-m", "migd", "serve", "--socket", str(sock),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for_socket(sock, proc, 30)
    return Traced(DaemonProcess(sock, proc), logs)


@pytest.fixture
def saved(short_dir: Path, shm: Path) -> Iterator[tuple[Path, Path, bytes]]:
    """(save file, backend file, its data): 8 MiB of random memory saved without
    direct-io by a daemon of its own (so its pages are in the page cache), then the
    backend's memory cleared."""
    backend, path = shm / "vm0", short_dir / "vm0.sav"
    data = fill_random(backend, SIZE, seed=7)
    saver = start_daemon_plain(short_dir / "saver.sock")
    try:
        client = RawClient(saver.socket_path).negotiate()
        for name, arguments in _setup(backend, direct_io=False):
            client.ok(name, arguments)
        client.ok("migrate", {"uri": f"file:{path}"})
        assert client.wait_final()["status"] == "completed"
        client.close()
    finally:
        saver.stop()
    backend.write_bytes(bytes(SIZE))
    yield path, backend, data


def start_daemon_plain(sock: Path) -> DaemonProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", "migd", "serve", "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for_socket(sock, proc, 30)
    return DaemonProcess(sock, proc)


def _setup(backend: Path, direct_io: bool) -> list[tuple[str, dict]]:
    caps = [{"capability": name, "state": True} for name in ("mapped-ram", "multifd", "events")]
    return [
        ("migrate-set-capabilities", {"capabilities": caps}),
        ("migrate-set-parameters", {"multifd-channels": 2, "direct-io": direct_io}),
        (
            "object-add",
            {"qom-type": "memory-backend-file", "id": "vm0", "size": SIZE,
             "mem-path": str(backend), "share": True},
        ),
    ]  # fmt: skip


def drop_cache(path: Path) -> None:
    """Drop the file's pages from the page cache (this file's only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # DONTNEED leaves dirty pages
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert PageCacheProbe().cached_pages(fd, 0, os.fstat(fd).st_size) == 0, (
            f"{path}: the page cache kept pages after DONTNEED"
        )
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_libc.mmap.restype = ctypes.c_void_p
_libc.mlock.argtypes = _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@contextlib.contextmanager
def pinned(path: Path, offset: int, length: int) -> Iterator[None]:
    """[offset, offset + length) of the file read into the page cache and kept there
    (mlock of a shared mapping of it) until the block ends."""
    fd = os.open(path, os.O_RDONLY)
    try:
        at = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
        assert at not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            # No read-around: the fault of each page would read up to read_ahead_kb of its
            # neighbours into the page cache too.
            assert _libc.madvise(at, length, mmap.MADV_RANDOM) == 0
            assert _libc.mlock(at, length) == 0, os.strerror(ctypes.get_errno())
            yield  # munmap unlocks
        finally:
            _libc.munmap(at, length)
    finally:
        os.close(fd)


def pages_of(path: Path) -> tuple[int, int]:
    """(offset, length) of the save's page data (its one block)."""
    return parse_save(path).blocks[0].pages_offset, SIZE


def restore_traced(
    traced: Traced,
    path: Path,
    backend: Path,
    data: bytes,
    arguments: dict | None = None,
    job: bool = False,
) -> tuple[list[int], list[int]]:
    """Restore `path` with direct-io in the traced daemon -> (offsets of the page reads
    through the buffered main fd, offsets of those through the O_DIRECT channel fds)."""
    client = RawClient(traced.daemon.socket_path).negotiate()
    for name, args in _setup(backend, direct_io=True):
        client.ok(name, args)
    if job:
        client.ok("memory-restore", {"job-id": "r", "uri": f"file:{path}", **(arguments or {})})
        job_info = wait_job_concluded(client, "r")
        assert "error" not in job_info, job_info
    else:
        client.ok("migrate-incoming", {"uri": f"file:{path}", **(arguments or {})})
        info = client.wait_final()
        assert info["status"] == "completed", info
    client.close()
    assert backend.read_bytes() == data
    block = parse_save(path).blocks[0]
    pages = range(block.pages_offset, block.pages_offset + SIZE)
    calls = traced.preadvs(path)
    heads = [fd for fd, offset, _ in calls if offset == 0]
    assert heads, f"no read of the head among {len(calls)} preadv: {traced.sample()}"
    main_fd = heads[0]  # the head is read through the main fd
    buffered, direct = [], []
    for fd, offset, got in calls:
        if offset in pages:
            (buffered if fd == main_fd else direct).append(offset - block.pages_offset)
            assert got > 0
    assert sum(got for _, offset, got in calls if offset in pages) == SIZE
    return buffered, direct


@pytest.fixture
def traced(short_dir: Path) -> Iterator[Traced]:
    t = start_traced(short_dir)
    yield t
    t.stop()


def test_a_cached_file_is_read_buffered_with_direct_io(traced, saved):
    path, backend, data = saved
    with pinned(path, *pages_of(path)):
        buffered, direct = restore_traced(traced, path, backend, data)
    assert direct == [] and len(buffered) > 0


def test_a_memory_restore_job_reads_a_cached_file_buffered(traced, saved):
    path, backend, data = saved
    with pinned(path, *pages_of(path)):
        buffered, direct = restore_traced(traced, path, backend, data, job=True)
    assert direct == [] and len(buffered) > 0


def test_never_reads_a_cached_file_with_o_direct(traced, saved):
    path, backend, data = saved
    with pinned(path, *pages_of(path)):
        buffered, direct = restore_traced(traced, path, backend, data, {"x-read-cached": "never"})
    assert buffered == [] and len(direct) > 0


def test_an_uncached_file_is_read_with_o_direct(traced, saved):
    path, backend, data = saved
    drop_cache(path)
    buffered, direct = restore_traced(traced, path, backend, data)
    assert buffered == [] and len(direct) > 0


def _mixed(traced: Traced, saved: tuple[Path, Path, bytes]) -> tuple[list[int], list[int]]:
    """Only the second half of the pages cached: each half read through its own fd."""
    path, backend, data = saved
    start, _ = pages_of(path)
    drop_cache(path)
    with pinned(path, start + SIZE // 2, SIZE // 2):
        buffered, direct = restore_traced(traced, path, backend, data)
    assert buffered and all(offset >= SIZE // 2 for offset in buffered), buffered
    assert direct and all(offset < SIZE // 2 for offset in direct), direct
    return buffered, direct


def test_a_half_cached_file_reads_each_half_through_the_right_fd(traced, saved):
    _mixed(traced, saved)
    assert traced.traced("mincore") == 0  # cachestat measured it


def test_the_buffered_fd_reads_no_further_than_asked(traced, saved):
    """Readahead is off on the buffered fd. With it (8 MiB on this disk), a run read
    buffered pulls the runs after it into the cache, they then look cached and are read
    buffered too, and so on: restoring a 2 GiB file of which half a MiB was cached read
    all of it through the page cache, at a third of the O_DIRECT speed (the daemon's log
    said 2147483648 of 2147483648 bytes read from the page cache)."""
    path, backend, data = saved
    start, _ = pages_of(path)
    run = READ_CHUNK_PAGES * PAGE_SIZE  # a restore's run: the first one is mostly cached
    drop_cache(path)
    with pinned(path, start, run * 3 // 4):
        buffered, _ = restore_traced(traced, path, backend, data)
    main_fds = {fd for fd, offset, _ in traced.preadvs(path) if offset == 0}
    assert main_fds and set(traced.no_readahead(path)) == main_fds
    assert buffered and all(offset < run for offset in buffered), buffered


def test_without_cachestat_mincore_measures_the_same(short_dir, saved):
    traced = start_traced(short_dir, refuse_cachestat=True)
    try:
        _mixed(traced, saved)
        assert traced.traced("mincore") > 0
    finally:
        traced.stop()


def test_a_bad_x_read_cached_is_refused(traced):
    client = RawClient(traced.daemon.socket_path).negotiate()
    arguments = {"uri": "file:/nonexistent", "x-read-cached": "always"}
    reply = client.execute("migrate-incoming", arguments)
    assert reply["error"]["desc"] == "Parameter 'x-read-cached' does not accept value 'always'"
    client.close()


# --- the probe itself, on real files -------------------------------------------------------


@pytest.mark.parametrize("use_cachestat", [True, False], ids=["cachestat", "mincore"])
def test_the_probe_counts_the_cached_pages_of_a_range(short_dir, use_cachestat):
    path = short_dir / "f"
    fill_random(path, 4 * MiB)
    drop_cache(path)
    probe = PageCacheProbe(use_cachestat)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pinned(path, MiB, MiB):
            counts = [probe.cached_pages(fd, at, MiB) for at in range(0, 4 * MiB, MiB)]
            cached = [probe.mostly_cached(fd, at, MiB) for at in (0, MiB)]
        assert probe.use_cachestat is use_cachestat
        assert counts[0] == 0 and counts[1] == MiB // mmap.PAGESIZE, counts
        assert cached == [False, True]
        # A range past the end of the file (a file cut short) reads as not cached.
        assert probe.cached_pages(fd, 8 * MiB, MiB) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("use_cachestat", [True, False], ids=["cachestat", "mincore"])
def test_on_ramfs_every_page_is_cached(ramfs, use_cachestat):
    path = ramfs / "f"
    fill_random(path, 2 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert PageCacheProbe(use_cachestat).cached_pages(fd, 0, 2 * MiB) == 2 * MiB // 4096
    finally:
        os.close(fd)


def test_a_kernel_without_cachestat_falls_back_to_mincore(short_dir, monkeypatch):
    # A syscall number no kernel has: the real kernel answers ENOSYS.
    monkeypatch.setattr(residency, "CACHESTAT_NR", 1023)
    path = short_dir / "f"
    fill_random(path, MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        probe = PageCacheProbe()
        assert probe.use_cachestat
        assert probe.cached_pages(fd, 0, MiB) == MiB // 4096  # just written
        assert not probe.use_cachestat  # and for good
    finally:
        os.close(fd)


async def test_ramfs_refuses_direct_io_with_auto_too(qmp, shm, ramfs):
    """A filesystem without O_DIRECT fails the restore as before, whatever x-read-cached."""
    data = fill_random(shm / "m", 2 * MiB)
    await add_file_backend(qmp, "m", shm / "m", 2 * MiB)
    await enable_mapped_ram(qmp)
    await qmp.execute("migrate", {"uri": f"file:{ramfs}/s.sav"})
    assert (await wait_migration(qmp))["status"] == "completed"
    await enable_mapped_ram(qmp, direct_io=True)
    await qmp.execute("migrate-incoming", {"uri": f"file:{ramfs}/s.sav", "x-read-cached": "auto"})
    info = await wait_migration(qmp)
    assert info["status"] == "failed"
    assert info["error-desc"].startswith(
        f"Could not open '{ramfs}/s.sav': filesystem does not support O_DIRECT"
    ), info
    assert (shm / "m").read_bytes() == data
