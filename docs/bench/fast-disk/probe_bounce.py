"""Probe for issue 19: zero-copy page I/O (what migd does) against a bounce buffer.

Both move SIZE bytes between a tmpfs memory file and a save file with 4 threads of
4 MiB O_DIRECT calls, and both hash every MiB with xxh3-128 as migd's checksums do:

* zero-copy: the memory file mmapped, MADV_POPULATE_READ/WRITE per call, O_DIRECT
  pwritev/preadv straight from/into the mapping; the hash reads each MiB back through
  pread of the memory file (migd's MemoryReader), as the mapping is never touched from
  user space.
* bounce: pread of the memory file into a reused 4 MiB buffer, hash it there, O_DIRECT
  pwritev of the buffer (restore: O_DIRECT preadv into the buffer, hash, pwrite into the
  memory file). One copy, no mapping of the memory and no page pinning of it.

Rounds alternate the order. Prints GiB/s and the process's user and system CPU seconds
per GiB (medians). Usage: python probe_bounce.py DIR SIZE_GIB ROUNDS (DIR: the disk).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import xxhash

MiB = 1 << 20
THREADS, CALL = 4, 4 * MiB
MADV_POPULATE_READ, MADV_POPULATE_WRITE = 22, 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def transfer(kind: str, what: str, memory: str, target: str, size: int) -> tuple[float, ...]:
    mem_fd = os.open(memory, os.O_RDWR)
    if what == "save" and os.path.exists(target):
        os.unlink(target)
    flags = os.O_WRONLY | os.O_CREAT if what == "save" else os.O_RDONLY
    fd = os.open(target, flags | os.O_DIRECT, 0o600)
    mapping = mmap.mmap(mem_fd, size) if kind == "zero-copy" else None
    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping)) if mapping else 0
    view = memoryview(mapping) if mapping else None
    offsets = list(range(0, size, CALL))
    lock = threading.Lock()

    def hash_back(offset: int) -> None:
        for at in range(offset, offset + CALL, MiB):
            xxhash.xxh3_128_digest(os.pread(mem_fd, MiB, at))

    def worker() -> None:
        buffer = mmap.mmap(-1, CALL)
        data = memoryview(buffer)
        while True:
            with lock:
                if not offsets:
                    break
                offset = offsets.pop()
            if view is not None:
                part = view[offset : offset + CALL]
                advice = MADV_POPULATE_READ if what == "save" else MADV_POPULATE_WRITE
                _libc.madvise(base + offset, CALL, advice)
                if what == "save":
                    os.pwritev(fd, [part], offset)
                else:
                    os.preadv(fd, [part], offset)
                hash_back(offset)
                part.release()
            else:
                if what == "save":
                    os.preadv(mem_fd, [data], offset)
                else:
                    os.preadv(fd, [data], offset)
                for at in range(0, CALL, MiB):
                    xxhash.xxh3_128_digest(data[at : at + MiB])
                os.pwritev(fd if what == "save" else mem_fd, [data], offset)
        data.release()
        buffer.close()

    user0, sys0 = cpu()
    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    user1, sys1 = cpu()
    if view is not None:
        view.release()
    if mapping is not None:
        mapping.close()
    os.close(fd)
    os.close(mem_fd)
    gib = size / (1 << 30)
    return gib / seconds, (user1 - user0) / gib, (sys1 - sys0) / gib


def main() -> None:
    directory, size, rounds = sys.argv[1], int(float(sys.argv[2]) * (1 << 30)), int(sys.argv[3])
    memory, target = "/dev/shm/probe-bounce-mem", os.path.join(directory, "probe-bounce.sav")
    subprocess.run(["dd", "if=/dev/urandom", f"of={memory}", "bs=1M", f"count={size // MiB}",
                    "status=none"], check=True)  # fmt: skip
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    try:
        for round_ in range(rounds):
            kinds = ["zero-copy", "bounce"][:: 1 if round_ % 2 == 0 else -1]
            for what in ("save", "restore"):
                for kind in kinds:
                    row = transfer(kind, what, memory, target, size)
                    results.setdefault((what, kind), []).append(row)
    finally:
        os.unlink(memory)
        if os.path.exists(target):
            os.unlink(target)
    for (what, kind), rows in sorted(results.items()):
        gibs, user, system = (statistics.median(column) for column in zip(*rows, strict=True))
        print(f"{what:8} {kind:10} {gibs:.2f} GiB/s  user {user:.2f}  system {system:.2f} "
              f"s/GiB  (rounds: {', '.join(f'{r[0]:.2f}' for r in rows)})")  # fmt: skip


if __name__ == "__main__":
    main()
