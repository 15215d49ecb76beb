"""The `threads` I/O engine: multifd channels doing positional I/O on their own fds.

No pydantic here, and no await below ThreadEngine.run. Each channel is one thread with
one fd (O_DIRECT when direct-io is effective) that takes page runs from a shared queue
and does os.pwritev/os.preadv straight between the file and the backend's mmap; a
populator thread maps the memory ahead of them. A restore from O_DIRECT fds may also be
given a buffered fd of the file, for the runs the page cache holds (io/residency.py).
The asyncio side reads the counters as a snapshot; errors come back as ChannelError
with the path.

Two rules keep the daemon alive and stoppable whatever happens to the files:
* The backends' memory is only ever reached by the kernel (pwritev, preadv, madvise,
  process_vm_readv), never read or written from user space: another process may cut a
  memory file short at any time, and a page past its new end is SIGBUS for user space,
  which kills Python, but EFAULT for a syscall, which the backend explains (shrink error).
* No call runs for long (CallSizer, WriteBehind): a cancel or SIGTERM is seen within
  about CALL_SECONDS on any disk.

write_fully, read_fully and read_upto also serve the main fd's metadata I/O
(migration/mapped_ram/).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import ctypes
import errno
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext, suppress
from typing import Any

from ..errors import ChannelError, MemoryFault, MigdError
from ..pages import CHUNK_PAGES, PAGE_SIZE, READ_CHUNK_PAGES
from ..state.fdsets import AppendingFd, pwrite_at
from .engine import BlockIO, Counters, PageRun, Transfer, UnitSink
from .residency import PageCacheProbe
from .share import DiskShare
from .throttle import Throttle
from .zero_scan import (
    BufferReader,
    MemoryReader,
    read_memory_file,
    runs_to_write,
    touch_pages,
    zero_pages,
)

log = logging.getLogger(__name__)


def _describe(exc: OSError, verb: str, path: str) -> ChannelError:
    text = f"Could not {verb} '{path}': {os.strerror(exc.errno or errno.EIO)}"
    # EFAULT is the memory side of the I/O failing, not the file: the channel explains it.
    return MemoryFault(text) if exc.errno == errno.EFAULT else ChannelError(text)


def write_fully(
    fd: int, data: memoryview, offset: int, path: str, vectored: bool = True
) -> None:
    """pwritev until every byte is written; a short write continues where it stopped.

    `vectored=False` writes with pwrite: the file's metadata (head, bitmaps, end section)
    goes through pwrite and page data through pwritev, so that a trace tells them apart.
    """
    while data:
        try:
            # At the offset even if a holder of a passed fd set O_APPEND (state/fdsets.py
            # pwrite_at): a save 'completed' with its pages appended past its layout.
            done = pwrite_at(fd, data, offset, vectored=vectored)
        except InterruptedError:
            continue
        except AppendingFd as exc:
            raise ChannelError(f"Could not write '{path}': {exc.desc}") from None
        except OSError as exc:
            raise _describe(exc, "write", path) from None
        if done == 0:
            raise ChannelError(f"Could not write '{path}': no progress at offset {offset}")
        data = data[done:]
        offset += done


def read_fully(fd: int, data: memoryview, offset: int, path: str) -> None:
    """preadv until every byte is read; the end of the file is an error, never zeros."""
    got = read_upto(fd, data, offset, path)
    if got < len(data):
        raise ChannelError(
            f"Could not read '{path}': file ends at offset {offset + got}, "
            f"{len(data) - got} more bytes were expected"
        )


def read_upto(fd: int, data: memoryview, offset: int, path: str) -> int:
    """preadv until `data` is full or the file ends -> the bytes read (a metadata reader
    tells a file cut short from an I/O error this way)."""
    got = 0
    while got < len(data):
        try:
            done = os.preadv(fd, [data[got:]], offset + got)
        except InterruptedError:
            continue
        except OSError as exc:
            raise _describe(exc, "read", path) from None
        if done == 0:
            break
        got += done
    return got


# No single I/O call may keep a channel from seeing a cancel (migrate_cancel, SIGTERM) for
# long: on a slow disk, or under max-bandwidth, calls shrink until each takes about this.
CALL_SECONDS = 0.1
MIN_CALL_PAGES = (256 << 10) // PAGE_SIZE
WINDOW_TOP_PAGES = 4 * CHUNK_PAGES  # write-behind: at most 2 x 32 MiB dirty per channel
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int


class CallSizer:
    """Pages per I/O call for one channel, so that a call lasts about CALL_SECONDS.

    It starts at MIN_CALL_PAGES and doubles after every quick call up to `top` (8 MiB on
    a fast disk within a few calls), and shrinks to fit CALL_SECONDS after a slow one: an
    8 MiB O_DIRECT write on a disk of 8 MB/s shared by four channels took 4 s, and the
    thread could not stop before it returned. Under max-bandwidth a call also moves at
    most CALL_SECONDS of the rate (down to one page), so progress and cancels come in
    small steps: the channels' Counters move per call, and a client polling
    query-migrate at 5 Hz sees progress at every poll at any cap from 1 MiB/s.
    """

    def __init__(self, top: int, throttle: Throttle | None = None) -> None:
        self.top = top
        self.throttle = throttle
        self.pages = min(MIN_CALL_PAGES, top)

    def next(self, left: int) -> int:
        """The pages of the next call, of `left` still to move."""
        pages = self.pages
        rate = self.throttle.rate if self.throttle is not None else 0
        if rate > 0:
            # No MIN_CALL_PAGES floor here: at 1 MiB/s a 256 KiB call is 1/4 s, and a
            # client polling query-migrate at 5 Hz would see no progress between polls.
            pages = min(pages, int(rate * CALL_SECONDS) // PAGE_SIZE)
        return max(1, min(pages, left))

    def took(self, pages: int, seconds: float) -> None:
        """Adapt to how long a call of `pages` pages took."""
        if seconds < CALL_SECONDS / 2:
            if pages >= self.pages:
                self.pages = min(self.top, self.pages * 2)
        elif seconds > CALL_SECONDS:
            fit = int(pages * CALL_SECONDS / seconds)
            self.pages = max(MIN_CALL_PAGES, min(self.pages, fit))


class WriteBehind:
    """Keeps a buffered (not O_DIRECT) save's dirty page cache small, per channel.

    Without it the page cache took the whole save and the final fdatasync wrote it all:
    32 s on a disk of 8 MB/s, during which SIGTERM could not end the daemon. Here, after
    each window of writes the channel starts their writeback (SYNC_FILE_RANGE_WRITE) and
    waits for the window before, so at most two windows per channel are dirty or under
    writeback. The window is sized so that the wait lasts about CALL_SECONDS, like an
    I/O call: on a slow disk it shrinks to MIN_CALL_PAGES (and the last sync with it), on
    a fast one it grows to WINDOW_TOP_PAGES, enough to keep the disk busy. Only page cache
    is flushed, never metadata: the final fdatasync still makes the save durable.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sizer = CallSizer(WINDOW_TOP_PAGES)
        self.window: list[tuple[int, int]] = []  # (offset, bytes) written since the last flush
        self.window_bytes = 0
        self.previous: list[tuple[int, int]] = []

    def wrote(self, offset: int, length: int) -> None:
        self.window.append((offset, length))
        self.window_bytes += length
        if self.window_bytes >= self.sizer.pages * PAGE_SIZE:
            self._flush()

    def _flush(self) -> None:
        started = time.monotonic()
        wait = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
        for offset, length in self.previous:
            _sync_file_range(self.fd, offset, length, wait)
        for offset, length in self.window:
            _sync_file_range(self.fd, offset, length, _SYNC_FILE_RANGE_WRITE)
        if self.previous:
            pages = sum(length for _, length in self.previous) // PAGE_SIZE
            self.sizer.took(pages, time.monotonic() - started)
        self.previous, self.window, self.window_bytes = self.window, [], 0


