"""The I/O engine seam: what moves a job's page runs between its fds and memory.

A job's planner (migration/plan.py) cuts its blocks into PageRuns and describes each
block as a BlockIO (its place in the file and its memory); a `Transfer` hands those, the
channel fds, the job's cancel event and its throttle to an `IOEngine`, whose `run` moves
every run and raises the job's error. The engine knows nothing of the file format or
the job: a block is a file offset, a page count and a memory view.

Engines are named in ENGINES, as uvicorn names its protocol implementations: an import
string per name, loaded on demand, so that adding one is its module plus one entry.
`threads` (io/threads.py: one thread per channel fd and a populator) is the default.
"""

from __future__ import annotations

import errno
import importlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import MemoryFault, MigdError, MigrationError
from ..pages import CHUNK_PAGES, PAGE_SIZE
from ..runs import true_runs
from .share import DiskShare
from .throttle import Throttle

# Threads per job that hash the units its channels complete (docs/checksums.md: one
# keeps up with about 7 GiB/s here, so two leave room on faster disks). Here, not in
# checksums.py, because checksums builds on this module.
HASH_THREADS = 2


@dataclass(frozen=True)
class PageRun:
    """A contiguous run of pages of one block: the unit dealt to channels."""

    block: int  # index into the job's block list
    first_page: int
    pages: int
    zero: bool = False  # restore only: make these pages zero instead of reading them
    # restore only: read into a channel's staging buffer, checked there, and written into
    # the memory file with BlockIO.store (io/threads.py Staging); the populator allocates
    # its pages in the file ahead (the block's populate is the backend's allocate)
    staged: bool = False


@dataclass
class BlockIO:
    """What page I/O needs of one block: where its pages are in the file, its memory."""

    name: str  # the block's name (RAMBlock idstr), for errors
    pages_offset: int  # absolute file offset of the block's first page
    pages: int
    memory: memoryview  # the whole backend mapping, page aligned
    present: np.ndarray  # one bool per page: the save's bitmap, filled in by the channels
    zero_range: Callable[[int, int], None] | None = None  # restore: cheap zeroing
    # What the Populator does to a run before a channel reads or writes it: on restore,
    # allocate and map the memory (a staged block's: allocate its file's pages, unmapped);
    # on save, map it for reading.
    populate: Callable[[int, int], None] | None = None
    # Why the kernel could not reach this memory (EFAULT), given "save" or "restore": the
    # backend's file shrank, or its memory could not be allocated; None if neither.
    explain_fault: Callable[[str], MigdError | None] | None = None
    # The error if the backend's file is shorter than its mapping now, given the direction.
    check_size: Callable[[str], MigdError | None] | None = None
    # The memory file's fd when `memory` is a shared mapping of it (MemoryBackend's
    # shared_fd): the checksums read the pages through it, which costs half what reading
    # the mapping through process_vm_readv does (docs/checksums.md). None: no such file.
    content_fd: int | None = None
    # The memory is on huge pages (MemoryBackend.huge_pages): a save writes it straight
    # from the mapping even where the transfer stages saves (io/threads.py Staging).
    huge_pages: bool = False
    # Restore: write bytes at a byte offset of the memory through its file (pwrite;
    # MemoryBackend.write_at), for the runs planned `staged`; None: no such way in.
    store: Callable[[memoryview, int], None] | None = None
    # A staged restore's block: allocate and map the memory, for runs read straight into
    # the mapping once writing into its new pages turns out dear (io/threads.py NewPages);
    # `populate` only allocates its file's pages. None: not staged.
    map_in: Callable[[int, int], None] | None = None
    # Restore: whether the memory file surely has no hole now, cheaply (MemoryBackend's
    # holds_every_page); check_stored walks the file's pages only where it says no.
    holds_every_page: Callable[[], bool] | None = None

    def page_offset(self, page_index: int) -> int:
        """Absolute file offset of page `page_index`."""
        if not 0 <= page_index < self.pages:
            raise IndexError(f"page {page_index} outside of ramblock {self.name} range")
        return self.pages_offset + page_index * PAGE_SIZE


class Counters:
    """Progress of one channel; plain ints written by one thread, read as a snapshot."""

    __slots__ = ("bytes", "bytes_cached", "pages_done", "pages_normal", "pages_zero")

    def __init__(self) -> None:
        self.bytes = 0  # bytes moved through the fd
        self.bytes_cached = 0  # restore: of those, read buffered as the page cache held them
        self.pages_done = 0  # pages dealt with, whether written, read or skipped
        self.pages_normal = 0  # pages written or read
        self.pages_zero = 0  # zero pages skipped (save) or zeroed (restore)


def split_runs(
    block: int,
    runs: Sequence[tuple[int, int]],
    zero: bool = False,
    chunk: int = CHUNK_PAGES,
    staged: bool = False,
) -> list[PageRun]:
    """Cut (first, count) runs of one block into PageRuns of at most `chunk` pages;
    `staged`: a restore stages them (PageRun.staged)."""
    out: list[PageRun] = []
    for first, count in runs:
        for at in range(first, first + count, chunk):
            out.append(PageRun(block, at, min(chunk, first + count - at), zero, staged))
    return out


