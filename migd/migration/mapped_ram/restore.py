"""A mapped-ram restore's own file I/O through the main fd: the head and block list,
then the bitmaps, every one checked before any memory changes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ...errors import MigrationError
from ...io.target import Target
from ...io.threads import read_upto
from ...state.memory import MemoryBackend
from ..job import Job
from . import format


def pread_all(fd: int, offset: int, n: int, path: str) -> bytes:
    """Up to n bytes at offset: fewer where the file ends, which the format reports."""
    buf = bytearray(n)
    got = read_upto(fd, memoryview(buf), offset, path)
    return bytes(buf[:got])


def parse(fd: int, target: Target, require_mapped_ram: bool) -> format.ParsedStream:
    """The file's head and block list, checked; a file without its end section is refused."""
    size = os.fstat(fd).st_size
    try:
        parsed = format.parse_stream(
            lambda at, n: pread_all(fd, at, n, target.path),
            target.offset,
            size,
            require_mapped_ram=require_mapped_ram,
        )
    except format.FormatError as exc:
        raise MigrationError(f"'{target.path}': {exc.desc}") from None
    if not parsed.complete:
        raise MigrationError(
            f"'{target.path}': save file is incomplete (no RAM end section: the save "
            "was interrupted or the file is truncated)"
        )
    return parsed


def read_bitmaps(
    job: Job, matched: Sequence[tuple[format.BlockLayout, MemoryBackend]], main_fd: int
) -> list[np.ndarray]:
    path = job.target.path
    out = []
    for layout, _ in matched:
        try:
            # Checked against the counts and digest of a migd file's description.
            out.append(format.read_bitmap(lambda at, n: pread_all(main_fd, at, n, path), layout))
        except format.FormatError as exc:
            raise MigrationError(f"'{path}': {exc.desc}") from None
        job.main_bytes += layout.bitmap_size
    return out
