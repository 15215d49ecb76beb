"""migd's checksum table: where a save keeps its unit checksums (docs/checksums.md).

The table follows the vmdescription, at the next 4 KiB boundary of the file (zero bytes
between), and ends the file: for each block in the file's order, one 16-byte xxh3-128
digest per unit (io/checksums.py) of its pages. The vmdescription's `migd` object says
it is there:

    "save-id": "<32 hex digits, random per save>",
    "checksums": {"algorithm": "xxh3-128", "unit-bytes": 1048576,
                  "table-bytes": N, "table-xxh3-128": "<32 hex digits>"}

QEMU stops reading a file after the vmdescription, and migd versions without checksums
read only the keys they know, so both load these files as before. The table is binary
(16 MiB per TiB saved) rather than JSON hex inside the vmdescription (40 MiB per TiB,
over the 16 MiB a reader accepts there). The digest of the table is the save's identity
with the save id: `migd inspect --json` prints both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ...errors import FormatError
from ...io.digests import ALGORITHM, DIGEST_BYTES, UNIT_BYTES, digest, unit_count
from .format import ParsedStream, ReadAt

TABLE_ALIGN = 4096
_HEX32 = re.compile(r"[0-9a-f]{32}")


def table_offset(vmdescription_end: int) -> int:
    """Absolute offset of the table: the first 4 KiB boundary at or after the
    vmdescription's end (absolute too, so an O_DIRECT reader reads it aligned)."""
    return -(-vmdescription_end // TABLE_ALIGN) * TABLE_ALIGN


@dataclass(frozen=True)
class ChecksumTable:
    """A save's checksums as read from its file, the table's digest checked."""

    save_id: str
    digests: tuple[bytes, ...]  # per block of the file, in order: units x 16 bytes
    offset: int  # absolute
    table_digest: str  # hex: the checksum of the checksums

    @property
    def end(self) -> int:
        return self.offset + sum(len(d) for d in self.digests)

    @property
    def units(self) -> int:
        return sum(len(d) for d in self.digests) // DIGEST_BYTES


def describe(save_id: str, table: bytes) -> dict[str, Any]:
    """The vmdescription's `checksums` entry for a table."""
    return {
        "algorithm": ALGORITHM,
        "unit-bytes": UNIT_BYTES,
        "table-bytes": len(table),
        "table-xxh3-128": digest(table).hex(),
    }


def read_table(read_at: ReadAt, parsed: ParsedStream, file_size: int) -> ChecksumTable | None:
    """The table a migd vmdescription announces (None if it announces none, or the file
    is QEMU's), checked: its entry, its length, its digest, and that it ends the file."""
    migd, blocks, vmdescription_end = parsed.migd, parsed.blocks, parsed.description_end
    if migd is None or migd.get("checksums") is None:
        return None
    entry = migd["checksums"]
    corrupt = "the vmdescription's checksum entry is corrupt"
    if not isinstance(entry, dict):
        raise FormatError(corrupt)
    if entry.get("algorithm") != ALGORITHM or entry.get("unit-bytes") != UNIT_BYTES:
        raise FormatError(
            f"the file's checksums are {entry.get('algorithm')!r} over units of "
            f"{entry.get('unit-bytes')!r} bytes; this migd checks {ALGORITHM} over "
            f"{UNIT_BYTES}: a newer migd wrote it (restore with 'verify': 'off' to skip them)"
        )
    save_id = migd.get("save-id")
    want_digest = entry.get("table-xxh3-128")
    sizes = [unit_count(b.pages) * DIGEST_BYTES for b in blocks]
    if (
        entry.get("table-bytes") != sum(sizes)
        or not isinstance(want_digest, str)
        or not _HEX32.fullmatch(want_digest)
        or not isinstance(save_id, str)
        or not _HEX32.fullmatch(save_id)
    ):
        raise FormatError(corrupt)
    offset = table_offset(vmdescription_end)
    end = offset + sum(sizes)
    if file_size < end:
        raise FormatError(
            f"the checksum table is cut short: it ends at offset {end:#x}, the file at "
            f"{file_size:#x} (the file is truncated)"
        )
    if file_size > end:
        extra = file_size - end
        raise FormatError(
            f"the file goes on {extra} byte{'s' if extra != 1 else ''} after the end of the "
            f"save at offset {end:#x}: it was extended or appended to"
        )
    raw = bytes(read_at(vmdescription_end, end - vmdescription_end))
    if len(raw) != end - vmdescription_end:
        raise FormatError(f"the checksum table could not be read whole at offset {offset:#x}")
    if raw[: offset - vmdescription_end].count(0) != offset - vmdescription_end:
        raise FormatError(f"the padding before the checksum table at {offset:#x} is not zero")
    table = raw[offset - vmdescription_end :]
    if digest(table).hex() != want_digest:
        raise FormatError(
            f"the checksum table at offset {offset:#x} does not match its digest in the "
            "vmdescription: the table is corrupt"
        )
    out, at = [], 0
    for size in sizes:
        out.append(table[at : at + size])
        at += size
    return ChecksumTable(save_id, tuple(out), offset, want_digest)
