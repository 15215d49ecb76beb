"""Checking a save's pages against its checksums in the file itself, before (or without)
restoring anything: a restore's `verify-before-write` mode and `migd verify`.

One thread per fd (O_DIRECT fds read at disk speed without filling the page cache) takes
runs of READ_UNITS units from a shared queue, reads their present pages into its own
page-aligned buffer in one call and hashes each unit as io/checksums.py defines (absent
pages are zeros, never hashed from the file).
The first mismatch stops every thread and is raised: ChecksumMismatch naming the file,
the block and the offset.
"""

from __future__ import annotations

import concurrent.futures
import mmap
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..pages import PAGE_SIZE
from .checksums import (
    DIGEST_BYTES,
    UNIT_BYTES,
    UNIT_PAGES,
    ChecksumMismatch,
    mismatch_text,
    unit_count,
    unit_digest,
)
from .threads import WORKERS, read_fully

# Units read per call: 8 MiB, as large as the channels' reads, so that a thread per fd
# keeps the disk busy (one unit per call left restores with verify before-write waiting
# on the disk's latency).
READ_UNITS = 8


@dataclass(frozen=True)
class FileBlock:
    """One block of a save as the verifier needs it."""

    name: str
    pages_offset: int  # absolute offset of its first page
    pages: int
    present: np.ndarray  # its bitmap, checked against the vmdescription
    digests: bytes  # its part of the checksum table


class FileProgress:
    """Counters one verify updates from its threads; read as a snapshot."""

    def __init__(self, blocks: Sequence[FileBlock]) -> None:
        self.units_total = sum(unit_count(b.pages) for b in blocks)
        self.bytes_total = sum(int(np.count_nonzero(b.present)) for b in blocks) * PAGE_SIZE
        self.units_done = 0
        self.bytes_read = 0
        self._lock = threading.Lock()

    def add(self, units: int, read: int) -> None:
        with self._lock:
            self.units_done += units
            self.bytes_read += read


def verify_file(
    fds: Sequence[int],
    path: str,
    blocks: Sequence[FileBlock],
    cancel: threading.Event,
    progress: FileProgress | None = None,
    record: Sequence[bytearray] | None = None,
) -> None:
    """Check every unit of `blocks` against its digest, reading with one thread per fd.

    Returns when all match or once `cancel` is set (the caller checks the event); raises
    the first error (ChecksumMismatch, ChannelError) after every thread has stopped.
    `record` (one buffer per block): store each unit's digest there instead of checking
    it (a live save's checksums of what its file holds, migration/engine.py).
    """
    work: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
    for index, block in enumerate(blocks):
        units = unit_count(block.pages)
        for first in range(0, units, READ_UNITS):
            work.put((index, first, min(first + READ_UNITS, units)))
    for _ in fds:
        work.put(None)
    progress = progress if progress is not None else FileProgress(blocks)

    def drain(fd: int) -> None:
        buffer = mmap.mmap(-1, READ_UNITS * UNIT_BYTES)  # page aligned, as O_DIRECT wants
        view = memoryview(buffer)
        try:
            while not cancel.is_set():
                item = work.get()
                if item is None:
                    return
                index, first_unit, end_unit = item
                block = blocks[index]
                first = first_unit * UNIT_PAGES
                end = min(end_unit * UNIT_PAGES, block.pages)
                present = block.present[first:end]
                # One read from the first present page to the last: the slots between
                # are holes in migd's files, which the filesystem reads as zeros.
                where = np.flatnonzero(present)
                if where.size:
                    lo, hi = int(where[0]), int(where[-1]) + 1
                    read_fully(
                        fd,
                        view[lo * PAGE_SIZE : hi * PAGE_SIZE],
                        block.pages_offset + (first + lo) * PAGE_SIZE,
                        path,
                    )

                def source(page: int, count: int, first: int = first) -> memoryview:
                    return view[(page - first) * PAGE_SIZE : (page - first + count) * PAGE_SIZE]

                for unit in range(first_unit, end_unit):
                    start = unit * UNIT_PAGES
                    unit_present = block.present[start : min(start + UNIT_PAGES, block.pages)]
                    got = unit_digest(unit_present, start, source)
                    at = unit * DIGEST_BYTES
                    if record is not None:
                        record[index][at : at + DIGEST_BYTES] = got
                    elif block.digests[at : at + DIGEST_BYTES] != got:
                        raise ChecksumMismatch(
                            mismatch_text(path, block.name, block.pages_offset, block.pages, unit)
                        )
                    progress.add(1, int(np.count_nonzero(unit_present)) * PAGE_SIZE)
        except BaseException:
            cancel.set()
            raise

    # In the worker threads the channels and hashing threads use (io/threads.py
    # WorkerPool: made beforehand, nicer than a daemon's event loop).
    futures = [WORKERS.submit("migd-verify", drain, fd) for fd in fds]
    concurrent.futures.wait(futures)
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error
