"""A mapped-ram restore's own file I/O through the main fd: the head and block list,
then the bitmaps, every one checked before any memory changes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ...errors import FormatError, MigrationError
from ...io.file_verify import FileBlock
from ...io.target import Target
from ...io.threads import read_upto
from ...state.memory import MemoryBackend
from ..job import Job
from . import checksum_table, format


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
            lambda at, n: pread_all(fd, at, n, target.name),
            target.offset,
            size,
            require_mapped_ram=require_mapped_ram,
        )
    except format.FormatError as exc:
        raise MigrationError(f"'{target.name}': {exc.desc}") from None
    if not parsed.complete:
        raise MigrationError(
            f"'{target.name}': save file is incomplete (no RAM end section: the save "
            "was interrupted or the file is truncated)"
        )
    return parsed


def read_bitmaps(
    job: Job, layouts: Sequence[format.BlockLayout], main_fd: int
) -> list[np.ndarray]:
    path = job.target.name
    out = []
    for layout in layouts:
        try:
            # Checked against the counts and digest of a migd file's description.
            out.append(format.read_bitmap(lambda at, n: pread_all(main_fd, at, n, path), layout))
        except format.FormatError as exc:
            raise MigrationError(f"'{path}': {exc.desc}") from None
        job.main_bytes += layout.bitmap_size
    return out


def read_checksums(
    fd: int, target: Target, parsed: format.ParsedStream
) -> checksum_table.ChecksumTable | None:
    """The file's checksum table, checked (None for a file without one)."""
    try:
        return checksum_table.read_table(
            lambda at, n: pread_all(fd, at, n, target.name), parsed, os.fstat(fd).st_size
        )
    except FormatError as exc:
        raise MigrationError(f"'{target.name}': {exc.desc}") from None


def save_id(parsed: format.ParsedStream) -> str | None:
    """The random id a migd save gave itself (None in QEMU's files and older migd's)."""
    value = parsed.migd.get("save-id") if parsed.migd is not None else None
    return value if isinstance(value, str) else None


def expected_digests(
    parsed: format.ParsedStream,
    table: checksum_table.ChecksumTable,
    matched: Sequence[tuple[format.BlockLayout, MemoryBackend]],
) -> list[bytes | None]:
    """The table's digests of each block restored, in the order of `matched`."""
    by_name = dict(zip((b.name for b in parsed.blocks), table.digests, strict=True))
    return [by_name[layout.name] for layout, _ in matched]


def file_blocks(
    parsed: format.ParsedStream,
    table: checksum_table.ChecksumTable,
    present: dict[str, np.ndarray],
) -> list[FileBlock]:
    """Every block of the file as the file verifier takes it."""
    return [
        FileBlock(layout.name, layout.pages_offset, layout.pages, present[layout.name], digests)
        for layout, digests in zip(parsed.blocks, table.digests, strict=True)
    ]
