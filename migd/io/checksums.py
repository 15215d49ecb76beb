"""Unit checksums of page data: what lets a save prove its own content (docs/checksums.md).

A block's pages are cut into units of UNIT_PAGES (1 MiB; the last unit of a block may be
shorter). A unit's checksum is the xxh3-128 of its memory image: the bytes of its present
pages in order, and PAGE_SIZE zero bytes for every absent page (a zero page the save
skipped, a hole), which is exactly what the unit holds in memory after a restore. So the
checksum does not depend on how a save split its writes, on the channel count, or on
which pages were skipped: a file saved with N channels verifies with M, and a bitmap bit
that flips makes its unit fail too.

Hashing never reads the backends' mappings from user space (io/threads.py's rule): a
unit's present pages are copied through the kernel (MemoryReader.copy) a 1 MiB chunk at
a time and hashed there; absent pages are hashed from a zero buffer, never read, so that
checking a restore does not allocate the holes of a tmpfs file. xxh3-128 runs at about
70 GiB/s here (14 us per MiB) and xxhash's update releases the GIL, as the copy does;
the copy (6-8 GiB/s a thread) is most of a checksum's cost (docs/bench/checksums/).

The channel that completes a unit (its last pages written, read or zeroed, by whichever
channel) hands it to the job's hashing threads at once (engine.HASH_THREADS, run by the I/O
engine beside the channels): a save records the digest, a restore compares it with the
file's and fails the job on the first mismatch. Hashing in the channel itself kept that
channel from having its next I/O in flight for the copy and the hash of every MiB it
completed: measured with 4 channels, 2 GiB, direct-io on this machine's disk, saves ran
at 0.84x and restores at 0.85x of their speed without checksums; with the hashing in
threads of its own, the disk never waits for a hash (docs/bench/checksums).
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
from collections.abc import Callable, Sequence

import numpy as np
import xxhash

from ..errors import MemoryFault, MigrationError
from ..pages import PAGE_SIZE
from ..runs import true_runs
from .digests import DIGEST_BYTES, UNIT_BYTES, UNIT_PAGES, digest, unit_count
from .engine import BlockIO, PageRun
from .threads import WORKERS
from .zero_scan import SCAN_CHUNK_PAGES, MemoryReader, address_of

_ZEROS = memoryview(bytes(UNIT_BYTES))

# (first page, pages) -> the bytes of those pages, valid until the next call.
PageSource = Callable[[int, int], memoryview]


class ChecksumMismatch(MigrationError):
    """A unit's content does not match the checksum its save recorded."""


@functools.lru_cache(maxsize=4)
def zero_unit_digest(pages: int = UNIT_PAGES) -> bytes:
    """The checksum of a unit of `pages` absent (zero) pages."""
    return xxhash.xxh3_128_digest(_ZEROS[: pages * PAGE_SIZE])


def unit_digest(present: np.ndarray, first: int, read: PageSource) -> bytes:
    """The checksum of the unit whose pages start at page `first`; `present` is the unit's
    slice of the bitmap, `read(page, count)` gives present pages' bytes (count <=
    SCAN_CHUNK_PAGES)."""
    if not present.any():
        return zero_unit_digest(present.size)
    if present.size <= SCAN_CHUNK_PAGES and present.all():  # the common case, in one read
        return xxhash.xxh3_128_digest(read(first, present.size))
    hasher = xxhash.xxh3_128()
    pos = 0
    for start, stop in zip(*(r.tolist() for r in true_runs(present)), strict=True):
        if start > pos:
            hasher.update(_ZEROS[: (start - pos) * PAGE_SIZE])
        for at in range(start, stop, SCAN_CHUNK_PAGES):
            hasher.update(read(first + at, min(SCAN_CHUNK_PAGES, stop - at)))
        pos = stop
    if pos < present.size:
        hasher.update(_ZEROS[: (present.size - pos) * PAGE_SIZE])
    return hasher.digest()


def memory_source(block: BlockIO, reader: MemoryReader) -> PageSource:
    """A PageSource over a block's memory, read through the kernel: from the memory file
    where the mapping shares its page cache (about half the CPU time: no page table walk
    and pinning per page), else from the mapping with process_vm_readv."""
    fd = block.content_fd
    if fd is not None:
        return lambda page, count: reader.pread(fd, page * PAGE_SIZE, count)
    base = address_of(block.memory)
    return lambda page, count: reader.copy(base + page * PAGE_SIZE, count)


