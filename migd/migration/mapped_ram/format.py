"""QEMU's mapped-ram migration stream (docs/format.md): pure encode/decode, no file I/O.

Writers get a `SaveLayout` (absolute offsets plus the byte pieces to pwrite); readers
inject a `read_at` callback and get a `ParsedStream`. Bitmaps are numpy bool arrays.

What a reader can trust (docs/integrity.md): every file's layout is checked (each
bitmap right after its header, inside the file and before its pages, regions of
different blocks disjoint). A migd file also says in its vmdescription how many pages
of each block are present and the SHA-256 of each bitmap, so `read_bitmap` refuses a
corrupt bitmap before any memory changes. QEMU's files carry no such description: a
flipped bitmap bit there cannot be detected, nor can corrupt page data in any file.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeGuard

from ...errors import FormatError
from ...pages import PAGE_SIZE

if TYPE_CHECKING:
    import numpy as np

# numpy is imported by the functions that make or take bool arrays, not here: reading a
# file's layout and counting its pages (`migd inspect`, `migd vm restore`'s checks of an
# image) does without it, and a restore's command starts 0.1-0.15 s sooner from a cold
# page cache (docs/bench/vm/run9-startup.md).

MAPPED_RAM_ALIGN = 1 << 20
QEVM_MAGIC = 0x5145564D
STREAM_VERSION = 3
RAM_SECTION_ID = 1  # section id migd writes

MAPPED_RAM_HEADER_SIZE = 28
MAPPED_RAM_VERSION = 1
RAM_SECTION_VERSION = 4
RAM_FLAG_MEM_SIZE = 0x04
RAM_FLAG_EOS = 0x10
# RAM records are page-aligned values with flags in the low bits (QEMU's TARGET_PAGE_MASK).
_RAM_FLAGS_MASK = PAGE_SIZE - 1

# Record types of the stream (QEMU migration/savevm.h).
VM_EOF = 0x00
VM_SECTION_START = 0x01
VM_SECTION_PART = 0x02
VM_SECTION_END = 0x03
VM_SECTION_FULL = 0x04
VM_SUBSECTION = 0x05
VM_VMDESCRIPTION = 0x06
VM_CONFIGURATION = 0x07
VM_COMMAND = 0x08
VM_SECTION_FOOTER = 0x7E

CAP_MAPPED_RAM = "mapped-ram"
_CAPS_SUBSECTION = "configuration/capabilities"
_UUID_SUBSECTION = "configuration/uuid"
_PAGE_BITS_SUBSECTION = "configuration/target-page-bits"
# The only capabilities QEMU ever lists (savevm.c should_validate_capability).
_KNOWN_CAPS = (CAP_MAPPED_RAM, "x-ignore-shared")
# Hostile be32 lengths must not turn into big allocations; real values are tiny.
_MAX_MACHINE_NAME = 256
_MAX_CAPS = 16

_HEADER = struct.Struct(">IQQQ")  # version, page_size, bitmap_offset, pages_offset
_EOS_FOOTER = struct.Struct(">QBI")  # be64 EOS, 0x7e, be32 section id
_MAX_OFFSET = (1 << 63) - 1  # off_t is signed 64-bit
# migd's vmdescription is ~150 bytes per block; this bounds what a hostile length allocates.
_MAX_VMDESCRIPTION = 16 << 20

ReadAt = Callable[[int, int], bytes]


def _ceil_div(value: int, divisor: int) -> int:
    return -(-value // divisor)


def _bitmap_size(pages: int) -> int:
    # QEMU writes whole 64-bit `unsigned long` words.
    return _ceil_div(pages, 64) * 8


def _str8(raw: bytes) -> bytes:
    """u8 length + bytes, the stream's short-string encoding."""
    return bytes([len(raw)]) + raw


@dataclass(frozen=True)
class BitmapCheck:
    """What migd's vmdescription says a block's bitmap holds (absent in QEMU's files)."""

    present: int  # pages whose bit is set
    sha256: str | None  # hex digest of the bitmap's bytes; None in files of migd <= 0.x