# A channel's staging buffer: half a save run (pages.CHUNK_PAGES), so that 4 channels
# add 16 MiB to the daemon's private memory, not 32; a whole restore run.
STAGE_PAGES = CHUNK_PAGES // 2
assert READ_CHUNK_PAGES <= STAGE_PAGES
_MADV_HUGEPAGE = 14


class Staging:
    """A buffer between a memory file and a channel's O_DIRECT fd (a save's channel fills
    and writes its own, a restore's channel fills it for the Storer).

    Saving straight from the mapping (zero-copy) makes the kernel map every 4 KiB page of
    the memory into migd (populate), pin each one again for every O_DIRECT write, read
    it once more through the file for its checksum, and unmap it all at object-del: on a
    disk faster than this machine's (ext4 on a loop device over tmpfs, issue 19), two
    thirds of a save's CPU time (docs/bench/fast-disk). Through this buffer a run is
    read from the memory file once (pread: one copy, the one the checksums made anyway),
    zero-scanned and hashed there in place, and written from it; the buffer is
    anonymous memory on transparent huge pages where the kernel allows, so pinning it
    for O_DIRECT takes two entries per 4 MiB instead of 1024. The memory is never mapped
    for the save. On the fast disk, 1.5 GiB, 4 channels, paired with saves from the
    mapping: 1.67x their speed at 0.28 CPU s/GiB against 0.73 (docs/bench/fast-disk,
    run 6; QEMU 10 needed 0.90 there).
    On memory files on huge pages the mapping costs little (pinning a 2 MiB page is one
    entry) and the copy is the larger cost: staged saves ran at 0.83x there, so such
    blocks are saved from the mapping (MemoryBackend.huge_pages).

    The hash is of the bytes written, so a save's checksums match its file even when the
    memory changes under it (a live pass). A memory file cut short reads short: that is
    MemoryFault, which the backend explains, as EFAULT is for the mapping.

    Restores use it for the memory files on 4 KiB pages (migration/plan.py marks their
    runs PageRun.staged): a run is read into the buffer, its whole units are checked
    there, and it is written into the file with pwrite (MemoryBackend.write_at: never
    grows the file; engine.check_stored finds pages a truncate took meanwhile). A
    corrupt unit so never reaches the memory, and none of it is mapped. Into used
    memory, paired with restores into the mapping: 1.26x on the fast disk, 1.21x on the
    virtio disk. Into a file's holes the Populator allocates the pages ahead with
    fallocate (MemoryBackend.allocate), so the writes only copy (a write into a hole
    allocates under the file's inode lock, one writer at a time): 1 GiB and 2 GiB into
    a new /dev/shm file ran 1.2-1.5x the mapped way. Where the first write into a new
    page is dear, the rest of the runs go into the mapping (NewPages says why;
    docs/bench/fast-disk/README.md, "Restores into holes, allocated ahead, mapped where
    dear").
    """

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, STAGE_PAGES * PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with suppress(OSError):  # no THP on this kernel: 4 KiB pages, still right
            self._map.madvise(_MADV_HUGEPAGE)
        self.view = memoryview(self._map)
        self.reader = BufferReader(self.view)

    def fill(self, fd: int, offset: int, pages: int) -> memoryview:
        """The `pages` pages of the memory file `fd` from `offset`, read into the buffer."""
        data = self.view[: pages * PAGE_SIZE]
        try:
            read_memory_file(fd, data, offset)  # a file cut short: MemoryFault
        except OSError as exc:
            raise MemoryFault(f"Could not read memory: {exc.strerror}") from None
        return data

    def close(self) -> None:
        """Unmap the buffer now, or, while a failure's traceback still holds a view of it
        (the frame of `fill`), once that goes (the engine cuts the tracebacks)."""
        self.reader = None  # type: ignore[assignment]  # its numpy view pins the buffer
        with suppress(BufferError):
            self.view.release()
            self._map.close()