def file_source(block: BlockIO, fd: int, reader: MemoryReader) -> PageSource:
    """A PageSource over a block's pages as the job's file holds them (their slots start
    at block.pages_offset), read through a buffered fd."""
    return lambda page, count: reader.pread(fd, block.pages_offset + page * PAGE_SIZE, count)


def hash_memory(
    blocks: Sequence[BlockIO], threads: int, cancel: threading.Event
) -> list[bytearray]:
    """Every unit's checksum of the blocks' memory as it is now, absent pages or not:
    the digests a save of this memory records (a page that is zero in memory is a zero
    page of the save). For an update of a save (migration/mapped_ram/update.py): memory
    that stands still (a stopped guest), read through the kernel by `threads` threads."""
    digests = [bytearray(unit_count(b.pages) * DIGEST_BYTES) for b in blocks]
    work = [(i, u) for i, b in enumerate(blocks) for u in range(unit_count(b.pages))]
    lock = threading.Lock()

    def drain() -> None:
        reader = MemoryReader()
        try:
            while not cancel.is_set():
                with lock:
                    if not work:
                        return
                    index, unit = work.pop()
                block = blocks[index]
                start = unit * UNIT_PAGES
                pages = _unit_pages(block, unit)
                try:
                    got = unit_digest(
                        np.ones(pages, dtype=bool), start, memory_source(block, reader)
                    )
                except MemoryFault as fault:
                    raise _saved_fault(block, fault) from None
                digests[index][unit * DIGEST_BYTES : (unit + 1) * DIGEST_BYTES] = got
        except BaseException:
            cancel.set()
            raise

    # In the daemon's worker threads, as the channels' (io/threads.py WorkerPool: made
    # beforehand, nicer than the event loop).
    futures = [WORKERS.submit("migd-hash", drain) for _ in range(max(1, threads))]
    concurrent.futures.wait(futures)
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error
    return digests


def _saved_fault(block: BlockIO, fault: MemoryFault) -> BaseException:
    """The backend's account of a fault while its memory is hashed for a save."""
    explained = block.explain_fault("save") if block.explain_fault is not None else None
    return explained or fault


