"""The file transport's threads: multifd channels doing positional I/O on their own fds.

No await and no pydantic here. Each channel is one thread with one fd (O_DIRECT when
direct-io is effective) that takes page runs from a shared queue and does
os.pwritev/os.preadv straight between the file and the backend's mmap. The asyncio
side reads the counters as a snapshot; errors come back as ChannelError with the path.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import MigrationError
from .format import BlockLayout
from .paths import FileOpener, plain_open

PAGE_SIZE = 4096
# Large I/Os keep O_DIRECT at disk speed; 8 MiB per call is the top of performance.md's range.
CHUNK_PAGES = (8 << 20) // PAGE_SIZE
# Reads do better smaller, as QEMU reads (MAPPED_RAM_LOAD_BUF_SIZE): restoring 4 GiB here,
# 1 MiB reads ran at 1.84 GiB/s against 1.68 with 8 MiB, four runs each, interleaved.
READ_CHUNK_PAGES = (1 << 20) // PAGE_SIZE
# A zero run shorter than this is written inline: skipping it would split one large I/O
# into small ones, which costs more on O_DIRECT than writing the zeros (performance.md).
MIN_SKIP_PAGES = (1 << 20) // PAGE_SIZE
_WORDS_PER_PAGE = PAGE_SIZE // 8


class ChannelError(MigrationError):
    """An I/O failure in a channel thread, worded for the job's error-desc."""


@dataclass(frozen=True)
class PageRun:
    """A contiguous run of pages of one block: the unit dealt to channels."""

    block: int  # index into the job's block list
    first_page: int
    pages: int
    zero: bool = False  # restore only: make these pages zero instead of reading them


@dataclass
class BlockIO:
    """What a channel needs of one block: its file layout and its memory."""

    layout: BlockLayout
    memory: memoryview  # the whole backend mapping, page aligned
    present: np.ndarray  # one bool per page: the save's bitmap, filled in by the channels
    zero_range: Callable[[int, int], None] | None = None  # restore: cheap zeroing
    # What the Populator does to a run before a channel reads or writes it: on restore,
    # allocate and map the memory; on save, map it for reading.
    populate: Callable[[int, int], None] | None = None


class Counters:
    """Progress of one channel; plain ints written by one thread, read as a snapshot."""

    __slots__ = ("bytes", "pages_done", "pages_normal", "pages_zero")

    def __init__(self) -> None:
        self.bytes = 0  # bytes moved through the fd
        self.pages_done = 0  # pages dealt with, whether written, read or skipped
        self.pages_normal = 0  # pages written or read
        self.pages_zero = 0  # zero pages skipped (save) or zeroed (restore)


class Throttle:
    """Caps the bytes per second of all channels together (0 = unlimited).

    The rate can change while channels wait (migrate-set-parameters max-bandwidth during
    a migration, as in QEMU): a waiting channel looks again every POLL seconds.
    """

    POLL = 0.05

    def __init__(self, rate: int) -> None:
        self._lock = threading.Lock()
        self._rate = rate
        self._start = time.monotonic()
        self._granted = 0

    def set_rate(self, rate: int) -> None:
        """A new cap from now on; what was granted under the old one is not owed."""
        with self._lock:
            self._rate = rate
            self._start = time.monotonic()
            self._granted = 0

    def wait(self, nbytes: int, cancel: threading.Event) -> None:
        with self._lock:
            if self._rate <= 0:
                return
            self._granted += nbytes
        while True:
            with self._lock:
                if self._rate <= 0:
                    return
                delay = self._start + self._granted / self._rate - time.monotonic()
            if delay <= 0 or cancel.wait(min(delay, self.POLL)):
                return