@dataclass
class Transfer:
    """One job's page I/O, as an engine sees it."""

    direction: str  # "save" (memory -> fds) or "restore" (fds -> memory)
    path: str  # names the file in every error
    fds: Sequence[int]  # one per channel
    blocks: Sequence[BlockIO]
    runs: Sequence[PageRun]
    cancel: threading.Event  # the job's: set by migrate_cancel, shutdown, or a failure
    throttle: Throttle  # max-bandwidth, shared by every channel; its rate may change
    detect_zero: bool  # save: skip zero pages (zero-page-detection)
    write_behind: bool  # save: keep the dirty page cache small (buffered fds)
    # The engine adds one Counters per channel before moving any page; query-migrate sums
    # them while the transfer runs (the job holds this same list).
    counters: list[Counters] = field(default_factory=list)
    # Told of every run once it is done (its pages written, read or zeroed), in the thread
    # that did it; the engine runs `hash_threads` of its hash_queued bodies beside the
    # channels. None when the job has no checksums.
    checksums: UnitSink | None = None
    hash_threads: int = HASH_THREADS
    # The daemon's I/O slots shared with every other job's transfer (io/share.py): each
    # page I/O call holds one; None: unshared.
    share: DiskShare | None = None
    # Save only: runs of blocks with a content_fd are read from it into each channel's
    # staging buffer and written from there (io/threads.py Staging), not from the mapping.
    stage_saves: bool = False
    # Restore with O_DIRECT `fds` only: a buffered fd of the same file, through which a
    # channel reads each run the page cache mostly holds (io/residency.py); None: every
    # run through the channel's own fd.
    cached_fd: int | None = None


class UnitSink(Protocol):
    """Told of the pages an engine has finished, per block (io/checksums.py's
    UnitChecksums queues each unit they complete for hashing, and raises on a restore's
    mismatch in a hashing thread)."""

    def done(self, block_index: int, first_page: int, pages: int) -> None: ...

    def landed(self, block_index: int, first_page: int, data: memoryview) -> list[tuple[int, int]]:
        """For pages whose bytes are at hand (a save's staging buffer): the units they
        hold whole are hashed from `data` at once; the pieces of the others are returned,
        for `done`."""
        ...

    def hash_queued(self, cancel: threading.Event) -> None:
        """A hashing thread's body, run by the engine beside its channels."""
        ...

    def no_more_units(self, threads: int) -> None:
        """Called once every channel has stopped: ends `threads` hash_queued bodies."""
        ...


class IOEngine(Protocol):
    """Moves a Transfer's runs. The contract every engine keeps:

    * `run` returns once every run is moved, or early once `cancel` is set (the caller
      checks the event afterwards); it never returns while one of its workers may still
      touch a block's memory or an fd.
    * Errors are the job's: ChannelError or MemoryFault naming the file, or the block's
      explain_fault account of an EFAULT; the first one is raised, after every worker
      has stopped. On ANY exception (a failure, the calling task cancelled) `cancel` is
      set before the engine waits for its workers, so that they stop within an I/O call.
    * No work per page beyond the I/O itself: this is the hot path. With `checksums`,
      each run is reported to it once done, before the worker takes its next run; the
      engine runs `hash_threads` of its hash_queued bodies beside the workers and calls
      no_more_units once the workers have stopped; a mismatch a hashing thread raises is
      the job's error like any other.
    """

    async def run(self, transfer: Transfer) -> None: ...


DEFAULT_ENGINE = "threads"
# name -> "module:class"; the class is built with no arguments.
ENGINES: dict[str, str] = {
    "threads": "migd.io.threads:ThreadEngine",
}


def load_engine(name: str = DEFAULT_ENGINE) -> IOEngine:
    """A new engine of the kind `name` names in ENGINES."""
    try:
        where = ENGINES[name]
    except KeyError:
        known = ", ".join(sorted(ENGINES))
        raise MigrationError(f"unknown I/O engine '{name}' (known: {known})") from None
    module, _, cls = where.partition(":")
    engine: IOEngine = getattr(importlib.import_module(module), cls)()
    return engine


def check_sizes(blocks: Sequence[BlockIO], direction: str) -> None:
    """After the runs: a memory file cut short after the channels were done with its pages
    faults no thread, but what was restored into the lost pages is gone (or what was saved
    from them no longer exists): the job must not complete."""
    for block in blocks:
        shrunk = block.check_size(direction) if block.check_size is not None else None
        if shrunk is not None:
            raise shrunk
        if direction == "restore" and block.store is not None:
            check_stored(block)


def check_stored(block: BlockIO) -> None:
    """A restore that wrote through the memory file (BlockIO.store): every present page
    must be data in it now. A file cut short and grown back by a later write (another
    channel's, between its size check and its pwrite) keeps its size but has lost the
    pages in between, as holes: found here, where the size alone would pass."""
    fd = block.content_fd
    assert fd is not None
    if block.holds_every_page is not None and block.holds_every_page():
        return  # no page of the file is a hole: none was lost (one fstat, not the walk)
    for first, stop in zip(*(r.tolist() for r in true_runs(block.present)), strict=True):
        start, end = first * PAGE_SIZE, stop * PAGE_SIZE
        try:
            hole = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: the file ends before `start`
                raise
            hole = start
        if hole < end:
            explain = block.check_size("restore") if block.check_size is not None else None
            raise explain or MemoryFault(
                f"ramblock '{block.name}': its memory file lost restored pages at byte "
                f"{hole:#x} (cut short and grown back during the restore?)"
            )