class StagingPool:
    """Staging buffers kept from one job to the next, so that a job does not make new ones.

    A new buffer is new memory: the kernel zeroes each of its pages on first touch, and
    on this machine a new page costs 1 to 6 CPU s/GiB (docs/bench/fast-disk/README.md,
    "Restores into holes"). A restore with 4 channels touches 8 buffers (32 MiB) before
    its first byte is stored; perf of 1.5 GiB restores into used memory on the fast disk
    had the channels' clear_page at about 4% of the daemon's CPU. Buffers come back here
    when a job ends (at most KEEP), and those not taken again within IDLE seconds are
    unmapped (trim, which the engine schedules at each job's end), so an idle daemon holds
    none. A buffer is given back only once no thread of its job can touch it."""

    KEEP = 16  # 64 MiB: two jobs' worth of restore buffers with 4 channels
    IDLE = 10.0  # seconds

    def __init__(self) -> None:
        self._free: list[tuple[float, Staging]] = []  # (when given back, buffer)
        self._lock = threading.Lock()

    def take(self) -> Staging:
        with self._lock:
            if self._free:
                return self._free.pop()[1]
        return Staging()

    def give(self, buffers: Sequence[Staging]) -> None:
        now = time.monotonic()
        with self._lock:
            room = max(0, self.KEEP - len(self._free))
            self._free += [(now, buffer) for buffer in buffers[:room]]
        for buffer in buffers[room:]:
            buffer.close()

    def trim(self) -> None:
        """Unmap the buffers given back more than IDLE seconds ago."""
        stale = time.monotonic() - self.IDLE
        with self._lock:
            old = [buffer for given, buffer in self._free if given <= stale]
            self._free = [(given, buffer) for given, buffer in self._free if given > stale]
        for buffer in old:
            buffer.close()

    def held(self) -> int:
        """How many buffers are kept now."""
        with self._lock:
            return len(self._free)


STAGING = StagingPool()


# How many threads of a job copy between memory files and staging buffers at once: a
# save's channels, each reading, scanning and hashing into its own buffer in turn
# (Channel._save_staged), a restore's Storer threads. Restores: two Storers ran as fast
# as one and cost more (0.25 against 0.22 CPU s/GiB on the Intel cores: writes into one
# tmpfs file serialize on its inode lock, and the second spun on it). Saves: until
# session 24 one Loader thread read for all channels, which only wrote, so that each
# always had a write in flight; handing each buffer from one thread to another cost
# (docs/bench/fast-disk/README.md, "Session 23": the plain loop of that shape 0.73x the
# fused one). Channels that read their own buffers, one at a time, against the Loader
# (both with the save file's slots allocated ahead, migration/mapped_ram/page_slots.py),
# 1.5 GiB, 4 channels, alternated, on two AMD EPYC cores: 1.45x at 0.100 against 0.160
# CPU s/GiB on the fast disk, 0.98x at 0.120 against 0.160 on the virtio disk; all four
# reading at once instead: as fast on the fast disk, 0.90x on the virtio disk (two CPUs:
# the copies crowd out the I/O path). ("Session 24".)
COPY_THREADS = 1


class NewPages:
    """Whether a staged restore's writes into the memory file's new pages are dear.

    On this machine (a guest with free page reporting), a page that was freed a while
    ago costs the first write that puts data in it 3-6 CPU s/GiB at times, where it
    costs about 0.1 (a copy) at others: the host maps it back in under that write. A
    staged restore makes that write with the CPU (the Storer's pwrite copies into the
    page, after fallocate zeroed it), one writer at a time under the file's inode lock;
    a read into the mapping has the disk's DMA make it, and faulting pages in runs in
    parallel, as QEMU's restores do. perf of a staged restore into dear pages: 72% of the
    daemon's samples in copy_folio_from_iter_atomic (the pwrite's copy), 5% in
    clear_page. So the Storer times its writes (CPU time of its thread: waiting for the
    lock or a CPU costs none) and, once WINDOW bytes of them cost more than
    DEAR_SECONDS_PER_GIB, says so here: the channels then read the rest of the runs into
    the mapping (Channel._restore_run) and the Populator maps them ahead in more threads.
    Restoring 2 GiB into a new /dev/shm file with dear pages (4 GiB just taken beside
    it): staged alone 3.7-5.5 s, mapped 2.7-3.3, this way 2.8-4.7 (median 3.0); with
    cheap ones: this way 0.91-1.06 s, mapped 1.21-1.38 (docs/bench/fast-disk/README.md,
    "Restores into holes, allocated ahead, mapped where dear").
    """

    # Dear pages cost 3-6 CPU s/GiB here, cheap ones 0.1-0.2, a few writes of cheap ones
    # up to 1.4: judged over WINDOW bytes of writes at a time, not write by write.
    DEAR_SECONDS_PER_GIB = 2.0
    WINDOW = 16 << 20

    def __init__(self) -> None:
        self.dear = False
        self._lock = threading.Lock()
        self._waiters: list[threading.Event] = []
        self._bytes = 0  # of the writes in this window so far
        self._seconds = 0.0

    def waiter(self) -> threading.Event:
        """An event set once the pages are found dear (the Populator's other threads)."""
        event = threading.Event()
        with self._lock:
            self._waiters.append(event)
            if self.dear:
                event.set()
        return event

    def wrote(self, length: int, cpu_seconds: float) -> None:
        """A write of `length` bytes into the memory file took `cpu_seconds` of CPU."""
        if self.dear:
            return
        with self._lock:
            self._bytes += length
            self._seconds += cpu_seconds
            if self._bytes < self.WINDOW:
                return
            cost = self._seconds * 2**30 / self._bytes
            self._bytes, self._seconds = 0, 0.0
            if self.dear or cost <= self.DEAR_SECONDS_PER_GIB:
                return
            self.dear = True
            waiters = list(self._waiters)
        log.debug("writing into new pages is dear (%.1f CPU s/GiB): the rest of the restore "
                  "is read into the mapping", cost)  # fmt: skip
        for event in waiters:
            event.set()