def _true_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and stops of the runs of True in a bool array."""
    padded = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return edges[0::2], edges[1::2]


def zero_pages(memory: memoryview, min_run: int = MIN_SKIP_PAGES) -> np.ndarray:
    """One bool per page: True where the page holds only zero bytes, found wherever a
    save could skip it: in runs of at least `min_run` pages whose first words are all
    zero. Zero pages elsewhere read False; runs_to_write would write them inline anyway.

    Pages whose first word is non-zero are settled by reading one cache line each, so
    random memory costs almost nothing. Only runs of at least `min_run` pages whose first
    words are all zero are scanned in full, in place: scattered zero pages (30% of them,
    say) cost no scan at all, where scanning every candidate page made such saves 10-20%
    slower than saves of random memory.
    """
    words = np.frombuffer(memory, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
    starts, stops = _true_runs(words[:, 0] == 0)
    zero = np.zeros(words.shape[0], dtype=bool)
    long = (stops - starts) >= min_run
    for a, b in zip(starts[long].tolist(), stops[long].tolist(), strict=True):
        # bitwise_or.reduce runs without the GIL and needs no casting: it scales across
        # channel threads where np.any does not (measured on tmpfs-backed memory).
        zero[a:b] = np.bitwise_or.reduce(words[a:b], axis=1) == 0
    return zero


def touch_pages(memory: memoryview) -> None:
    """Read one word per page so the pages are mapped before the O_DIRECT write.

    The kernel maps a file's pages up to 16 per fault when they are read from user space,
    but one per fault when the write pins them. The zero scan maps pages this way; without
    it, `migd bench` measured saves 20% slower (1.24 against 1.56 GiB/s on a busy machine).
    """
    words = np.frombuffer(memory, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
    words[:, 0].max()


def runs_to_write(zero: np.ndarray, min_skip: int = MIN_SKIP_PAGES) -> list[tuple[int, int]]:
    """(first, count) runs to write: everything except zero runs of at least min_skip pages."""
    n = zero.size
    starts, stops = _true_runs(zero)
    keep = (stops - starts) >= min_skip
    writes: list[tuple[int, int]] = []
    pos = 0
    for a, b in zip(starts[keep].tolist(), stops[keep].tolist(), strict=True):
        if a > pos:
            writes.append((pos, a - pos))
        pos = b
    if pos < n:
        writes.append((pos, n - pos))
    return writes


def _describe(exc: OSError, verb: str, path: str) -> ChannelError:
    return ChannelError(f"Could not {verb} '{path}': {os.strerror(exc.errno or errno.EIO)}")


def write_fully(fd: int, data: memoryview, offset: int, path: str) -> None:
    """pwritev until every byte is written; a short write continues where it stopped."""
    while data:
        try:
            done = os.pwritev(fd, [data], offset)
        except InterruptedError:
            continue
        except OSError as exc:
            raise _describe(exc, "write", path) from None
        if done == 0:
            raise ChannelError(f"Could not write '{path}': no progress at offset {offset}")
        data = data[done:]
        offset += done


def read_fully(fd: int, data: memoryview, offset: int, path: str) -> None:
    """preadv until every byte is read; the end of the file is an error, never zeros."""
    while data:
        try:
            done = os.preadv(fd, [data], offset)
        except InterruptedError:
            continue
        except OSError as exc:
            raise _describe(exc, "read", path) from None
        if done == 0:
            raise ChannelError(
                f"Could not read '{path}': file ends at offset {offset}, "
                f"{len(data)} more bytes were expected"
            )
        data = data[done:]
        offset += done


class Channel:
    """One thread's worth of work: take runs from the queue until it is empty or cancelled."""

    def __init__(
        self,
        fd: int,
        path: str,
        blocks: Sequence[BlockIO],
        work: queue.SimpleQueue[PageRun | None],
        cancel: threading.Event,
        throttle: Throttle,
        detect_zero: bool,
    ) -> None:
        self.fd = fd
        self.path = path
        self.blocks = blocks
        self.work = work
        self.cancel = cancel
        self.throttle = throttle
        self.detect_zero = detect_zero
        self.counters = Counters()

    def _drain(self, step: Callable[[PageRun], None]) -> None:
        try:
            while not self.cancel.is_set():
                run = self.work.get()
                if run is None:
                    return
                step(run)
        except BaseException:
            self.cancel.set()  # the job has failed: the other threads stop at their next run
            raise

    def save(self) -> None:
        self._drain(self._save_run)

    def restore(self) -> None:
        self._drain(self._restore_run)

    def _save_run(self, run: PageRun) -> None:
        block = self.blocks[run.block]
        start = run.first_page * PAGE_SIZE
        memory = block.memory[start : start + run.pages * PAGE_SIZE]
        if self.detect_zero:
            zero = zero_pages(memory)
            pieces = runs_to_write(zero)
        else:
            touch_pages(memory)
            pieces = [(0, run.pages)]
        written = 0
        for first, count in pieces:
            if self.cancel.is_set():
                return
            data = memory[first * PAGE_SIZE : (first + count) * PAGE_SIZE]
            self.throttle.wait(len(data), self.cancel)
            write_fully(self.fd, data, block.layout.page_offset(run.first_page + first), self.path)
            block.present[run.first_page + first : run.first_page + first + count] = True
            self.counters.bytes += len(data)
            written += count
        self.counters.pages_normal += written
        self.counters.pages_zero += run.pages - written
        self.counters.pages_done += run.pages

    def _restore_run(self, run: PageRun) -> None:
        block = self.blocks[run.block]
        start, length = run.first_page * PAGE_SIZE, run.pages * PAGE_SIZE
        if run.zero:
            if block.zero_range is not None:
                block.zero_range(start, length)
            self.counters.pages_zero += run.pages
        else:
            self.throttle.wait(length, self.cancel)
            memory = block.memory[start : start + length]
            read_fully(self.fd, memory, block.layout.page_offset(run.first_page), self.path)
            self.counters.bytes += length
            self.counters.pages_normal += run.pages
        self.counters.pages_done += run.pages


