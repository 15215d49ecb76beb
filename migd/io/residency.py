"""How much of a file range the page cache holds: cachestat(2), else mincore(2).

A restore with direct-io reads through O_DIRECT fds, and O_DIRECT goes to the disk even
for pages the page cache already holds (a save just written without direct-io, a file
read recently): concurrent restores of cached files then wait on disk latency for data
that is in memory. With `x-read-cached` auto (docs/cache-aware-restore.md) each channel
asks, once per run of 1 MiB, how much of the run is cached, and reads a mostly cached run
through a buffered fd instead (io/threads.py Channel._restore_run).

cachestat(2) (Linux >= 6.5) answers for a file range in one call, about a microsecond,
without touching the pages. Where the kernel lacks it (ENOSYS) or the filesystem refuses
it (EOPNOTSUPP: hugetlbfs), mincore(2) answers over a read-only shared mapping of the
range: mapping a file never reads it, and mincore never faults a page in, so neither
moves any data nor can fault the daemon (a file cut short only reads as not cached).
A range neither can measure counts as not cached: the run is read with O_DIRECT, as
without this module.

No pydantic, no asyncio: called from channel threads, one PageCacheProbe per thread.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import platform
import sys

from ..pages import PAGE_SIZE

# cachestat's number in the generic syscall table, which x86_64 and arm64 both follow.
CACHESTAT_NR = (
    451
    if sys.platform == "linux"
    and platform.machine()
    in {
        "x86_64",
        "aarch64",
    }
    else None
)
_FALLBACK_ERRNOS = {errno.ENOSYS, errno.EOPNOTSUPP}

_libc = ctypes.CDLL(None, use_errno=True)
# Bound once with plain integer arguments: through a prototype a call costs about 2 us,
# through ctypes' argument guessing and byref() about 30 (measured in
# docs/cache-aware-restore.md).
_syscall4 = ctypes.CFUNCTYPE(
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_long,
    use_errno=True,
)(("syscall", _libc))
_mmap = _libc.mmap
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int
_mincore = _libc.mincore
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_mincore.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


# struct cachestat_range {u64 off, len} and struct cachestat {u64 nr_cache, nr_dirty,
# nr_writeback, nr_evicted, nr_recently_evicted}, as plain arrays: cheaper to fill and read.
_RangeArray = ctypes.c_uint64 * 2
_StatArray = ctypes.c_uint64 * 5
_NR_CACHE = 0


class PageCacheProbe:
    """Counts the cached pages of file ranges, for one thread (its buffers are its own).

    `use_cachestat=False` measures with mincore only (the fallback, for tests); after
    cachestat's first ENOSYS or EOPNOTSUPP a probe uses mincore for good.
    """

    def __init__(self, use_cachestat: bool = True) -> None:
        self.use_cachestat = use_cachestat and CACHESTAT_NR is not None
        self._range = _RangeArray()
        self._stat = _StatArray()
        self._range_at = ctypes.addressof(self._range)
        self._stat_at = ctypes.addressof(self._stat)
        self._vector = ctypes.create_string_buffer(0)

    def cached_pages(self, fd: int, offset: int, length: int) -> int:
        """Pages of [offset, offset + length) in the page cache (dirty ones included);
        0 where it cannot be measured. `offset` is page aligned."""
        if self.use_cachestat:
            self._range[0] = offset
            self._range[1] = length
            if _syscall4(CACHESTAT_NR, fd, self._range_at, self._stat_at, 0) == 0:
                return int(self._stat[_NR_CACHE])
            if ctypes.get_errno() not in _FALLBACK_ERRNOS:
                return 0
            self.use_cachestat = False
        return self._mincore_pages(fd, offset, length)

    def mostly_cached(self, fd: int, offset: int, length: int) -> bool:
        """Is at least half of the range cached? Then a buffered read of it beats
        O_DIRECT, which would read the cached half from the disk again."""
        pages = -(-length // PAGE_SIZE)
        return 2 * self.cached_pages(fd, offset, length) >= pages

    def _mincore_pages(self, fd: int, offset: int, length: int) -> int:
        pages = -(-length // PAGE_SIZE)
        at = _mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
        if at is None or at == _MAP_FAILED:
            return 0
        try:
            if len(self._vector) < pages:
                self._vector = ctypes.create_string_buffer(pages)
            if _mincore(at, length, self._vector) != 0:
                return 0
            # Bit 0 of each byte is the page's residency; the others are reserved (0).
            return pages - self._vector.raw[:pages].count(0)
        finally:
            _munmap(at, length)
