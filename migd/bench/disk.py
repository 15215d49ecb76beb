"""The page cache (drop it, measure it) and the disk's own O_DIRECT speed, by fio or a
built-in loop."""

from __future__ import annotations

import ctypes
import itertools
import json
import mmap
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..fallocate import fallocate
from .common import PY_BLOCK, PY_THREADS, BenchError

# --- the page cache --------------------------------------------------------------------


def syncfs(directory: Path) -> None:
    """Write back the dirty pages of one filesystem: sync(2) would also wait for every other
    filesystem on the machine, some of which (another test's loop device) may never finish."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(directory))
    except AttributeError:  # no syncfs in this libc
        os.sync()
    finally:
        os.close(fd)


def drop_caches(directory: Path, enabled: bool) -> None:
    syncfs(directory)
    if enabled:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    return 0


def file_cached(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[0])


# --- disk baseline ---------------------------------------------------------------------


def direct_pass(path: Path, size: int, buffers: Sequence[mmap.mmap], write: bool) -> float:
    """One thread per buffer, each with its own O_DIRECT fd, taking 4 MiB blocks in turn."""
    flags = (os.O_WRONLY if write else os.O_RDONLY) | os.O_DIRECT | os.O_CLOEXEC
    fds = [os.open(path, flags) for _ in buffers]
    blocks = itertools.count()
    errors: list[BaseException] = []
    io = os.pwritev if write else os.preadv

    def worker(fd: int, buf: mmap.mmap) -> None:
        view = memoryview(buf)
        try:
            while not errors:
                off = next(blocks) * PY_BLOCK
                if off >= size:
                    break
                n, done = min(PY_BLOCK, size - off), 0
                while done < n:
                    moved = io(fd, [view[done:n]], off + done)
                    if moved <= 0:
                        raise BenchError(f"{path}: no progress at offset {off + done}")
                    done += moved
            if write:
                os.fdatasync(fd)
        except BaseException as exc:
            errors.append(exc)
        finally:
            view.release()

    threads = [
        threading.Thread(target=worker, args=(fd, buf), daemon=True)
        for fd, buf in zip(fds, buffers, strict=True)
    ]
    try:
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    finally:
        errors.append(BenchError("stopped"))  # ends any thread still running
        for t in threads:
            t.join()
        for fd in fds:
            os.close(fd)
    if len(errors) > 1:
        raise BenchError(f"O_DIRECT {'write' if write else 'read'} of {path}: {errors[0]}")
    return elapsed


def python_disk(directory: Path, size: int, drop: Callable[[], None]) -> tuple[float, float]:
    """(write, read) seconds of the built-in 4-thread O_DIRECT loop."""
    path = directory / "disk-baseline.bin"
    buffers = [mmap.mmap(-1, PY_BLOCK) for _ in range(PY_THREADS)]
    try:
        for buf in buffers:
            buf.write(os.urandom(PY_BLOCK))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            # Its blocks allocated first, as fio does (fallocate=native, its default), and
            # as migd's direct-io saves do on ext4 (migration/mapped_ram/page_slots.py):
            # O_DIRECT writes into holes go one at a time there (1.3x slower on the fast
            # disk). Where the filesystem has no fallocate the writes allocate.
            fallocate(fd, 0, 0, size)
        finally:
            os.close(fd)
        drop()
        write = direct_pass(path, size, buffers, write=True)
        drop()
        read = direct_pass(path, size, buffers, write=False)
        return write, read
    finally:
        for buf in buffers:
            buf.close()
        path.unlink(missing_ok=True)


def python_read_file(path: Path, size: int, drop: Callable[[], None]) -> float:
    """Seconds for one thread to read the first `size` bytes of `path` with O_DIRECT."""
    buffer = mmap.mmap(-1, PY_BLOCK)
    try:
        drop()
        return direct_pass(path, size, [buffer], write=False)
    finally:
        buffer.close()


def fio_read_file(path: Path, size: int, drop: Callable[[], None]) -> float:
    """Seconds for fio to read the first `size` bytes of an existing file: one job, psync,
    1 MiB blocks, O_DIRECT, the plain sequential read the restore target names."""
    argv = [
        "fio",
        "--name=read-file",
        f"--filename={path}",
        "--direct=1",
        "--rw=read",
        "--ioengine=psync",
        "--numjobs=1",
        "--bs=1M",
        f"--size={size}",
        "--output-format=json",
    ]
    drop()
    return size / run_fio(argv, "read")


def run_fio(argv: Sequence[str], rw: str) -> float:
    out = subprocess.run(list(argv), capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"fio failed ({out.returncode}): {out.stderr.strip() or out.stdout}")
    doc = json.loads(out.stdout[out.stdout.index("{") :])
    return float(doc["jobs"][0][rw]["bw_bytes"])


def fio_disk(
    directory: Path, size: int, name: str, options: Sequence[str], drop: Callable[[], None]
) -> tuple[float, float]:
    """(write, read) seconds for `size` bytes from fio's bandwidth (one file per job)."""
    numjobs = int(next(o for o in options if o.startswith("--numjobs=")).split("=")[1])
    argv = [
        "fio",
        f"--name={name}",
        f"--directory={directory}",
        "--direct=1",
        *options,
        f"--size={size // numjobs}",
        "--group_reporting",
        "--output-format=json",
    ]
    try:
        drop()
        write = run_fio([*argv, "--rw=write", "--end_fsync=1"], "write")
        drop()
        read = run_fio([*argv, "--rw=read"], "read")
        return size / write, size / read
    finally:
        for path in directory.glob(f"{name}.*"):
            path.unlink()