@dataclass(frozen=True)
class BlockLayout:
    """Where one RAM block's header, bitmap and pages live (absolute file offsets)."""

    name: str
    length: int
    header_offset: int
    bitmap_offset: int
    pages_offset: int
    page_size: int = PAGE_SIZE
    # Set by parse_stream for migd's files; read_bitmap checks the bitmap against it.
    bitmap_check: BitmapCheck | None = field(default=None, compare=False)

    @property
    def pages(self) -> int:
        return self.length // self.page_size

    @property
    def bitmap_size(self) -> int:
        return _bitmap_size(self.pages)

    @property
    def end(self) -> int:
        """Where the main stream continues after this block's region."""
        return self.pages_offset + self.length

    def page_offset(self, page_index: int) -> int:
        """Absolute file offset of page `page_index`."""
        if not 0 <= page_index < self.pages:
            raise IndexError(f"page {page_index} outside of ramblock {self.name} range")
        return self.pages_offset + page_index * self.page_size


@dataclass(frozen=True)
class SaveLayout:
    """A planned save: head pieces to pwrite first, end section written last."""

    offset: int
    blocks: tuple[BlockLayout, ...]
    head_writes: tuple[tuple[int, bytes], ...]
    end_offset: int

    def encode_end(self, vmdescription: dict[str, Any] | None = None) -> bytes:
        """RAM end section, EOF and the optional vmdescription JSON."""
        sid = RAM_SECTION_ID
        out = struct.pack(">BI", VM_SECTION_END, sid) + _EOS_FOOTER.pack(
            RAM_FLAG_EOS, VM_SECTION_FOOTER, sid
        )
        out += bytes([VM_EOF])
        if vmdescription is not None:
            desc = json.dumps(vmdescription, separators=(",", ":")).encode()
            out += struct.pack(">BI", VM_VMDESCRIPTION, len(desc)) + desc
        return out


def _encode_stream_head(machine: bytes) -> bytes:
    caps = struct.pack(">II", 1, 1) + _str8(CAP_MAPPED_RAM.encode())
    return (
        struct.pack(">IIBI", QEVM_MAGIC, STREAM_VERSION, VM_CONFIGURATION, len(machine))
        + machine
        + bytes([VM_SUBSECTION])
        + _str8(_CAPS_SUBSECTION.encode())
        + caps
        + struct.pack(">BI", VM_SECTION_START, RAM_SECTION_ID)
        + _str8(b"ram")
        + struct.pack(">II", 0, RAM_SECTION_VERSION)
    )


