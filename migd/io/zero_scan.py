"""The zero scan: which pages of a backend's mapping hold only zero bytes, read through
the kernel (process_vm_readv) so that a memory file cut short by another process is
EFAULT (MemoryFault), never SIGBUS; and the runs a save writes around the zero runs.

Hot path of every save: moved here from channels.py unchanged.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from typing import Protocol

import numpy as np

from ..errors import MemoryFault
from ..pages import CHUNK_PAGES, MIN_SKIP_PAGES, PAGE_SIZE
from ..runs import true_runs

log = logging.getLogger(__name__)
_WORDS_PER_PAGE = PAGE_SIZE // 8


# Reading the mapping from user space (numpy) would die of SIGBUS, which Python cannot
# catch, once another process cuts the memory file short under it. Read through the
# kernel instead: process_vm_readv on our own pid reports such a page as EFAULT.
_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_process_vm_readv.restype = ctypes.c_ssize_t
_madvise = _libc.madvise  # a ctypes call releases the GIL, as memory.py's
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int
_MADV_POPULATE_READ = 22
_IOV_MAX = 1024  # iovecs per process_vm_readv call (UIO_MAXIOV)
# Candidate zero runs are copied and scanned in pieces this size, small enough to stay
# in the CPU's cache between the copy and the scan.
SCAN_CHUNK_PAGES = 256


# Set once process_vm_readv fails with EPERM or ENOSYS (a seccomp filter: systemd 252's
# @system-service lacks it); reads then go the old way, from user space.
_kernel_reads_refused = False


def address_of(memory: memoryview) -> int:
    """The address of a buffer's first byte (read-only buffers included)."""
    return int(np.frombuffer(memory, dtype=np.uint8).ctypes.data)