class UnitChecksums:
    """One job's unit checksums: recorded by a save, checked by a restore.

    `expected`: None to record (a save), else per block the digests the file holds, or
    None for a block that is not checked. Thread safe: channels call `done` for the pages
    they have finished, and the one that finishes a unit hashes it.
    """

    def __init__(
        self,
        blocks: Sequence[BlockIO],
        path: str,
        expected: Sequence[bytes | None] | None,
        runs: Sequence[PageRun],
        digests: Sequence[bytearray] | None = None,
    ) -> None:
        self.blocks = blocks
        self.path = path
        self.expected = expected
        # A buffered fd of the job's own file (set_file), or None. A save hashes the units
        # its channels report from it, so that the table describes what the file holds
        # even where memory changed after its pages were written; a restore reads a
        # mismatching unit back from it, to say whether the file or the memory is to blame.
        self.file_fd: int | None = None
        self.digests = [bytearray(unit_count(b.pages) * DIGEST_BYTES) for b in blocks]
        if digests is not None:  # known already (UnitChecksums.recorded): nothing to hash
            self.digests = list(digests)
        self._lock = threading.Lock()
        # (block index, unit) completed by the channels, not hashed yet; None: no more.
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        # Pages of each unit that the engine will report, not reported yet; a unit reaching
        # 0 is hashed. Pages in no run (a save's file holes) are zero and never reported.
        self._left = [np.zeros(unit_count(b.pages), dtype=np.int64) for b in blocks]
        for run in runs:
            left = self._left[run.block]
            at, end = run.first_page, run.first_page + run.pages
            while at < end:
                unit = at // UNIT_PAGES
                step = min(end, (unit + 1) * UNIT_PAGES) - at
                left[unit] += step
                at += step
        checked = [expected is None or expected[i] is not None for i in range(len(blocks))]
        self.units_total = sum(
            unit_count(b.pages) for b, on in zip(blocks, checked, strict=True) if on
        )
        self.units_done = 0  # hashed (and, on a restore, matched)
        if digests is not None:
            self.units_done = self.units_total
            return
        for index, (block, on) in enumerate(zip(blocks, checked, strict=True)):
            idle: list[int] = np.flatnonzero(self._left[index] == 0).tolist() if on else []
            for unit in idle:  # all holes: zeros, nothing to read or wait for
                self._record(index, block, unit, zero_unit_digest(_unit_pages(block, unit)))

    @classmethod
    def recorded(
        cls, blocks: Sequence[BlockIO], path: str, digests: Sequence[bytearray]
    ) -> UnitChecksums:
        """A save's checksums known already (an update hashed them before it wrote,
        a live save read them back): nothing left to hash."""
        return cls(blocks, path, None, [], digests)

    def set_file(self, fd: int) -> None:
        """The job's file through a buffered fd (see file_fd). For a save, only where its
        pages go through the page cache: there the read back costs what reading the
        memory does; after O_DIRECT writes it would be a second read of the disk."""
        self.file_fd = fd

    def release(self) -> None:
        """Drop the views of the backends' memory once the transfer is over: the job
        outlives it (query-migrate), and object-del must be able to unmap."""
        self.blocks = ()

    def done(self, block_index: int, first_page: int, pages: int) -> None:
        """Pages [first_page, first_page + pages) of a block are in place: queue every unit
        this completes for the hashing threads (hash_queued)."""
        if self.expected is not None and self.expected[block_index] is None:
            return
        left = self._left[block_index]
        first_unit, last_unit = first_page // UNIT_PAGES, (first_page + pages - 1) // UNIT_PAGES
        with self._lock:
            for unit in range(first_unit, last_unit + 1):
                lo = max(first_page, unit * UNIT_PAGES)
                hi = min(first_page + pages, (unit + 1) * UNIT_PAGES)
                left[unit] -= hi - lo
                if left[unit] == 0:
                    self._queue.put((block_index, unit))

    def landed(self, block_index: int, first_page: int, data: memoryview) -> list[tuple[int, int]]:
        """Pages [first_page, first_page + len(data) / PAGE_SIZE) of a block are `data`,
        the very bytes moved (a save channel's staging buffer, io/threads.py Staging): each
        unit they cover whole, and no other run touches, is hashed from `data` here, with
        no second read of the memory. Returns the (first page, pages) pieces of the other
        units, for `done` (they are read back from memory by the hashing threads).

        Pages a save skipped as zero are zero bytes in `data` too, so a unit's digest from
        `data` is the digest of its memory image (absent pages as zeros), as unit_digest's."""
        pages = len(data) // PAGE_SIZE
        end = first_page + pages
        if self.expected is not None and self.expected[block_index] is None:
            return []
        block = self.blocks[block_index]
        left = self._left[block_index]
        whole = []
        with self._lock:
            unit = -(-first_page // UNIT_PAGES)
            while unit * UNIT_PAGES < block.pages and (
                unit * UNIT_PAGES + _unit_pages(block, unit) <= end
            ):
                if left[unit] == _unit_pages(block, unit):  # all its pages are these
                    left[unit] = 0
                    whole.append(unit)
                unit += 1
        for unit in whole:
            at = (unit * UNIT_PAGES - first_page) * PAGE_SIZE
            got = digest(data[at : at + _unit_pages(block, unit) * PAGE_SIZE])
            self._record(block_index, block, unit, got)
        rest, taken, at = [], set(whole), first_page
        while at < end:
            unit = at // UNIT_PAGES
            stop = min(end, (unit + 1) * UNIT_PAGES)
            if unit not in taken:
                rest.append((at, stop - at))
            at = stop
        return rest

    def no_more_units(self, threads: int) -> None:
        """Every channel has stopped: each of `threads` hashing threads ends once the
        units queued before this are hashed."""
        for _ in range(threads):
            self._queue.put(None)

    def hash_queued(self, cancel: threading.Event) -> None:
        """A hashing thread's body: hash each queued unit until no_more_units; on a
        restore, raise ChecksumMismatch for the first unit that differs. Stops early once
        `cancel` is set, and sets it on any error, so that the channels stop too."""
        reader = MemoryReader()
        try:
            while (item := self._queue.get()) is not None:
                if cancel.is_set():
                    continue  # drain to the end marker: the job is over
                block_index, unit = item
                block = self.blocks[block_index]
                start = unit * UNIT_PAGES
                stop = min(start + UNIT_PAGES, block.pages)
                saving = self.expected is None
                file_fd = self.file_fd if saving else None  # a restore reads back memory
                from_file = file_fd is not None
                source = (
                    file_source(block, file_fd, reader)
                    if file_fd is not None
                    else memory_source(block, reader)
                )
                try:
                    got = unit_digest(block.present[start:stop], start, source)
                except MemoryFault as fault:
                    if from_file:  # the save file itself read short: cut under the save
                        raise MigrationError(
                            f"Could not read '{self.path}' back for its checksums: it is "
                            "shorter than the pages just written to it (cut by another "
                            "process?)"
                        ) from None
                    # The backend's account (its file shrank), as the channels give it:
                    # the job's error must not depend on which thread met the fault.
                    explain = block.explain_fault
                    direction = "save" if saving else "restore"
                    raise (explain(direction) if explain is not None else None) or fault from None
                except OSError as exc:
                    if not from_file:
                        raise
                    raise MigrationError(
                        f"Could not read '{self.path}' back for its checksums: {exc.strerror}"
                    ) from None
                if not saving and not self._matches(block_index, unit, got):
                    self._blame_memory_or_file(block_index, block, unit, reader)
                self._record(block_index, block, unit, got)
        except BaseException:
            cancel.set()
            raise

    def _matches(self, block_index: int, unit: int, got: bytes) -> bool:
        want = self.expected[block_index] if self.expected is not None else None
        at = unit * DIGEST_BYTES
        return want is None or want[at : at + DIGEST_BYTES] == got

    def _blame_memory_or_file(
        self, block_index: int, block: BlockIO, unit: int, reader: MemoryReader
    ) -> None:
        """A restored unit read back from memory does not match: raise the cause. The unit
        is read again from the file: if the file's bytes match, the file is intact and
        the memory changed after the pages landed (another process wrote or punched the
        memory file); saying "the file is corrupt" then could get a good save deleted."""
        if self.file_fd is None:
            return  # _record says the file is corrupt, as before
        start = unit * UNIT_PAGES
        stop = min(start + UNIT_PAGES, block.pages)
        try:
            in_file = unit_digest(
                block.present[start:stop], start, file_source(block, self.file_fd, reader)
            )
        except (MemoryFault, OSError):
            return  # the file cannot even be read back: it is the file
        if self._matches(block_index, unit, in_file):
            raise MigrationError(
                f"The memory of ramblock '{block.name}' changed during the restore: the "
                f"{(stop - start) * PAGE_SIZE} bytes from byte {start * PAGE_SIZE:#x} no longer "
                f"hold what '{self.path}' holds there, which matches its checksum (another "
                "process wrote to or punched the memory file?); the file is intact"
            )

    def _record(self, block_index: int, block: BlockIO, unit: int, got: bytes) -> None:
        """A save keeps a unit's digest; a restore compares it with the file's."""
        at = unit * DIGEST_BYTES
        if self.expected is None:
            self.digests[block_index][at : at + DIGEST_BYTES] = got
        else:
            want = self.expected[block_index]
            assert want is not None
            if want[at : at + DIGEST_BYTES] != got:
                raise ChecksumMismatch(
                    mismatch_text(self.path, block.name, block.pages_offset, block.pages, unit)
                )
        with self._lock:
            self.units_done += 1


def _unit_pages(block: BlockIO, unit: int) -> int:
    return min(UNIT_PAGES, block.pages - unit * UNIT_PAGES)


def mismatch_text(path: str, name: str, pages_offset: int, pages: int, unit: int) -> str:
    """The error for a unit whose content does not match its checksum."""
    start = unit * UNIT_PAGES
    stop = min(start + UNIT_PAGES, pages)
    return (
        f"'{path}': checksum mismatch in ramblock '{name}' at file offset "
        f"{pages_offset + start * PAGE_SIZE:#x} (the {(stop - start) * PAGE_SIZE} bytes from "
        f"byte {start * PAGE_SIZE:#x} of the block): the file is corrupt"
    )