def plan_save(
    blocks: Sequence[tuple[str, int]], offset: int = 0, machine: str = "none"
) -> SaveLayout:
    """Lay out a save of `blocks` (name, length) at file offset `offset`."""
    if not isinstance(offset, int) or offset < 0:
        raise FormatError(f"invalid file offset {offset!r}: must be >= 0")
    if not blocks:
        raise FormatError("nothing to save: at least one RAM block is required")
    machine_raw = machine.encode()
    if not 1 <= len(machine_raw) <= _MAX_MACHINE_NAME:
        raise FormatError(f"invalid machine type name {machine!r}")
    names: set[str] = set()
    for name, length in blocks:
        try:
            raw = name.encode() if isinstance(name, str) else b""
        except UnicodeEncodeError:  # lone surrogates
            raw = b""
        if not 1 <= len(raw) <= 255:
            raise FormatError(f"invalid RAM block name {name!r}: must be 1..255 bytes of UTF-8")
        if name in names:
            raise FormatError(f"duplicate RAM block name {name!r}")
        names.add(name)
        if (
            isinstance(length, bool)
            or not isinstance(length, int)
            or length <= 0
            or length % PAGE_SIZE
        ):
            raise FormatError(
                f"invalid length {length!r} of RAM block {name!r}: "
                f"must be a positive multiple of {PAGE_SIZE}"
            )
    total = sum(length for _, length in blocks)
    if offset + total > _MAX_OFFSET:
        raise FormatError(f"save file too large: {total} bytes of RAM at offset {offset}")

    # Each block record (and its header) is a separate piece: the main stream jumps
    # over the block's region, so the next record starts at the previous region's end.
    writes: list[tuple[int, bytes]] = []
    layouts: list[BlockLayout] = []
    piece_at = offset
    piece = bytearray(_encode_stream_head(machine_raw))
    piece += struct.pack(">Q", total | RAM_FLAG_MEM_SIZE)
    for name, length in blocks:
        piece += _str8(name.encode()) + struct.pack(">Q", length)
        header_at = piece_at + len(piece)
        bitmap_at = header_at + MAPPED_RAM_HEADER_SIZE
        bitmap_end = bitmap_at + _bitmap_size(length // PAGE_SIZE)
        # Absolute alignment keeps O_DIRECT page I/O aligned for any (even odd) offset.
        pages_at = _ceil_div(bitmap_end, MAPPED_RAM_ALIGN) * MAPPED_RAM_ALIGN
        block = BlockLayout(name, length, header_at, bitmap_at, pages_at)
        piece += _HEADER.pack(
            MAPPED_RAM_VERSION, PAGE_SIZE, block.bitmap_offset, block.pages_offset
        )
        writes.append((piece_at, bytes(piece)))
        layouts.append(block)
        piece_at, piece = block.end, bytearray()
    piece += _EOS_FOOTER.pack(RAM_FLAG_EOS, VM_SECTION_FOOTER, RAM_SECTION_ID)
    writes.append((piece_at, bytes(piece)))
    end_offset = piece_at + len(piece)
    if end_offset > _MAX_OFFSET:
        raise FormatError(f"save file too large: it would end at offset {end_offset}")
    return SaveLayout(offset, tuple(layouts), tuple(writes), end_offset)


def encode_bitmap(present: np.ndarray, bitmap_size: int) -> bytes:
    """Pack one bool per page LSB-first (QEMU's layout on x86-64), zero-padded."""
    import numpy as np
    packed = np.packbits(np.asarray(present, dtype=bool), bitorder="little")
    if packed.size > bitmap_size:
        raise ValueError(f"{packed.size}-byte bitmap does not fit in {bitmap_size} bytes")
    out = np.zeros(bitmap_size, dtype=np.uint8)
    out[: packed.size] = packed
    return out.tobytes()


def decode_bitmap(data: bytes, pages: int) -> np.ndarray:
    """Unpack a bitmap into a bool array of `pages` entries (padding bits ignored)."""
    import numpy as np

    need = _bitmap_bytes(data, pages)
    bits = np.unpackbits(
        np.frombuffer(data, dtype=np.uint8, count=need), count=pages, bitorder="little"
    )
    return bits.view(np.bool_)  # values are 0/1, so a view is exact and avoids a copy


def count_bitmap(data: bytes, pages: int) -> int:
    """How many of a bitmap's first `pages` bits are set (padding bits ignored)."""
    need = _bitmap_bytes(data, pages)
    return (int.from_bytes(data[:need], "little") & ((1 << pages) - 1)).bit_count()


def _bitmap_bytes(data: bytes, pages: int) -> int:
    """The bytes a bitmap of `pages` bits takes; FormatError if `data` is shorter."""
    need = _ceil_div(pages, 8)
    if len(data) < need:
        raise FormatError(f"truncated bitmap: expected {need} bytes, got {len(data)}")
    return need


def bitmap_digest(data: bytes) -> str:
    """The SHA-256 a migd vmdescription records for a bitmap's bytes."""
    return hashlib.sha256(data).hexdigest()


def read_bitmap(read_at: ReadAt, block: BlockLayout) -> np.ndarray:
    """Read and decode `block`'s bitmap; refuse it if the file's description disagrees."""
    return decode_bitmap(check_bitmap(read_at, block), block.pages)


def check_bitmap(read_at: ReadAt, block: BlockLayout) -> bytes:
    """Read `block`'s bitmap, as it is in the file; refuse it if the file's description
    disagrees (a bitmap a restore would refuse, `migd inspect` shows as such)."""
    data = bytes(read_at(block.bitmap_offset, block.bitmap_size)[: block.bitmap_size])
    if len(data) < block.bitmap_size:
        raise FormatError(
            f"truncated bitmap of ramblock {block.name}: expected {block.bitmap_size} bytes "
            f"at offset {block.bitmap_offset}, got {len(data)}"
        )
    check = block.bitmap_check
    if check is None:
        return data  # a QEMU file: nothing to check against
    count = count_bitmap(data, block.pages)
    if count != check.present:
        raise FormatError(
            f"bitmap of ramblock {block.name} is corrupt: it marks {count} pages present, "
            f"the file's description says {check.present}"
        )
    if check.sha256 is not None and bitmap_digest(data) != check.sha256:
        raise FormatError(
            f"bitmap of ramblock {block.name} is corrupt: its SHA-256 differs from the one "
            "in the file's description"
        )
    return data


def set_runs(present: np.ndarray) -> list[tuple[int, int]]:
    """(first_page, count) of each maximal run of True."""
    import numpy as np

    from ...runs import true_runs

    starts, stops = true_runs(np.asarray(present, dtype=bool))
    return list(zip(starts.tolist(), (stops - starts).tolist(), strict=True))


@dataclass(frozen=True)
class ParsedStream:
    """What a reader needs from a save file: config, block layouts, completeness."""

    machine: str
    capabilities: tuple[str, ...]
    blocks: tuple[BlockLayout, ...]
    complete: bool
    total_ram: int
    # migd's files only: the vmdescription's `migd` object, and the offset after the
    # vmdescription (where checksum_table looks for the table); else None and 0.
    migd: dict[str, Any] | None = None
    description_end: int = 0


class Cursor:
    """Sequential reads over `read_at`, never past `file_size`."""

    def __init__(self, read_at: ReadAt, pos: int, file_size: int) -> None:
        self.read_at, self.pos, self.file_size = read_at, pos, file_size

    def take(self, n: int) -> bytes:
        want = max(0, min(n, self.file_size - self.pos))
        data = bytes(self.read_at(self.pos, want)[:want]) if want else b""
        if len(data) != n:
            raise FormatError(
                f"truncated: expected {n} bytes at offset {self.pos}, got {len(data)}"
            )
        self.pos += n
        return data

    def peek(self) -> int:
        value = self.take(1)[0]
        self.pos -= 1
        return value

    def unpack(self, fmt: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def u8(self) -> int:
        return self.take(1)[0]

    def be32(self) -> int:
        return self.unpack(">I")[0]

    def be64(self) -> int:
        return self.unpack(">Q")[0]

    def text(self, n: int, what: str) -> str:
        raw = self.take(n)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise FormatError(f"{what} is not valid UTF-8: {raw!r}") from None

    def str8(self, what: str) -> str:
        return self.text(self.u8(), what)


def parse_configuration(cur: Cursor) -> tuple[str, tuple[str, ...]]:
    kind = cur.u8()
    if kind != VM_CONFIGURATION:
        raise FormatError(f"Configuration section missing, {kind:#x} != {VM_CONFIGURATION:#x}")
    size = cur.be32()
    if size > _MAX_MACHINE_NAME:
        raise FormatError(f"machine type name too long ({size} bytes)")
    machine = cur.text(size, "machine type name")
    caps: tuple[str, ...] = ()
    # Subsections have no terminator: QEMU peeks for the subsection byte.
    while cur.peek() == VM_SUBSECTION:
        cur.pos += 1
        name = cur.str8("subsection name")
        version = cur.be32()
        if name not in (_CAPS_SUBSECTION, _UUID_SUBSECTION, _PAGE_BITS_SUBSECTION):
            raise FormatError(f"Unknown subsection {name!r} in the configuration section")
        if version != 1:
            raise FormatError(f"Unsupported version {version} of subsection {name!r}")
        if name == _CAPS_SUBSECTION:
            count = cur.be32()
            if count > _MAX_CAPS:
                raise FormatError(f"too many capabilities in the configuration section ({count})")
            caps = tuple(cur.str8("capability name") for _ in range(count))
            unknown = [c for c in caps if c not in _KNOWN_CAPS]
            if unknown:
                raise FormatError(f"Received unknown capability {unknown[0]}")
        elif name == _UUID_SUBSECTION:
            cur.take(16)  # the source VM's UUID: nothing to validate against
        else:
            bits = cur.be32()
            if bits != PAGE_SIZE.bit_length() - 1:
                raise FormatError(f"Received TARGET_PAGE_BITS is {bits} but local is 12")
    return machine, caps


def _check_capabilities(caps: tuple[str, ...], require_mapped_ram: bool) -> None:
    if CAP_MAPPED_RAM not in caps:
        # Without mapped-ram, pages are inline in the stream: a format migd cannot read.
        raise FormatError(
            "Capability mapped-ram is on, but received capability is off "
            "(migd reads only mapped-ram streams)"
        )
    if not require_mapped_ram:
        raise FormatError("Capability mapped-ram is off, but received capability is on")
    if "x-ignore-shared" in caps:
        # migd never enables it, and the stream layout differs (a GPA per block).
        raise FormatError("Capability x-ignore-shared is off, but received capability is on")


def _parse_ram_start(cur: Cursor) -> int:
    """Consume the RAM SECTION_START header; return its section id."""
    at = cur.pos
    kind = cur.u8()
    if kind not in (VM_SECTION_START, VM_SECTION_FULL):
        raise FormatError(
            f"Expected the RAM section start at offset {at}, found record type {kind:#x}"
        )
    section_id = cur.be32()
    idstr = cur.str8("section name")
    _instance, version = cur.unpack(">II")
    if kind != VM_SECTION_START or idstr != "ram":
        raise FormatError(
            f"Unsupported section {idstr!r} before the RAM section: migd reads only streams "
            "whose first section is 'ram'"
        )
    if version != RAM_SECTION_VERSION:
        raise FormatError(
            f"Unsupported RAM section version {version} (expected {RAM_SECTION_VERSION})"
        )
    return section_id


def _parse_block(cur: Cursor) -> BlockLayout:
    """One (idstr, used_length, MappedRamHeader) record; leaves `cur` after its region."""
    name = cur.str8("RAM block name")
    if not name:
        raise FormatError("RAM block with an empty name")
    length = cur.be64()
    header_at = cur.pos
    version, page_size, bitmap_at, pages_at = _HEADER.unpack(cur.take(MAPPED_RAM_HEADER_SIZE))
    if version != MAPPED_RAM_VERSION:
        raise FormatError(
            "Migration mapped-ram capability version not supported "
            f"(expected <= {MAPPED_RAM_VERSION}, got {version})"
        )
    if page_size != PAGE_SIZE:
        raise FormatError(
            f"ramblock {name} has page size {page_size}, only {PAGE_SIZE} is supported"
        )
    if pages_at % PAGE_SIZE:
        raise FormatError(f"Error reading ramblock {name} pages, region has bad alignment")
    if length == 0 or length % PAGE_SIZE:
        raise FormatError(
            f"ramblock {name} has bad length {length} (not a positive multiple of {PAGE_SIZE})"
        )
    block = BlockLayout(name, length, header_at, bitmap_at, pages_at, page_size)
    if bitmap_at < header_at + MAPPED_RAM_HEADER_SIZE:
        raise FormatError(
            f"ramblock {name} bitmap at offset {bitmap_at} "
            f"overlaps its header at offset {header_at}"
        )
    if bitmap_at + block.bitmap_size > pages_at:
        raise FormatError(
            f"ramblock {name} bitmap ({block.bitmap_size} bytes at offset {bitmap_at}) "
            f"does not fit before its pages at offset {pages_at}"
        )
    if bitmap_at != header_at + MAPPED_RAM_HEADER_SIZE:
        # QEMU (ram.c mapped_ram_setup_ramblock) and migd both put the bitmap right after
        # the header; anywhere else, the offset is corrupt and would read other bytes as
        # the bitmap (in the padding: all pages zero, or shifted bits).
        raise FormatError(
            f"ramblock {name} bitmap at offset {bitmap_at} does not follow its header "
            f"(expected offset {header_at + MAPPED_RAM_HEADER_SIZE})"
        )
    if block.end > cur.file_size:
        raise FormatError(
            f"ramblock {name} region [{bitmap_at}, {block.end}) extends past "
            f"the end of the file ({cur.file_size} bytes)"
        )
    # Regions cannot overlap: the next record is read at this region's end and its
    # region must start after its own header, so regions strictly increase.
    cur.pos = block.end
    return block


def _parse_ram_setup(cur: Cursor) -> tuple[int, tuple[BlockLayout, ...]]:
    """RAM records of the start section up to its EOS: (MEM_SIZE total, blocks)."""
    total: int | None = None
    blocks: list[BlockLayout] = []
    names: set[str] = set()
    while True:
        value = cur.be64()
        flags = value & _RAM_FLAGS_MASK
        if flags == RAM_FLAG_EOS:
            break
        if flags != RAM_FLAG_MEM_SIZE:
            raise FormatError(f"Unexpected RAM flags: {flags}")
        if total is not None:
            raise FormatError("duplicate MEM_SIZE record in the RAM section")
        total = value & ~_RAM_FLAGS_MASK
        accumulated = 0
        # QEMU's loader has no block count: the list ends when the lengths add up.
        while accumulated < total:
            block = _parse_block(cur)
            if block.name in names:
                raise FormatError(f"duplicate ramblock {block.name}")
            names.add(block.name)
            accumulated += block.length
            if accumulated > total:
                raise FormatError(
                    f"RAM block lengths exceed the MEM_SIZE total ({accumulated} > {total})"
                )
            blocks.append(block)
    if total is None:
        raise FormatError("RAM section has no MEM_SIZE record")
    return total, tuple(blocks)


def _expect_footer(cur: Cursor, section_id: int) -> None:
    marker, sid = cur.unpack(">BI")
    if marker != VM_SECTION_FOOTER or sid != section_id:
        raise FormatError("Missing section footer for ram")


def _find_ram_end(cur: Cursor, section_id: int) -> bool:
    """Skip RAM part sections and commands; True iff the RAM end section follows."""
    # Every step consumes bytes and the cursor cannot pass file_size, so this ends.
    try:
        while True:
            kind = cur.u8()
            if kind == VM_COMMAND:
                _cmd, size = cur.unpack(">HH")
                cur.take(size)
                continue
            if kind not in (VM_SECTION_PART, VM_SECTION_END) or cur.be32() != section_id:
                return False
            if cur.be64() != RAM_FLAG_EOS:
                return False
            _expect_footer(cur, section_id)
            if kind == VM_SECTION_END:
                return True
    except FormatError:
        # A save cut short (or zeros where the end should be) is incomplete, not corrupt.
        return False


def _read_vmdescription(cur: Cursor) -> dict[str, Any] | None:
    """The JSON after `EOF` when it follows the RAM end section at once (migd's layout).

    QEMU's files have device sections there, which are not self-describing: None. A flip
    of one of the two bytes between the end section and migd's vmdescription must not
    make a migd file read as QEMU's, unchecked (red-team, session 13): EOF followed by
    anything but a vmdescription is corrupt (QEMU writes device sections before EOF), and
    so is a vmdescription with migd's object behind a byte that is not EOF.
    """
    try:
        first, second = cur.u8(), cur.u8()
    except FormatError:
        # Every save has more after its RAM end section: QEMU's device sections and EOF,
        # migd's EOF and vmdescription (every migd version wrote one). A file that ends
        # there lost its end, and with it a migd save's checksums: read as QEMU's, it was
        # restored unchecked, a flipped page and all (red-team, session 14).
        raise FormatError(
            "save file is incomplete: it ends at its RAM end section (or the EOF byte after "
            "it), where every save goes on (migd's with its description, QEMU's with device "
            "sections): the file is truncated"
        ) from None
    if first != VM_EOF:
        if second == VM_VMDESCRIPTION and _migd_description_follows(cur):
            raise FormatError(
                f"the byte after the RAM end section is {first:#04x}, not EOF, before migd's "
                "vmdescription: the file is corrupt"
            )
        return None
    if second != VM_VMDESCRIPTION:
        raise FormatError(
            f"the RAM end section is followed by EOF and then {second:#04x}, which does not "
            "start a vmdescription: the file is corrupt"
        )
    size = cur.be32()
    if size > _MAX_VMDESCRIPTION:
        raise FormatError(f"vmdescription too long ({size} bytes)")
    try:
        raw = cur.take(size)
    except FormatError as exc:
        raise FormatError(f"truncated vmdescription: {exc.desc}") from None
    try:
        desc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise FormatError("the vmdescription after EOF is not valid JSON") from None
    except RecursionError:  # valid JSON nested thousands deep: no vmdescription is
        raise FormatError("the vmdescription after EOF is nested too deeply") from None
    if not isinstance(desc, dict):
        raise FormatError("the vmdescription after EOF is not a JSON object")
    if "migd" not in desc:
        # Right after the RAM end section only migd writes a vmdescription, and always
        # with its object: without it (a flipped key), nothing would be checked.
        raise FormatError(
            "the vmdescription right after the RAM end section has no 'migd' object: "
            "the file is corrupt"
        )
    return desc


def _migd_description_follows(cur: Cursor) -> bool:
    """Whether a vmdescription with migd's object follows (its be32 length first)."""
    try:
        size = cur.be32()
        if size > _MAX_VMDESCRIPTION:
            return False
        desc = json.loads(cur.take(size))
    except (FormatError, ValueError, RecursionError):
        return False
    return isinstance(desc, dict) and "migd" in desc


def _is_count(value: Any, top: int) -> TypeGuard[int]:
    return type(value) is int and 0 <= value <= top  # JSON true is not a count


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and _is_hex(value)


# Every key a migd version has written in its vmdescription object (mapped_ram/save.py).
_MIGD_KEYS = frozenset(
    {"version", "time", "blocks", "normal-pages", "zero-pages", "save-id", "checksums"}
)


def _migd_checks(desc: dict[str, Any], blocks: tuple[BlockLayout, ...]) -> tuple[BlockLayout, ...]:
    """Attach the per-block counts of a migd vmdescription; refuse one that lacks them.

    A file that says migd wrote it but has no valid counts is refused rather than read
    as QEMU's: every migd version wrote them, so their absence means corruption.
    """
    bad = FormatError(
        "the vmdescription says migd wrote this file, but its per-block page counts are "
        "missing or do not match the file's blocks: the file is corrupt"
    )
    migd = desc["migd"]
    if isinstance(migd, dict):
        unknown = sorted(set(migd) - _MIGD_KEYS)
        if unknown:
            # A flipped key ("chucksums") would switch the checks off unseen.
            raise FormatError(
                f"the vmdescription's migd object has unknown keys {unknown}: the file is "
                "corrupt (or written by a newer migd)"
            )
        save_id = migd.get("save-id")
        if save_id is not None and not (
            isinstance(save_id, str) and len(save_id) == 32 and _is_hex(save_id)
        ):
            raise FormatError("the vmdescription's save-id is not a save id: the file is corrupt")
    entries = migd.get("blocks") if isinstance(migd, dict) else None
    if not isinstance(entries, list) or len(entries) != len(blocks):
        raise bad
    out = []
    for block, entry in zip(blocks, entries, strict=True):
        if not isinstance(entry, dict) or entry.get("name") != block.name:
            raise bad
        if entry.get("pages") != block.pages or type(entry.get("pages")) is not int:
            raise bad
        present, digest = entry.get("present"), entry.get("bitmap-sha256")
        if not _is_count(present, block.pages) or not (digest is None or _is_digest(digest)):
            raise bad
        out.append(replace(block, bitmap_check=BitmapCheck(present, digest)))
    return tuple(out)


def parse_stream(
    read_at: ReadAt, offset: int, file_size: int, *, require_mapped_ram: bool = True
) -> ParsedStream:
    """Parse a mapped-ram stream at `offset` up to the RAM end section.

    For migd's files, also the vmdescription after it: each block then carries the
    `bitmap_check` that read_bitmap enforces.
    """
    if offset < 0:
        raise FormatError(f"invalid file offset {offset}")
    if file_size <= offset:
        raise FormatError(empty_file_text(offset, file_size))
    cur = Cursor(read_at, offset, file_size)
    magic, version = cur.unpack(">II")
    if magic != QEVM_MAGIC:
        raise FormatError(f"Not a migration stream, magic: {magic:#x} != {QEVM_MAGIC:#x}")
    if version != STREAM_VERSION:
        raise FormatError(f"Unsupported migration stream version, {version} != {STREAM_VERSION}")
    machine, caps = parse_configuration(cur)
    _check_capabilities(caps, require_mapped_ram)
    section_id = _parse_ram_start(cur)
    total, blocks = _parse_ram_setup(cur)
    _expect_footer(cur, section_id)
    complete = _find_ram_end(cur, section_id)
    migd, description_end = None, 0
    if complete:
        desc = _read_vmdescription(cur)
        if desc is not None and "migd" in desc:
            blocks = _migd_checks(desc, blocks)
            migd, description_end = desc["migd"], cur.pos
    return ParsedStream(machine, caps, blocks, complete, total, migd, description_end)


def empty_file_text(offset: int, file_size: int) -> str:
    """What to say of a file with nothing at `offset` (an empty file is not a save)."""
    if file_size == 0:
        return "the file is empty: not a save file"
    return (
        f"no migration stream at offset {offset}: the file has only {file_size} bytes "
        "(truncated, or not a save file)"
    )


def parse_cut_short(
    read_at: ReadAt, offset: int, file_size: int
) -> tuple[str, tuple[str, ...], int, list[BlockLayout]]:
    """(machine, capabilities, MEM_SIZE total, blocks) of a file cut short.

    Follows parse_stream but stops at the file's end instead of failing there, so a
    tool can show what an interrupted save still holds. Regions are not checked.
    """
    cur = Cursor(read_at, offset, 1 << 62)  # reads past file_size just come back short
    magic, version = cur.unpack(">II")
    if magic != QEVM_MAGIC or version != STREAM_VERSION:
        raise FormatError("not a migration stream")
    machine, caps = parse_configuration(cur)
    _check_capabilities(caps, True)
    _parse_ram_start(cur)
    value = cur.be64()
    if value & _RAM_FLAGS_MASK != RAM_FLAG_MEM_SIZE:
        raise FormatError("RAM section has no MEM_SIZE record")
    total = value & ~_RAM_FLAGS_MASK
    blocks: list[BlockLayout] = []
    accumulated = 0
    while accumulated < total and cur.pos < file_size:
        name_len = read_at(cur.pos, 1)[0]
        if cur.pos + 1 + name_len + 8 + MAPPED_RAM_HEADER_SIZE > file_size:
            break  # this record is cut: its layout is unknown
        block = _parse_block(cur)
        accumulated += block.length
        blocks.append(block)
    return machine, caps, total, blocks