class StorerLoad:
    """Whether the Storer bounds a staged restore: then its channels check and store their
    own runs (Channel._restore_staged), one write into the memory files at a time.

    One Storer keeps every channel's next read in flight while it checks and writes the
    last run, which is what a disk whose reads cost this machine no CPU wants (the
    virtio disk). Where the disk's reads cost CPU too (ext4 on a loop device over tmpfs,
    issue 19: the loop's worker copies every read), one thread checking and writing
    everything is the job's bound, and four channels each checking and writing their
    own runs (the writes under Storer.store_lock) ran faster. Plain loops of the shapes
    (docs/bench/fast-disk/probe_shapes.py), 1.5 GiB into used memory, 4 channels, 4 MiB
    runs, medians of alternated rounds (docs/bench/fast-disk/README.md, "Session 26"):
    fast disk, the channels storing 7.6-8.8 GiB/s against the Storer's 6.3; virtio disk
    3.1-3.3 against 3.5-3.6. So a job starts with the Storer and switches for good once
    the Storer was idle (waiting for runs) under IDLE of its time over WINDOW bytes; the
    first window only warms up, since every channel's buffers fill at once at the start
    and make a backlog on any disk (judged from it, the virtio disk's loop switched in
    one round of four). This way: 7.9 GiB/s on the fast disk (switched after 48-60 MiB)
    and 3.5 on the virtio disk, where it never switched (6 and 8 rounds). In the daemon,
    A/B against the Storer alone (12 and 8 rounds): restores 1.04x on the fast disk at
    0.183 against 0.193 CPU s/GiB, switched every time; 1.00x on the virtio disk,
    switched once in eight. The daemon gains less than the loop: once the channels
    store, the one memory file's writes, one at a time, bound it (the channels waited
    for Storer.store_lock longer than they wrote or hashed)."""

    WINDOW = 32 << 20
    IDLE = 0.1

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads  # the Storer's
        self.inline = False  # the channels check and store their own runs
        self._lock = threading.Lock()
        self._bytes = 0  # stored in this window so far
        self._idle = 0.0  # seconds the Storer waited for runs in it
        self._since = time.monotonic()  # the window's start
        self._total = 0  # bytes stored by the Storer
        self._warm = False  # past the first window

    def stored(self, length: int, idle: float) -> None:
        """The Storer stored `length` bytes after waiting `idle` seconds for them."""
        if self.inline:
            return
        with self._lock:
            now = time.monotonic()
            self._bytes += length
            self._total += length
            self._idle += idle
            if self._bytes < self.WINDOW:
                return
            share = self._idle / max(1e-9, self.threads * (now - self._since))
            self._bytes, self._idle, self._since = 0, 0.0, now
            if not self._warm:  # the first window (the job's start, the first reads, the
                self._warm = True  # backlog of every channel's buffers filled at once)
                return
            if share >= self.IDLE or self.inline:
                return
            self.inline = True
        log.debug("the Storer was idle %.0f%% of its time over %d MiB: the channels check "
                  "and store their own runs from now on", 100 * share, self._total >> 20)


