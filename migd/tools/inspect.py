"""`migd inspect`: what a mapped-ram save file holds, read without a daemon.

Works on migd's files and QEMU's (it stops at the RAM end section, before device state).
Returns plain data; the command line does the printing.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import FormatError
from ..io.digests import ALGORITHM, UNIT_BYTES
from ..migration.mapped_ram import checksum_table, format
from ..state.paths import kind_of, written_by_a_job

# A truncated file is parsed again as if zeros followed its end; this is how far it may go.
# Bitmaps are counted in slices so that a TiB-sized block needs no GiB-sized array.
_BITMAP_CHUNK = 8 << 20
_MAGIC = struct.pack(">I", format.QEVM_MAGIC)


class InspectError(Exception):
    """The file cannot be read as a save at all (foreign, corrupt, unreadable)."""


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only fd of `path`, which must be a regular file; InspectError otherwise.

    O_NONBLOCK: a FIFO's open would wait for a writer (forever, for a CLI run by a
    script); it is opened without waiting and refused. Reads then block as usual."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InspectError(
                f"not a regular file (it is {kind_of(mode) or 'of an unknown kind'})"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class BlockInfo:
    name: str
    size: int
    pages: int
    present_pages: int
    zero_pages: int
    header_offset: int
    bitmap_offset: int
    pages_offset: int
    end: int


@dataclass
class ChecksumInfo:
    """A save's checksum table (docs/checksums.md), or what its entry claims if corrupt."""

    algorithm: str | None
    unit_bytes: int | None
    units: int | None
    table_offset: int
    table_bytes: int | None
    table_digest: str | None  # the checksum of the checksums
    problem: str | None  # why the table or its entry is corrupt (restore refuses the file)