class Populator:
    """Maps the memory of the runs ahead of the channels (BlockIO.populate does the work).

    It walks the runs in the order the channels take them from the queue, and maps memory
    faster than a disk moves it (several GiB/s here), so each O_DIRECT read or write pins
    pages that are already mapped instead of faulting them in, and the zero scan of a save
    reads mapped pages. In the channel threads themselves, right before each I/O, the same
    work leaves the disk idle meanwhile. Measured here with 4 GiB, medians of interleaved
    runs: restoring into a new tmpfs file, 1.57 GiB/s with this thread against 1.02
    populating in the channels and 1.04 not populating at all (as QEMU); into a file that
    held data, 1.84 against 1.73; saving random memory, 1.87 against 1.63 without it.
    A channel that overtakes it simply faults its pages in, which is only slower.
    """

    def __init__(
        self, blocks: Sequence[BlockIO], runs: Sequence[PageRun], cancel: threading.Event
    ) -> None:
        self.blocks = blocks
        self.runs = [r for r in runs if not r.zero and blocks[r.block].populate is not None]
        self.cancel = cancel

    def run(self) -> None:
        try:
            for run in self.runs:
                if self.cancel.is_set():
                    return
                populate = self.blocks[run.block].populate
                assert populate is not None
                populate(run.first_page * PAGE_SIZE, run.pages * PAGE_SIZE)
        except BaseException:
            self.cancel.set()  # out of memory: the reads would fail too, with EFAULT
            raise


def split_runs(
    block: int, runs: Sequence[tuple[int, int]], zero: bool = False, chunk: int = CHUNK_PAGES
) -> list[PageRun]:
    """Cut (first, count) runs of one block into PageRuns of at most `chunk` pages."""
    out: list[PageRun] = []
    for first, count in runs:
        for at in range(first, first + count, chunk):
            out.append(PageRun(block, at, min(chunk, first + count - at), zero))
    return out


ChannelOpener = Callable[[str, int, bool], int]
"""open(path, flags, direct) -> fd; raises a MigdError whose text names the file."""


def open_channel_fd(path: str, flags: int, direct: bool, open_file: FileOpener = plain_open) -> int:
    """Open one channel's own fd; EINVAL with O_DIRECT means the filesystem refuses it."""
    try:
        return open_file(path, flags | (os.O_DIRECT if direct else 0), 0o600)
    except OSError as exc:
        if direct and exc.errno == errno.EINVAL:
            raise ChannelError(
                f"Could not open '{path}': filesystem does not support O_DIRECT"
            ) from None
        raise _describe(exc, "open", path) from None
