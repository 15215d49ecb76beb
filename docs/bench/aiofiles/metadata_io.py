"""Issue 14's aiofiles question, measured: the main channel's metadata I/O of a save
(head, one bitmap per block, end section) done the way migd does it (one worker-thread
call that pwrites the pieces in order) against aiofiles (a file object over the main fd,
seek + write per piece, each an executor hop). Page data and syncs are the same either
way and left out, so what is printed is the whole difference.

Run: .venv/bin/python docs/bench/aiofiles/metadata_io.py [DIR]  (default /tmp)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time

import aiofiles
import uvloop

HEAD = 4096
BLOCKS = 64  # bitmaps: one per RAM block; a large VM has a few dozen
BITMAP = 32 * 1024  # 1 GiB block -> 262144 pages -> 32 KiB bitmap
END = 8192
REPS = 200


def pieces() -> list[tuple[int, bytes]]:
    out = [(0, os.urandom(HEAD))]
    at = 1 << 20
    for _ in range(BLOCKS):
        out.append((at, os.urandom(BITMAP)))
        at += 1 << 20
    out.append((at, os.urandom(END)))
    return out


def pwrite_all(fd: int, writes: list[tuple[int, bytes]]) -> None:
    for at, data in writes:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, at)
            view, at = view[n:], at + n


async def with_to_thread(fd: int, writes: list[tuple[int, bytes]]) -> None:
    await asyncio.to_thread(pwrite_all, fd, writes)


async def with_aiofiles(fd: int, writes: list[tuple[int, bytes]]) -> None:
    async with aiofiles.open(fd, "r+b", buffering=0, closefd=False) as f:
        for at, data in writes:
            await f.seek(at)
            view = memoryview(data)
            while view:
                n = await f.write(view)
                view = view[n:]


async def measure(fd: int) -> dict[str, float]:
    writes = pieces()
    times: dict[str, list[float]] = {"to_thread": [], "aiofiles": []}
    for _ in range(REPS):
        for name, fn in (("to_thread", with_to_thread), ("aiofiles", with_aiofiles)):
            t0 = time.perf_counter()
            await fn(fd, writes)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    where = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
    with tempfile.NamedTemporaryFile(dir=where) as tmp:
        result = uvloop.run(measure(tmp.fileno()))
    base = result["to_thread"]
    print(f"metadata of a save with {BLOCKS} blocks ({BLOCKS * BITMAP // 1024} KiB of bitmaps), "
          f"median of {REPS}:")
    for name, ms in result.items():
        print(f"  {name:10s} {ms:7.3f} ms  x{ms / base:.2f}")


if __name__ == "__main__":
    main()