class Storer:
    """A restore's writer into memory files: takes the staged runs the channels have read
    into their buffers, checks their whole units, writes them into the memory file
    (BlockIO.store) and frees the buffer, while the channel reads its next run into its
    other buffer. So every channel keeps a read in flight: with the check and the write
    in the channel itself, restores into used memory on this machine's virtio disk ran at
    0.84x the mapped way (docs/bench/virtio-staging); a probe of the two (one writer per
    job, two buffers per channel) gave 2.23 against 1.73 GiB/s there. COPY_THREADS of
    them per job (one: writes into one tmpfs file serialize on its inode lock, and a
    second writer spent its CPU spinning on it).

    A failure (a unit's mismatch, the file cut short) cancels the job; the writer then
    goes on freeing the buffers queued to it, unwritten, until no_more(), and raises it.
    """

    def __init__(
        self,
        blocks: Sequence[BlockIO],
        checksums: UnitSink | None,
        threads: int = 1,
        pages: NewPages | None = None,
    ) -> None:
        self.blocks = blocks
        self.checksums = checksums
        self.threads = threads  # run() bodies
        self.pages = pages if pages is not None else NewPages()
        self.load = StorerLoad(threads)
        # The job's writes into its memory files, one at a time, whoever makes them (the
        # Storer, or the channels once they store their own runs): tmpfs takes them one
        # at a time anyway, under the file's inode lock, on which waiting writers spin;
        # on this lock they sleep (plain loops with four writers, fast disk: 8.82 GiB/s
        # at 0.113 CPU s/GiB against 8.78 at 0.127 without it; virtio disk 3.26 at 0.172
        # against 3.27 at 0.222; docs/bench/fast-disk/session26/shapes-*.txt).
        self.store_lock = threading.Lock()
        self.work: queue.SimpleQueue[tuple[PageRun, memoryview, threading.Semaphore] | None]
        self.work = queue.SimpleQueue()
        self.finished = threading.Event()  # every run() returned: nobody holds a buffer
        self._running = threads
        self._lock = threading.Lock()

    def put(self, run: PageRun, data: memoryview, free: threading.Semaphore) -> None:
        """Store `data`, the bytes of `run`, then release `free`."""
        self.work.put((run, data, free))

    def no_more(self) -> None:
        for _ in range(self.threads):
            self.work.put(None)

    def run(self, cancel: threading.Event) -> None:
        error: BaseException | None = None
        try:
            while True:
                waited = time.monotonic()
                if (item := self.work.get()) is None:
                    break
                waited = time.monotonic() - waited
                run, data, free = item
                try:
                    if error is None and not cancel.is_set():
                        self.store(run, data)
                        self.load.stored(len(data), waited)
                except BaseException as exc:
                    cancel.set()  # the channels stop at their next call
                    error = exc
                finally:
                    free.release()
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self.finished.set()
        if error is not None:
            raise error

    def store(self, run: PageRun, data: memoryview) -> None:
        """Check `data`, the bytes of `run`, and write them into its memory file (the
        Storer's threads, or a channel's once StorerLoad says so)."""
        block = self.blocks[run.block]
        store = block.store
        assert store is not None
        sums = self.checksums
        # Whole units are checked before a byte of them reaches the memory.
        rest = sums.landed(run.block, run.first_page, data) if sums is not None else []
        with self.store_lock:
            started = time.thread_time()
            store(data, run.first_page * PAGE_SIZE)
            self.pages.wrote(len(data), time.thread_time() - started)
        for first, count in rest:  # in memory now: the hashing threads read them there
            assert sums is not None
            sums.done(run.block, first, count)


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
        write_behind: bool = False,
        checksums: UnitSink | None = None,
        share: DiskShare | None = None,
        share_key: object = None,
        cached_fd: int | None = None,
        cursor: RunCursor | None = None,
        storer: Storer | None = None,
        staged: frozenset[int] = frozenset(),
        copying: threading.Semaphore | None = None,
    ) -> None:
        self.fd = fd
        self.path = path
        self.blocks = blocks
        self.work = work
        self.cancel = cancel
        self.throttle = throttle
        self.detect_zero = detect_zero
        self.counters = Counters()
        self.reader = MemoryReader()
        self.sizer = CallSizer(CHUNK_PAGES, throttle)
        self.checksums = checksums
        self.share, self.share_key = share, share_key
        # Buffered saves only: O_DIRECT leaves nothing dirty, restores only read.
        self.write_behind = WriteBehind(fd) if write_behind else None
        # Restores from O_DIRECT fds: runs the page cache holds are read through cached_fd.
        self.cached_fd = cached_fd
        self.probe = PageCacheProbe() if cached_fd is not None else None
        self.cursor = cursor
        # A restore's staged runs: two buffers, each free (1) or with the Storer (0)
        self.storer = storer
        # A direct-io save's blocks, read into the channel's own buffer (Staging) by one
        # channel of the job at a time (`copying`: COPY_THREADS says why)
        self.staged = staged
        self.copying = copying if copying is not None else threading.Semaphore(COPY_THREADS)
        self.save_buffer: Staging | None = None
        self.restore_buffers: list[tuple[Staging, threading.Semaphore]] = []
        self.next_buffer = 0

    def _drain(self, step: Callable[[PageRun], None], direction: str) -> None:
        try:
            while not self.cancel.is_set():
                run = self.work.get()
                if run is None:
                    return
                if self.cursor is not None:
                    self.cursor.taken += 1
                try:
                    step(run)
                except MemoryFault as fault:
                    raise self._explain(fault, run, direction) from None
        except BaseException:
            self.cancel.set()  # the job has failed: the other threads stop at their next run
            raise

    def _explain(self, fault: MemoryFault, run: PageRun, direction: str) -> MigdError:
        """The backend's account of an EFAULT (its file shrank, its filesystem is full), so
        that the job's error does not depend on which thread met the fault first."""
        explain = self.blocks[run.block].explain_fault
        return (explain(direction) if explain is not None else None) or fault

    def _slot(self) -> AbstractContextManager[bool]:
        """One of the daemon's I/O slots for the next call (False: cancelled meanwhile)."""
        if self.share is None:
            return nullcontext(True)
        return self.share.slot(self.share_key, self.cancel)

    def save(self) -> None:
        try:
            self._drain(self._save_run, "save")
        finally:
            if self.save_buffer is not None:
                STAGING.give([self.save_buffer])
                self.save_buffer = None

    def restore(self) -> None:
        try:
            self._drain(self._restore_run, "restore")
        finally:
            self._drop_staging()

    def _drop_staging(self) -> None:
        for _, free in self.restore_buffers:
            # The Storer may still hold it: wait until it lets go (or has stopped).
            while not free.acquire(timeout=0.05) and not self._storer_gone():
                pass
        STAGING.give([buffer for buffer, _ in self.restore_buffers])
        self.restore_buffers = []

    def _storer_gone(self) -> bool:
        return self.storer is None or self.storer.finished.is_set()

    def _free_buffer(self) -> tuple[Staging, threading.Semaphore] | None:
        """The next of this channel's two restore buffers, once the Storer is done with
        it; None if the job was cancelled (or the Storer stopped) meanwhile."""
        if not self.restore_buffers:
            self.restore_buffers = [(STAGING.take(), threading.Semaphore(1)) for _ in range(2)]
        buffer, free = self.restore_buffers[self.next_buffer]
        while not free.acquire(timeout=0.05):
            if self.cancel.is_set() or self._storer_gone():
                return None
        if self.storer is None or not self.storer.load.inline:
            # A channel that stores its own runs takes the same buffer again: the one
            # just read, hashed and written is in the CPU's caches (the plain loop of
            # that shape ran 1.04x the one with two buffers in turn).
            self.next_buffer ^= 1
        return buffer, free

    def _save_run(self, run: PageRun) -> None:
        block = self.blocks[run.block]
        if run.block in self.staged and block.content_fd is not None:
            self._save_staged(run, block, block.content_fd)
            return
        start = run.first_page * PAGE_SIZE
        memory = block.memory[start : start + run.pages * PAGE_SIZE]
        if self.detect_zero:
            pieces = runs_to_write(zero_pages(memory, reader=self.reader))
        else:
            touch_pages(memory)
            pieces = [(0, run.pages)]
        if not self._write_pieces(block, run.first_page, memory, pieces):
            return
        if self.checksums is not None:
            self.checksums.done(run.block, run.first_page, run.pages)

    def _save_staged(self, run: PageRun, block: BlockIO, fd: int) -> None:
        """A run of a staged block: a piece at a time read from the memory file into the
        channel's own buffer, zero-scanned and its whole units hashed there, then written
        from it (Staging). The reading, scanning and hashing under the job's `copying`
        semaphore (COPY_THREADS)."""
        if self.save_buffer is None:
            self.save_buffer = STAGING.take()
        buffer, sums = self.save_buffer, self.checksums
        for at in range(0, run.pages, STAGE_PAGES):
            first, pages = run.first_page + at, min(STAGE_PAGES, run.pages - at)
            while not self.copying.acquire(timeout=0.05):
                if self.cancel.is_set():
                    return
            try:
                data = buffer.fill(fd, first * PAGE_SIZE, pages)  # cut short: MemoryFault
                if self.detect_zero:
                    pieces = runs_to_write(zero_pages(data, reader=buffer.reader))
                else:
                    pieces = [(0, pages)]
                # Whole units hashed from the bytes about to be written; the others once
                # their pages are written (their bitmap bits say what they hold).
                rest = sums.landed(run.block, first, data) if sums is not None else []
            finally:
                self.copying.release()
            if not self._write_pieces(block, first, data, pieces):
                return
            for unit_first, count in rest:
                assert sums is not None
                sums.done(run.block, unit_first, count)

    def _write_pieces(
        self, block: BlockIO, first_page: int, data: memoryview, pieces: list[tuple[int, int]]
    ) -> bool:
        """Write the (first, count) pieces of `data`, which holds the block's pages from
        `first_page` on, and count the pages between them as zero pages skipped; False if
        the job was cancelled meanwhile."""
        counters = self.counters
        pages_total = len(data) // PAGE_SIZE
        passed = 0  # pages of the run dealt with so far: counted per call, not per run,
        # so that query-migrate moves at every poll under a low max-bandwidth
        for first, count in pieces:
            counters.pages_zero += first - passed  # the zero pages skipped before it
            counters.pages_done += first - passed
            at, end = first, first + count
            while at < end:
                if self.cancel.is_set():
                    return False
                pages = self.sizer.next(end - at)
                chunk = data[at * PAGE_SIZE : (at + pages) * PAGE_SIZE]
                offset = block.page_offset(first_page + at)
                self.throttle.wait(len(chunk), self.cancel)
                with self._slot() as granted:
                    if not granted:
                        return False
                    started = time.monotonic()
                    write_fully(self.fd, chunk, offset, self.path)
                    self.sizer.took(pages, time.monotonic() - started)
                block.present[first_page + at : first_page + at + pages] = True
                counters.bytes += len(chunk)
                counters.pages_normal += pages
                counters.pages_done += pages
                at += pages
                if self.write_behind is not None:
                    self.write_behind.wrote(offset, len(chunk))
            passed = end
        counters.pages_zero += pages_total - passed
        counters.pages_done += pages_total - passed
        return True

    def _restore_run(self, run: PageRun) -> None:
        block = self.blocks[run.block]
        if run.zero:
            if block.zero_range is not None:
                block.zero_range(run.first_page * PAGE_SIZE, run.pages * PAGE_SIZE)
            self.counters.pages_zero += run.pages
            self.counters.pages_done += run.pages
        elif (
            run.staged
            and block.store is not None
            and self.storer is not None
            and not self.storer.pages.dear  # then straight into the mapping (NewPages)
        ):
            self._restore_staged(run, block, self.storer, self._fd_for(run, block))
            return  # the Storer reports its units
        else:
            self._read_run(run, block, self._fd_for(run, block))
        if self.checksums is not None and not self.cancel.is_set():
            self.checksums.done(run.block, run.first_page, run.pages)

    def _restore_staged(self, run: PageRun, block: BlockIO, storer: Storer, fd: int) -> None:
        """A run read into one of the channel's two buffers and handed to the Storer,
        which checks and writes it while this channel reads its next run (Staging and
        Storer say why); or, once the Storer is found to bound the job, checked and
        written by this channel (StorerLoad)."""
        assert run.pages <= STAGE_PAGES
        taken = self._free_buffer()
        if taken is None:
            return
        buffer, free = taken
        data = buffer.view[: run.pages * PAGE_SIZE]
        try:
            read = self._read_run(run, block, fd, into=data)
        except BaseException:
            free.release()
            raise
        if not read:
            free.release()
            return
        if storer.load.inline:
            try:
                if not self.cancel.is_set():
                    storer.store(run, data)
            finally:
                free.release()
            return
        storer.put(run, data, free)

    def _fd_for(self, run: PageRun, block: BlockIO) -> int:
        """The buffered fd if the page cache holds most of the run (one cachestat call,
        about 2 us per MiB), else the channel's own."""
        probe, cached_fd = self.probe, self.cached_fd
        if probe is None or cached_fd is None:
            return self.fd
        offset = block.page_offset(run.first_page)
        cached = probe.mostly_cached(cached_fd, offset, run.pages * PAGE_SIZE)
        return cached_fd if cached else self.fd

    def _read_run(
        self, run: PageRun, block: BlockIO, fd: int, into: memoryview | None = None
    ) -> bool:
        """Read a run's pages into the block's memory, or into `into` (the run's bytes, a
        staging buffer); False if the job was cancelled meanwhile."""
        at, end = run.first_page, run.first_page + run.pages
        while at < end:
            if self.cancel.is_set():
                return False
            pages = self.sizer.next(end - at)
            if into is None:
                memory = block.memory[at * PAGE_SIZE : (at + pages) * PAGE_SIZE]
            else:
                start = (at - run.first_page) * PAGE_SIZE
                memory = into[start : start + pages * PAGE_SIZE]
            self.throttle.wait(len(memory), self.cancel)
            with self._slot() as granted:
                if not granted:
                    return False
                started = time.monotonic()
                read_fully(fd, memory, block.page_offset(at), self.path)
                self.sizer.took(pages, time.monotonic() - started)
            self.counters.bytes += len(memory)
            if fd != self.fd:
                self.counters.bytes_cached += len(memory)
            self.counters.pages_normal += pages
            self.counters.pages_done += pages
            at += pages
        return True