@dataclass
class SaveInfo:
    path: str
    offset: int
    file_size: int
    allocated: int
    machine: str
    capabilities: list[str]
    complete: bool
    # Why the file is incomplete: no RAM end section, or cut short (then sizes are guesses).
    problem: str | None
    truncated: bool
    total_ram: int
    blocks: list[BlockInfo] = field(default_factory=list)
    save_id: str | None = None  # migd's random id of the save (None in QEMU's files)
    checksums: ChecksumInfo | None = None  # None: the file has no checksums
    # A block's bitmap disagrees with the file's description (its count or SHA-256): a
    # restore refuses the file ("bitmap of ramblock B is corrupt"); None: all agree.
    bitmap_problem: str | None = None

    @property
    def present_pages(self) -> int:
        return sum(b.present_pages for b in self.blocks)

    @property
    def zero_pages(self) -> int:
        return sum(b.zero_pages for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["totals"] = {
            "blocks": len(self.blocks),
            "ram": self.total_ram,
            "pages": sum(b.pages for b in self.blocks),
            "present_pages": self.present_pages,
            "present_bytes": self.present_pages * format.PAGE_SIZE,
            "zero_pages": self.zero_pages,
        }
        return out


class _Reader:
    """pread over the file; optionally pads reads past the end with zeros and notes it."""

    def __init__(self, fd: int, size: int, pad: bool) -> None:
        self.fd, self.size, self.pad = fd, size, pad
        self.past_end = False

    def __call__(self, at: int, n: int) -> bytes:
        data = os.pread(self.fd, n, at) if at < self.size else b""
        if len(data) < n and self.pad:
            self.past_end = True
            data += bytes(n - len(data))
        return data


def _count_present(reader: _Reader, block: format.BlockLayout) -> int:
    present = 0
    pages_per_chunk = _BITMAP_CHUNK * 8
    # Only the bitmap bytes the file holds: past its end (a file cut short, read padded)
    # every bit is zero, and a 4 KiB file claiming 2^58 bytes of RAM had its 8 TiB of
    # padding walked for hours (red-team, session 14).
    last = min(block.pages, max(0, reader.size - block.bitmap_offset) * 8)
    for first in range(0, last, pages_per_chunk):
        pages = min(pages_per_chunk, last - first)
        data = reader(block.bitmap_offset + first // 8, -(-pages // 8))
        present += format.count_bitmap(data, pages)
    return present


def _check_magic(fd: int, offset: int, size: int) -> None:
    """A foreign file gets a clear 'not a save' error, even when it is tiny."""
    head = os.pread(fd, len(_MAGIC), offset) if offset < size else b""
    if not head:
        raise InspectError(format.empty_file_text(offset, size))
    if head != _MAGIC[: len(head)]:
        raise InspectError(
            f"not a QEMU/migd save file (no QEVM magic at offset {offset}, found {head.hex()})"
        )


def _checksums(reader: _Reader, parsed: format.ParsedStream, size: int) -> ChecksumInfo | None:
    """The table the vmdescription announces, checked as a restore checks it; a corrupt
    one is described by what its entry says, and why it is refused."""
    if parsed.migd is None or parsed.migd.get("checksums") is None:
        return None
    at = checksum_table.table_offset(parsed.description_end)
    try:
        table = checksum_table.read_table(reader, parsed, size)
    except FormatError as exc:
        entry = parsed.migd["checksums"]
        entry = entry if isinstance(entry, dict) else {}

        def claimed(key: str, kind: type) -> Any:
            value = entry.get(key)
            return value if type(value) is kind else None

        return ChecksumInfo(
            claimed("algorithm", str),
            claimed("unit-bytes", int),
            None,
            at,
            claimed("table-bytes", int),
            claimed("table-xxh3-128", str),
            exc.desc,
        )
    assert table is not None
    return ChecksumInfo(
        ALGORITHM, UNIT_BYTES, table.units, at, table.end - at, table.table_digest, None
    )


IN_USE = (
    "a migd job is writing it now (a save or an update holds the file): what it holds is "
    "half a save until that job ends"
)


def refuse_if_being_written(fd: int) -> None:
    """A file a running save writes reads as an interrupted (or, at its last write, a
    corrupt) save: say what it is instead (red-team, session 17: "the save was
    interrupted" about a save still running)."""
    if written_by_a_job(fd):
        raise InspectError(IN_USE)


def inspect_file(
    path: str | os.PathLike[str], offset: int = 0, *, fd: int | None = None
) -> SaveInfo:
    """Describe the save at `offset` of `path`; raises InspectError or OSError. `fd`: the
    file already open (read through a dup of it; `path` only names it): a name through
    /proc/self/fd/N is refused as a magic link, and was read by its link's text, the
    file's name again, before (paths.resolve_trusted)."""
    fd = open_regular(path) if fd is None else os.dup(fd)
    try:
        refuse_if_being_written(fd)
        st = os.fstat(fd)
        size = st.st_size
        _check_magic(fd, offset, size)
        reader = _Reader(fd, size, pad=False)
        truncated = False
        save_id, checksums = None, None
        try:
            parsed = format.parse_stream(reader, offset, size)
            layouts, machine, caps = list(parsed.blocks), parsed.machine, parsed.capabilities
            complete, total_ram = parsed.complete, parsed.total_ram
            if parsed.migd is not None and isinstance(parsed.migd.get("save-id"), str):
                save_id = parsed.migd["save-id"]
            checksums = _checksums(reader, parsed, size)
        except FormatError as exc:
            # Parsed again as if zeros followed the file's end: if that reads past the end,
            # the file was cut short (a crash, a partial copy), which is "incomplete", and
            # the blocks whose records lie inside the file can still be shown.
            reader = _Reader(fd, size, pad=True)
            with contextlib.suppress(FormatError):
                format.parse_stream(reader, offset, 1 << 62)  # a size no file reaches
            if not reader.past_end:
                raise InspectError(exc.desc) from None
            try:
                machine, caps, total_ram, layouts = format.parse_cut_short(reader, offset, size)
            except FormatError:
                raise InspectError(
                    f"incomplete: the file is cut short at {size} bytes ({exc.desc})"
                ) from None
            truncated, complete = True, False
        blocks = []
        bitmap_problem = None
        for b in layouts:
            present = _count_present(reader, b)
            if complete and b.bitmap_check is not None and bitmap_problem is None:
                # As a restore reads it: checked against the description's count and
                # digest, so that inspect never calls good a file restore refuses.
                try:
                    format.check_bitmap(reader, b)
                except FormatError as exc:
                    bitmap_problem = exc.desc
            blocks.append(
                BlockInfo(
                    b.name,
                    b.length,
                    b.pages,
                    present,
                    b.pages - present,
                    b.header_offset,
                    b.bitmap_offset,
                    b.pages_offset,
                    b.end,
                )
            )
    finally:
        os.close(fd)

    problem = None
    if truncated:
        needed = max((b.end for b in blocks), default=size)
        missing = total_ram - sum(b.size for b in blocks)
        problem = f"the file is cut short at {size} bytes"
        if needed > size:
            problem += f", but its blocks reach offset {needed}"
        if missing > 0:
            problem += f"; the records of {missing} bytes of RAM are missing"
        if needed <= size and missing <= 0:
            problem += ", before the RAM end section"
    elif not complete:
        problem = "no RAM end section: the save was interrupted or the file is truncated"
    return SaveInfo(
        path=os.fspath(path),
        offset=offset,
        file_size=size,
        allocated=st.st_blocks * 512,
        machine=machine,
        capabilities=list(caps),
        complete=complete,
        problem=problem,
        truncated=truncated,
        total_ram=total_ram,
        blocks=blocks,
        save_id=save_id,
        checksums=checksums,
        bitmap_problem=bitmap_problem,
    )
