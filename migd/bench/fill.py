"""Memory to save: random data, zero pages in clusters or scattered, file holes; and
the check that a restore gave it back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .common import CLUSTER, FILL_CHUNK, PAGE

if TYPE_CHECKING:  # numpy is imported where it is used: `migd --help` need not load it
    import numpy as np


# --- memory contents -------------------------------------------------------------------


def zero_mask(kind: str, pages: int, rng: np.random.Generator) -> np.ndarray | None:
    """One bool per page, True for a zero page; None for random RAM."""
    import numpy as np

    if kind in ("zero75", "holes75"):
        per = CLUSTER // PAGE
        clusters = np.zeros(pages // per, dtype=bool)
        clusters[rng.choice(clusters.size, round(0.75 * clusters.size), replace=False)] = True
        return np.repeat(clusters, per)
    if kind == "zero30":
        mask = np.zeros(pages, dtype=bool)
        mask[rng.choice(pages, round(0.30 * pages), replace=False)] = True
        return mask
    return None


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def fill_memory(path: Path, size: int, kind: str, seed: int) -> None:
    """Give the memory file its contents: random pages, some of them zero (or holes)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mask = zero_mask(kind, size // PAGE, rng)
    holes = kind == "holes75"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if holes:
            os.ftruncate(fd, 0)  # drop every page: what is not written below stays a hole
        os.ftruncate(fd, size)
        for off in range(0, size, FILL_CHUNK):
            n = min(FILL_CHUNK, size - off)
            words = rng.integers(0, np.iinfo(np.uint64).max, n // 8, np.uint64, endpoint=True)
            pages = words.reshape(-1, PAGE // 8)
            zero = None if mask is None else mask[off // PAGE : (off + n) // PAGE]
            if zero is not None:
                pages[zero] = 0
            view = words.data.cast("B")
            if not holes or zero is None:
                pwrite_all(fd, view, off)
                continue
            per = CLUSTER // PAGE
            for c in range(0, n // PAGE, per):
                if not zero[c]:
                    pwrite_all(fd, view[c * PAGE : (c + per) * PAGE], off + c * PAGE)
    finally:
        os.close(fd)


def fill_pattern(path: Path, size: int, value: int) -> None:
    """Overwrite every page with a constant non-zero byte: 'other data' before a restore."""
    chunk = memoryview(bytes([value]) * FILL_CHUNK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        for off in range(0, size, FILL_CHUNK):
            pwrite_all(fd, chunk[: min(FILL_CHUNK, size - off)], off)
    finally:
        os.close(fd)


def same_contents(a: Path, b: Path, size: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in range(0, size, FILL_CHUNK):
            n = min(FILL_CHUNK, size - off)
            if os.pread(fa.fileno(), n, off) != os.pread(fb.fileno(), n, off):
                return False
    return True


def saved_checksums(path: Path) -> str:
    """'recorded' when the save file at `path` carries a checksum table, 'off' when not.

    A save's query-migrate stays QEMU's (no x-checksums), so the bench reads the file to
    see that the row's `checksums` argument took effect."""
    from ..migration.mapped_ram import checksum_table, format

    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size

        def read_at(at: int, n: int) -> bytes:
            return os.pread(fd, n, at)

        parsed = format.parse_stream(read_at, 0, size)
        table = checksum_table.read_table(read_at, parsed, size)
    finally:
        os.close(fd)
    return "off" if table is None else "recorded"