class RunCursor:
    """How many runs the channels have taken from their queue, for the Populator to keep
    ahead of them. A hint: concurrent `+=` may lose a count, which only makes the
    populator map a run a channel already has."""

    def __init__(self) -> None:
        self.taken = 0


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

    It maps only runs ahead of the channels (RunCursor): on a disk faster than it maps
    (ext4 over a loop device on tmpfs, issue 19), it fell behind and went on mapping runs
    the channels had already read, walking every page twice. Skipping those, restores of
    1.5 GiB into used memory went from 2.80 to 3.15 GiB/s and from 0.51 to 0.43 s of system
    CPU per GiB (4 rounds each, one daemon, modes alternated); saves, restores into a new
    file, and everything on the virtio disk measured the same (docs/bench/fast-disk).

    For a staged restore's runs (Staging) it only allocates the memory file's pages
    (fallocate: the block's populate is MemoryBackend.allocate), mapping nothing, which a
    staged write that overtakes it does instead. Once writing into new pages turns out
    dear (NewPages), the channels read the rest of the runs into the mapping, and it maps
    their memory ahead as for any mapped run (BlockIO.map_in), in THREADS threads.
    """

    # Threads once new pages are dear: mapping them is the restore's bound then, and page
    # faults of two threads run in parallel (2 GiB into a new file with dear pages: one
    # populator 2.9-5.3 s, two 2.5-3.2; docs/bench/fast-disk/README.md).
    THREADS = 2

    def __init__(
        self,
        blocks: Sequence[BlockIO],
        runs: Sequence[PageRun],
        cancel: threading.Event,
        cursor: RunCursor,
        unmapped: frozenset[int] = frozenset(),
        pages: NewPages | None = None,
    ) -> None:
        self.blocks = blocks
        # (index in the channels' queue, run): the queue holds every run, zero ones too;
        # `unmapped` blocks are not reached through their mapping (a staged save's)
        self.runs = [
            (index, run)
            for index, run in enumerate(runs)
            if not run.zero and blocks[run.block].populate is not None and run.block not in unmapped
        ]
        self.cancel = cancel
        self.cursor = cursor
        self._next = iter(self.runs)  # shared by the threads
        self._lock = threading.Lock()
        self.pages = pages
        # Set once new pages are dear, or once the first thread has ended: the others
        # start, or go.
        self._wake = pages.waiter() if pages is not None else threading.Event()
        staged = any(blocks[run.block].map_in is not None for _, run in self.runs)
        # Its bodies: run, then run_once_dear in the others.
        self.threads = self.THREADS if staged and pages is not None else 1

    def run(self) -> None:
        """The first thread's body."""
        try:
            self._work()
        finally:
            self._wake.set()  # the others go, if not dear yet

    def run_once_dear(self) -> None:
        """Another thread's body: it joins the first once new pages are dear. Started after
        the first (whose end wakes it whatever happens), from an uncapped pool."""
        self._wake.wait()
        if self.pages is not None and self.pages.dear:
            self._work()

    def _take(self) -> tuple[int, PageRun] | None:
        with self._lock:
            return next(self._next, None)

    def _work(self) -> None:
        try:
            while (item := self._take()) is not None:
                index, run = item
                if self.cancel.is_set():
                    return
                if index <= self.cursor.taken:
                    # Taken by a channel already, or next: it faults those pages in as it
                    # reads, and mapping them here as well would only walk them twice.
                    continue
                block = self.blocks[run.block]
                dear = self.pages is not None and self.pages.dear
                populate = block.map_in if block.map_in is not None and dear else block.populate
                assert populate is not None
                populate(run.first_page * PAGE_SIZE, run.pages * PAGE_SIZE)
        except BaseException:
            self.cancel.set()  # out of memory: the reads would fail too, with EFAULT
            raise


# Worker threads run this much nicer than the daemon (Linux: nice is per thread), so that
# the event loop thread, which answers every client, wins the CPU when it wakes while the
# jobs' threads keep both cores busy (populating memory, pinning pages for O_DIRECT,
# hashing). 8 concurrent 512 MiB restores (migd.bench.concurrency, daemons alternated):
# query-jobs p99 per phase 14-39 ms at +0, 10-17 ms at +5 (one phase 76), 10-18 ms at +10,
# 15-19 ms at +19, with the same throughput (docs/jobs.md).
WORKER_NICE = 5


def _lower_priority() -> None:
    """ThreadPoolExecutor initializer: this thread WORKER_NICE nicer than it was (relative,
    so that a daemon started with Nice= keeps its place among other processes)."""
    tid = threading.get_native_id()
    try:
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, nice + WORKER_NICE))
    except OSError as exc:  # a sandbox may forbid it: the jobs still run, just less politely
        log.debug("cannot lower a worker thread's priority: %s", exc)