class MemoryReader:
    """Reads a mapping through the kernel, with buffers kept for one thread's scans."""

    def __init__(self) -> None:
        # struct iovec[]: (base, len) pairs; every remote piece is one page's first word.
        self._remote = np.empty((_IOV_MAX, 2), dtype=np.uint64)
        self._index = np.arange(_IOV_MAX, dtype=np.uint64)
        self._local = np.empty(2, dtype=np.uint64)
        self._words = np.empty(CHUNK_PAGES, dtype=np.uint64)
        self._chunk = np.empty((SCAN_CHUNK_PAGES, _WORDS_PER_PAGE), dtype=np.uint64)
        self._chunk_bytes = self._chunk.reshape(-1).view(np.uint8).data  # the same memory

    def _readv(self, into: int, length: int, count: int) -> None:
        """process_vm_readv of `count` pieces described in self._remote into one buffer."""
        global _kernel_reads_refused
        if not _kernel_reads_refused:
            self._local[0], self._local[1] = into, length
            done = _process_vm_readv(
                os.getpid(), self._local.ctypes.data, 1, self._remote.ctypes.data, count, 0
            )
            if done == length:
                return
            if done >= 0 or ctypes.get_errno() not in (errno.EPERM, errno.ENOSYS):
                # -1 with EFAULT, or short: a page past the end of a file cut short
                raise MemoryFault(f"Could not read memory: {os.strerror(errno.EFAULT)}")
            _kernel_reads_refused = True
            log.warning(
                "process_vm_readv is refused here (a seccomp filter? migd.service allows "
                "it): the zero scan reads memory directly, and a memory file cut short by "
                "another process during a save can now kill migd with SIGBUS"
            )
        self._copy_directly(into, count)

    def _copy_directly(self, into: int, count: int) -> None:
        """What _readv does, from user space: only where process_vm_readv is refused."""
        for base, length in self._remote[:count].tolist():
            ctypes.memmove(into, base, length)
            into += length

    def first_words(self, address: int, pages: int, step: int) -> np.ndarray:
        """The first 8 bytes of pages 0, step, 2*step... of the `pages` from `address` on."""
        count_all = -(-pages // step)
        if count_all > self._words.size:
            self._words = np.empty(count_all, dtype=np.uint64)
        words = self._words[:count_all]
        self._remote[:, 1] = 8
        for at in range(0, count_all, _IOV_MAX):
            count = min(_IOV_MAX, count_all - at)
            bases = self._remote[:count, 0]
            np.multiply(self._index[:count], step * PAGE_SIZE, out=bases)
            bases += address + at * step * PAGE_SIZE
            self._readv(words[at:].ctypes.data, count * 8, count)
        return words

    def copy(self, address: int, pages: int) -> memoryview:
        """Up to SCAN_CHUNK_PAGES pages from `address`, copied through the kernel into this
        reader's buffer (valid until its next call): what the checksums hash."""
        assert pages <= SCAN_CHUNK_PAGES
        self._remote[0] = address, pages * PAGE_SIZE
        self._readv(self._chunk.ctypes.data, pages * PAGE_SIZE, 1)
        return self._chunk_bytes[: pages * PAGE_SIZE]

    def pread(self, fd: int, offset: int, pages: int) -> memoryview:
        """Up to SCAN_CHUNK_PAGES pages of a memory file from `offset`, read into this
        reader's buffer (valid until its next call). A file cut short under the mapping
        reads short: MemoryFault, as copy() reports it."""
        assert pages <= SCAN_CHUNK_PAGES
        data = self._chunk_bytes[: pages * PAGE_SIZE]
        read_memory_file(fd, data, offset)
        return data

    def zero_pages(self, address: int, out: np.ndarray) -> None:
        """out[i] = whether page i from `address` holds only zero bytes."""
        for at in range(0, out.size, SCAN_CHUNK_PAGES):
            count = min(SCAN_CHUNK_PAGES, out.size - at)
            chunk = self._chunk[:count]
            self._remote[0] = address + at * PAGE_SIZE, count * PAGE_SIZE
            self._readv(chunk.ctypes.data, count * PAGE_SIZE, 1)
            # bitwise_or.reduce runs without the GIL and needs no casting: it scales across
            # channel threads where np.any does not (measured on tmpfs-backed memory).
            out[at : at + count] = np.bitwise_or.reduce(chunk, axis=1) == 0


def read_memory_file(fd: int, data: memoryview, offset: int) -> None:
    """Fill `data` from a memory file at `offset`. A file cut short under its mapping
    reads short: MemoryFault, as reading the mapping through the kernel reports it."""
    done = 0
    while done < len(data):
        got = os.preadv(fd, [data[done:]], offset + done)
        if got == 0:
            raise MemoryFault(f"Could not read memory: {os.strerror(errno.EFAULT)}")
        done += got


class PageWords(Protocol):
    """What the zero scan reads memory with: MemoryReader (a mapping, through the kernel)
    or BufferReader (a buffer of migd's own)."""

    def first_words(self, address: int, pages: int, step: int) -> np.ndarray: ...

    def zero_pages(self, address: int, out: np.ndarray) -> None: ...


class BufferReader:
    """The zero scan over a buffer migd owns (a save channel's staging buffer,
    io/threads.py Staging): read in place with numpy, no copy and no kernel call, since no
    other process can cut such a buffer short. Addresses are those of `buffer`'s bytes."""

    def __init__(self, buffer: memoryview) -> None:
        self._base = address_of(buffer)
        self._words = np.frombuffer(buffer, dtype=np.uint64)

    def _at(self, address: int) -> int:
        return (address - self._base) // 8

    def first_words(self, address: int, pages: int, step: int) -> np.ndarray:
        at = self._at(address)
        return self._words[at : at + pages * _WORDS_PER_PAGE : step * _WORDS_PER_PAGE]

    def zero_pages(self, address: int, out: np.ndarray) -> None:
        at = self._at(address)
        pages = self._words[at : at + out.size * _WORDS_PER_PAGE].reshape(-1, _WORDS_PER_PAGE)
        out[:] = np.bitwise_or.reduce(pages, axis=1) == 0


def zero_pages(
    memory: memoryview, min_run: int = MIN_SKIP_PAGES, reader: PageWords | None = None
) -> np.ndarray:
    """One bool per page: True for the pages of every run of at least `min_run` pages
    that hold only zero bytes, the runs a save skips; every other page reads False
    (runs_to_write would write a shorter zero run inline anyway).

    Every read goes through the kernel (MemoryReader), so that a page cut off by a
    shrinking file raises MemoryFault instead of killing the daemon with SIGBUS; each
    call costs about half a microsecond a piece, so few pieces are read. The first word
    of every `step`-th page is sampled (step = min_run / 4): a zero run of min_run pages
    holds at least min_run / step samples in a row, all zero. Only the pages between the
    non-zero samples around such a row are read in full (copied a cache-sized chunk at a
    time into a buffer and scanned there). Random memory costs one word per 64 pages;
    scattered zero pages (30% of them, say) rarely make 4 zero samples in a row and
    cost almost nothing more, where scanning every candidate page made such saves
    10-20% slower than saves of random memory.
    """
    reader = reader or MemoryReader()
    address, pages = address_of(memory), len(memory) // PAGE_SIZE
    step = max(1, min_run // 4)
    need = max(1, min_run // step)
    samples = reader.first_words(address, pages, step)
    zero = np.zeros(pages, dtype=bool)
    if samples.all():
        # No sample is zero, so no zero run of min_run pages is here: the usual case for
        # a busy guest's memory, done in two numpy calls where the general way below
        # takes about fifteen, and the run's copy and hash wait on them (a staged save
        # scans under the job's one copy slot: io/threads.py COPY_THREADS).
        return zero
    starts, stops = true_runs(samples == 0)
    rows = (stops - starts) >= need
    for a, b in zip(starts[rows].tolist(), stops[rows].tolist(), strict=True):
        low = (a - 1) * step + 1 if a > 0 else 0  # sample a - 1 is non-zero
        high = min(b * step, pages)  # so is sample b, if there is one
        reader.zero_pages(address + low * PAGE_SIZE, zero[low:high])
    # The regions scanned hold zero pages in shorter runs too: those are written inline.
    starts, stops = true_runs(zero)
    short = (stops - starts) < min_run
    if short.any():
        edges = np.zeros(pages + 1, dtype=np.int64)
        np.add.at(edges, starts[short], 1)
        np.add.at(edges, stops[short], -1)
        zero &= np.cumsum(edges[:-1]) == 0
    return zero


def touch_pages(memory: memoryview) -> None:
    """Map the pages for reading (MADV_POPULATE_READ) before the O_DIRECT write.

    The kernel maps a file's pages up to 16 per fault when they are read from user space,
    but one per fault when the write pins them; populating maps them in bulk, in the
    kernel, so a file cut short under the mapping is EFAULT (MemoryFault), never SIGBUS.
    Without it `migd bench` measured saves 20% slower (1.24 against 1.56 GiB/s on a busy
    machine). A kernel without MADV_POPULATE_READ (before 5.14) only loses the speed.
    """
    failed = _madvise(address_of(memory), len(memory), _MADV_POPULATE_READ) != 0
    if failed and ctypes.get_errno() == errno.EFAULT:
        raise MemoryFault(f"Could not map memory: {os.strerror(errno.EFAULT)}")


def runs_to_write(zero: np.ndarray, min_skip: int = MIN_SKIP_PAGES) -> list[tuple[int, int]]:
    """(first, count) runs to write: everything except zero runs of at least min_skip pages."""
    n = zero.size
    if not zero.any():
        return [(0, n)] if n else []
    starts, stops = true_runs(zero)
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
