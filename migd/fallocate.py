"""fallocate(2), which Python's os module lacks (only posix_fallocate, which glibc emulates by
writing a byte per block where the filesystem has no fallocate). Below every layer, as
errors.py: memory backends allocate and punch their files with it, saves their files."""

from __future__ import annotations

import ctypes

KEEP_SIZE = 1  # FALLOC_FL_KEEP_SIZE: never changes the file's length
PUNCH_HOLE = 2  # FALLOC_FL_PUNCH_HOLE (with KEEP_SIZE): the range reads as zeros, freed

_libc = ctypes.CDLL(None, use_errno=True)
# fallocate64 keeps 64-bit offsets even where off_t is 32 bits wide.
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(fd, mode, offset, length) -> 0, or the errno it failed with. A ctypes
    call: the GIL is released while the kernel works."""
    if _fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno()