class WorkerPool:
    """The threads every transfer's channels, populator and hashing threads run in, kept
    across transfers.

    Creating some 40 threads when 8 jobs start at once (each one mmaps a stack under the
    process's mm lock, which the other jobs' populators hold while they map memory) kept
    the event loop from answering for 30-55 ms (query-jobs p99 13-55 ms in
    migd.bench.concurrency); with WARM idle threads made beforehand, 9-15 ms. There is no
    cap on the threads: a transfer's hashing threads wait for its channels, so a capped
    pool could deadlock. A thread is named after the work it runs (`migd-save`, ...)
    while it runs it, and `idle worker` between.
    """

    WARM = 64

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    1 << 16, thread_name_prefix="idle worker", initializer=_lower_priority
                )
                ready = threading.Barrier(self.WARM + 1)
                for _ in range(self.WARM):  # each holds its thread until all have started
                    self._executor.submit(ready.wait)
                ready.wait()
            return self._executor

    def warm(self) -> None:
        """Start the WARM idle threads now (the daemon does it before it serves)."""
        self._pool()

    def submit(
        self, name: str, body: Callable[..., None], *args: object
    ) -> concurrent.futures.Future[Any]:
        def named() -> None:
            thread = threading.current_thread()
            idle, thread.name = thread.name, name
            try:
                body(*args)
            finally:
                thread.name = idle

        return self._pool().submit(named)


WORKERS = WorkerPool()


class ThreadEngine:
    """The default IOEngine: a thread per channel fd and a Populator, in a pool per run."""

    async def run(self, transfer: Transfer) -> None:
        try:
            await self._run(transfer)
        finally:
            # The staging buffers this job gave back go once no job took them again. In an
            # empty context: the job task's own (its running job, its uid's pool) would
            # keep the job and all it holds alive until the timer ran.
            asyncio.get_running_loop().call_later(
                StagingPool.IDLE + 0.5, STAGING.trim, context=contextvars.Context()
            )

    async def _run(self, transfer: Transfer) -> None:
        stage = transfer.stage_saves and transfer.direction == "save"
        staged = frozenset(
            i
            for i, block in enumerate(transfer.blocks)
            if stage and block.content_fd is not None and not block.huge_pages
        )
        work: queue.SimpleQueue[PageRun | None] = queue.SimpleQueue()
        for run in transfer.runs:
            work.put(run)
        for _ in transfer.fds:
            work.put(None)
        cancel = transfer.cancel
        if transfer.cached_fd is not None:
            # No readahead through the buffered fd: it reads only runs the page cache
            # mostly holds, and the disk's readahead (8 MiB here) would pull the next runs
            # into the cache, so that they too look cached and go buffered, and a restore
            # of a file that was not cached at all ends up read through the page cache
            # (measured: verify-on restores slowed to 0.90x, the whole file left cached).
            os.posix_fadvise(transfer.cached_fd, 0, 0, os.POSIX_FADV_RANDOM)
        cursor = RunCursor()  # the channels' progress through the queue, for the populator
        # A restore with staged runs: one thread writes them into the memory files.
        storer = None
        if transfer.direction == "restore" and any(run.staged for run in transfer.runs):
            storer = Storer(transfer.blocks, transfer.checksums, COPY_THREADS, NewPages())
        copying = threading.Semaphore(COPY_THREADS)  # a staged save's channels' reads
        channels = [
            Channel(
                fd,
                transfer.path,
                transfer.blocks,
                work,
                cancel,
                transfer.throttle,
                transfer.detect_zero,
                transfer.write_behind,
                transfer.checksums,
                transfer.share,
                transfer.cancel,  # the job's own event: its identity among the share's jobs
                transfer.cached_fd,
                cursor,
                storer,
                staged,
                copying,
            )
            for fd in transfer.fds
        ]
        transfer.counters.extend(ch.counters for ch in channels)
        # The populator is first in the list, so that its error (out of memory, on restore)
        # is the one reported, not the EFAULT that reads into memory that cannot be
        # allocated get meanwhile.
        populator = Populator(transfer.blocks, transfer.runs, cancel, cursor, staged,
                              storer.pages if storer is not None else None)  # fmt: skip
        threads: list[Channel | Populator] = [populator, *channels]
        bodies = [
            populator.run,
            *[populator.run_once_dear] * (populator.threads - 1),
            *(getattr(ch, transfer.direction) for ch in channels),
        ]
        del channels
        sums = transfer.checksums
        hashers = transfer.hash_threads if sums is not None else 0
        name = f"migd-{transfer.direction}"
        submitted: list[concurrent.futures.Future[Any]] = []

        def start(body: Callable[..., None], *args: object) -> asyncio.Future[Any]:
            future = WORKERS.submit(name, body, *args)
            submitted.append(future)
            return asyncio.wrap_future(future)

        hashing = []
        storing = []
        units_ended = False

        def end_units() -> None:
            """Once, after the channels and the Storer: the hashing threads finish the
            units queued so far (the Storer queues some), then end."""
            nonlocal units_ended
            if sums is not None and not units_ended:
                units_ended = True
                sums.no_more_units(hashers)

        try:
            if sums is not None:
                hashing = [start(sums.hash_queued, cancel) for _ in range(hashers)]
            if storer is not None:
                storing = [start(storer.run, cancel) for _ in range(storer.threads)]
            futures = [start(body) for body in bodies]
            try:
                results = await asyncio.gather(*futures, return_exceptions=True)
            finally:
                # The channels have stopped (or are told to, below): the Storer writes
                # what they handed it, then ends.
                if storer is not None:
                    storer.no_more()
            # The Storer's error (a mismatch, the file cut short) after the channels'.
            results += await asyncio.gather(*storing, return_exceptions=True)
            end_units()
            # A hashing thread's error (a restore's mismatch) comes after the
            # channels' own: a channel that failed first is the cause.
            results += await asyncio.gather(*hashing, return_exceptions=True)
        except BaseException:
            # This task cancelled, or a thread that could not start: the workers must be
            # told to stop, and waited for, before the memory and fds they use go away.
            cancel.set()
            end_units()
            if storer is not None:
                storer.no_more()  # a second end marker, should the first not be in yet
            concurrent.futures.wait(submitted)
            raise
        for thread in threads:
            thread.blocks = ()  # drop the mmap views so object-del really unmaps afterwards
        if storer is not None:
            storer.blocks = ()
        del threads, bodies
        failures = [r for r in results if isinstance(r, BaseException)]
        del results, futures
        hashing.clear()  # they, too, hold the workers' errors and so their frames
        storing.clear()
        submitted.clear()
        if failures:
            cancel.set()
            # The thread frames an error reaches hold views of the backends' mappings:
            # cut them (and any cycle through this frame) so object-del can unmap at once.
            error = failures.pop(0)
            error.__context__ = error.__cause__ = None
            try:
                raise error.with_traceback(None)
            finally:
                del error, failures
