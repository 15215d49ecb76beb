"""The mapped-ram stream codec, checked byte by byte against docs/format.md."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migd.errors import FormatError
from migd.migration.mapped_ram.format import (
    MAPPED_RAM_ALIGN,
    PAGE_SIZE,
    QEVM_MAGIC,
    RAM_SECTION_ID,
    BlockLayout,
    ParsedStream,
    SaveLayout,
    bitmap_digest,
    decode_bitmap,
    encode_bitmap,
    parse_stream,
    plan_save,
    read_bitmap,
    set_runs,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def be16(v: int) -> bytes:
    return struct.pack(">H", v)


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def str8(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def round_up(v: int, align: int) -> int:
    return (v + align - 1) // align * align


class SparseFile:
    """An in-memory file made of pieces over zeros, so huge layouts cost nothing."""

    def __init__(self, size: int = 0, prefix: bytes = b"") -> None:
        self.pieces: list[tuple[int, bytes]] = [(0, prefix)] if prefix else []
        self.size = max(size, len(prefix))
        self.reads: list[tuple[int, int]] = []

    def write(self, offset: int, data: bytes) -> None:
        self.pieces.append((offset, data))
        self.size = max(self.size, offset + len(data))

    def read_at(self, offset: int, n: int) -> bytes:
        self.reads.append((offset, n))
        n = max(0, min(n, self.size - offset))
        out = bytearray(n)
        for at, data in self.pieces:  # later pieces win, like later writes
            lo, hi = max(at, offset), min(at + len(data), offset + n)
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - at : hi - at]
        return bytes(out)

    def parse(self, offset: int = 0, **kw: bool) -> ParsedStream:
        return parse_stream(self.read_at, offset, self.size, **kw)


def saved(layout: SaveLayout, *, end: bool = True, vmdesc: dict | None = None) -> SparseFile:
    """The file a save produces: head pieces, optionally the end section."""
    f = SparseFile(prefix=b"\xee" * layout.offset)  # a management header before O
    for at, data in layout.head_writes:
        f.write(at, data)
    if end:
        tail = qemu_shaped_end(layout) if vmdesc is None else layout.encode_end(vmdesc)
        f.write(layout.end_offset, tail)
    return f


def qemu_shaped_end(layout: SaveLayout) -> bytes:
    """The RAM end section as QEMU's files go on after it: device sections, then EOF. (A
    file that ends at EOF right after it is a migd save cut short: refused.)"""
    return layout.encode_end(None)[:-1] + DEVICE_GARBAGE + b"\x00"


# ---- QEMU-like streams, built independently of migd.format ------------------------

CAPS = b"\x05" + str8(b"configuration/capabilities") + be32(1) + be32(1) + str8(b"mapped-ram")
UUID = b"\x05" + str8(b"configuration/uuid") + be32(1) + bytes(range(16))
PAGE_BITS = b"\x05" + str8(b"configuration/target-page-bits") + be32(1) + be32(12)
QEMU_BLOCKS = ((b"pc.ram", 8 * PAGE_SIZE), (b"/rom@etc/acpi/tables", PAGE_SIZE))


def part(sid: int) -> bytes:
    return b"\x02" + be32(sid) + be64(0x10) + b"\x7e" + be32(sid)


def end(sid: int) -> bytes:
    return b"\x03" + be32(sid) + be64(0x10) + b"\x7e" + be32(sid)


SWITCHOVER = b"\x08" + be16(11) + be16(0)
DEVICE_GARBAGE = b"\x04" + be32(7) + str8(b"timer") + be32(0) + be32(2) + b"\xde\xad" * 20


def qemu_tail(sid: int) -> bytes:
    vmdesc = json.dumps({"page_size": 4096, "devices": []}).encode()
    return (
        part(sid) + part(sid) + SWITCHOVER + end(sid) + DEVICE_GARBAGE + b"\x00"
        + b"\x06" + be32(len(vmdesc)) + vmdesc
    )  # fmt: skip


def qemu_stream(
    blocks: tuple[tuple[bytes, int], ...] = QEMU_BLOCKS,
    *,
    offset: int = 0,
    machine: bytes = b"pc-q35-10.0",
    config: bytes = PAGE_BITS + CAPS + UUID,
    ram_start: bytes | None = None,
    sid: int = 2,
    mem_size: int | None = None,
    header: Callable[[int, dict[str, int]], None] = lambda i, h: None,
    tail: Callable[[int], bytes] = qemu_tail,
) -> SparseFile:
    """What QEMU writes: any machine, extra subsections, part sections, devices after."""
    f = SparseFile(prefix=b"\xee" * offset)
    pos = offset

    def put(data: bytes) -> None:
        nonlocal pos
        f.write(pos, data)
        pos += len(data)

    put(be32(QEVM_MAGIC) + be32(3) + b"\x07" + be32(len(machine)) + machine + config)
    put(ram_start or b"\x01" + be32(sid) + str8(b"ram") + be32(0) + be32(4))
    put(be64((sum(n for _, n in blocks) if mem_size is None else mem_size) | 0x4))
    for i, (name, length) in enumerate(blocks):
        put(str8(name) + be64(length))
        bitmap_offset = pos + 28
        bitmap_size = (length // PAGE_SIZE + 63) // 64 * 8
        h = dict(
            version=1,
            page_size=PAGE_SIZE,
            bitmap_offset=bitmap_offset,
            pages_offset=round_up(bitmap_offset + bitmap_size, MiB),
        )
        header(i, h)
        put(
            struct.pack(
                ">IQQQ", h["version"], h["page_size"], h["bitmap_offset"], h["pages_offset"]
            )
        )
        pos = h["pages_offset"] + length
        f.size = max(f.size, pos)
    put(be64(0x10) + b"\x7e" + be32(sid))
    put(tail(sid))
    return f


# ---- writing: byte layout ----------------------------------------------------------


def test_stream_head_is_byte_for_byte_the_documented_layout_for_machine_none() -> None:
    layout = plan_save([("ram0", 2 * MiB)])
    expected = (
        b"QEVM" + b"\x00\x00\x00\x03"
        + b"\x07" + b"\x00\x00\x00\x04" + b"none"
        + b"\x05" + b"\x1a" + b"configuration/capabilities" + b"\x00\x00\x00\x01"
        + b"\x00\x00\x00\x01" + b"\x0a" + b"mapped-ram"
        + b"\x01" + b"\x00\x00\x00\x01" + b"\x03" + b"ram"
        + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x04"
        + be64(2 * MiB | 0x4)
        + b"\x04" + b"ram0" + be64(2 * MiB)
    )  # fmt: skip
    (at0, head), (at1, tail) = layout.head_writes
    assert at0 == 0
    assert head[: len(expected)] == expected
    h = len(expected)
    assert layout.blocks[0].header_offset == h
    assert head[h:] == be32(1) + be64(4096) + be64(h + 28) + be64(MiB)
    assert len(head) == h + 28
    assert (at1, tail) == (MiB + 2 * MiB, be64(0x10) + b"\x7e" + be32(RAM_SECTION_ID))
    assert layout.end_offset == 3 * MiB + 13


def test_mem_size_record_is_the_sum_of_block_lengths_or_4() -> None:
    layout = plan_save([("a", 12 * KiB), ("b", 4 * KiB)])
    head = layout.head_writes[0][1]
    first = layout.blocks[0].header_offset - len(b"\x01a") - 8
    assert head[first - 8 : first] == be64(16 * KiB | 0x4)


def test_reference_example_q35_4gib_gives_qemus_offsets() -> None:
    # qemu-migration.md 1.8: H = 110, bitmap at 0x8A, 128 KiB bitmap, pages at 1 MiB.
    layout = plan_save([("pc.ram", 4 * GiB)], machine="pc-q35-9.1")
    (b,) = layout.blocks
    assert (b.header_offset, b.bitmap_offset, b.bitmap_size) == (110, 0x8A, 0x20000)
    assert b.pages_offset == 0x100000
    assert layout.head_writes[1][0] == 0x100100000


@pytest.mark.parametrize("offset", [0, 4096, 0x11921])
def test_pages_offset_is_absolute_and_1mib_aligned_with_unaligned_offset(offset: int) -> None:
    layout = plan_save([("pc.ram", 64 * MiB), ("vram", 16 * MiB)], offset=offset)
    assert layout.offset == offset
    assert layout.head_writes[0][0] == offset
    for b in layout.blocks:
        assert b.bitmap_offset == b.header_offset + 28
        assert b.pages_offset % MAPPED_RAM_ALIGN == 0
        assert (
            b.bitmap_offset + b.bitmap_size
            <= b.pages_offset
            < b.bitmap_offset + b.bitmap_size + MiB
        )
    b0 = layout.blocks[0]
    head = layout.head_writes[0][1]
    rel = b0.header_offset - offset
    assert head[rel : rel + 28] == be32(1) + be64(4096) + be64(b0.bitmap_offset) + be64(
        b0.pages_offset
    )
    parsed = saved(layout).parse(offset)
    assert parsed.blocks == layout.blocks


def test_block_of_64_mib_plus_12_kib_has_a_2056_byte_bitmap() -> None:
    layout = plan_save([("odd", 64 * MiB + 12 * KiB)])
    (b,) = layout.blocks
    assert b.pages == 16387
    assert b.bitmap_size == 2056  # ceil(16387 / 64) * 8
    assert b.pages_offset == round_up(b.bitmap_offset + 2056, MiB) == MiB
    assert b.page_offset(16386) == MiB + 16386 * 4096
    assert b.end == MiB + 64 * MiB + 12 * KiB
    with pytest.raises(IndexError):
        b.page_offset(16387)
    assert layout.head_writes[1][0] == b.end


def test_several_blocks_chain_each_record_after_the_previous_region() -> None:
    spec = [("pc.ram", 8 * MiB), ("/objects/mem1", 3 * MiB + 4 * KiB), ("x", 4 * KiB)]
    layout = plan_save(spec, offset=777)
    assert [(b.name, b.length) for b in layout.blocks] == spec
    assert len(layout.head_writes) == 4
    for prev, (at, piece), b in zip(
        layout.blocks, layout.head_writes[1:], layout.blocks[1:], strict=False
    ):
        assert at == prev.end
        assert piece == str8(b.name.encode()) + be64(b.length) + piece[-28:]
        assert b.header_offset == at + len(piece) - 28
        assert b.bitmap_offset > prev.end
    last_at, _ = layout.head_writes[-1]
    assert last_at == layout.blocks[-1].end
    assert layout.end_offset == last_at + 13


def test_end_section_is_end_eos_footer_eof_then_optional_compact_vmdescription() -> None:
    layout = plan_save([("ram0", 4096)])
    base = b"\x03" + be32(1) + be64(0x10) + b"\x7e" + be32(1) + b"\x00"
    assert layout.encode_end(None) == base
    desc = {"page_size": 4096, "devices": []}
    js = b'{"page_size":4096,"devices":[]}'
    assert layout.encode_end(desc) == base + b"\x06" + be32(len(js)) + js


@pytest.mark.parametrize(
    ("blocks", "offset", "text"),
    [
        ([], 0, "at least one RAM block"),
        ([("", 4096)], 0, "invalid RAM block name"),
        ([("x" * 256, 4096)], 0, "invalid RAM block name"),
        ([("\udc80", 4096)], 0, "invalid RAM block name"),
        ([("a", 0)], 0, "positive multiple of 4096"),
        ([("a", -4096)], 0, "positive multiple of 4096"),
        ([("a", 4095)], 0, "positive multiple of 4096"),
        ([("a", True)], 0, "positive multiple of 4096"),
        ([("a", 4096), ("a", 8192)], 0, "duplicate RAM block name"),
        ([("a", 4096)], -1, "invalid file offset"),
        ([("a", 1 << 63)], 0, "too large"),
        ([("a", 4096)], (1 << 63) - 8192, "too large"),  # the 1 MiB padding overflows off_t
    ],
)
def test_plan_save_rejects_bad_arguments_with_a_clear_error(
    blocks: list[tuple[str, int]], offset: int, text: str
) -> None:
    with pytest.raises(FormatError, match=text):
        plan_save(blocks, offset=offset)


def test_plan_save_rejects_an_empty_machine_name() -> None:
    with pytest.raises(FormatError, match="invalid machine type name"):
        plan_save([("a", 4096)], machine="")


def test_a_255_byte_utf8_block_name_is_accepted() -> None:
    name = "é" * 127 + "x"  # 255 bytes
    layout = plan_save([(name, 4096)])
    assert saved(layout).parse().blocks[0].name == name


# ---- bitmaps and runs --------------------------------------------------------------


def test_bitmap_bit_i_is_byte_i_div_8_with_mask_1_shl_i_mod_8() -> None:
    present = np.zeros(70, dtype=bool)
    present[[0, 9, 15, 69]] = True
    data = encode_bitmap(present, 16)
    assert data == bytes([0x01, 0x82, 0, 0, 0, 0, 0, 0, 0x20]) + bytes(7)
    assert decode_bitmap(data, 70).tolist() == present.tolist()


def test_decode_bitmap_ignores_padding_bits_and_rejects_short_data() -> None:
    assert decode_bitmap(b"\xff" * 8, 3).tolist() == [True, True, True]
    assert decode_bitmap(b"", 0).size == 0
    with pytest.raises(FormatError, match="truncated bitmap: expected 2 bytes, got 1"):
        decode_bitmap(b"\xff", 9)


def test_encode_bitmap_refuses_a_bitmap_larger_than_its_slot() -> None:
    with pytest.raises(ValueError):
        encode_bitmap(np.ones(65, dtype=bool), 8)


def test_set_runs_finds_maximal_runs_including_the_edges() -> None:
    assert set_runs(np.array([], dtype=bool)) == []
    assert set_runs(np.zeros(5, dtype=bool)) == []
    assert set_runs(np.ones(5, dtype=bool)) == [(0, 5)]
    bits = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=bool)
    assert set_runs(bits) == [(0, 2), (3, 1), (6, 3)]


@given(st.lists(st.booleans(), max_size=300))
def test_set_runs_and_the_bitmap_round_trip_agree_with_a_naive_scan(bits: list[bool]) -> None:
    present = np.array(bits, dtype=bool)
    naive, i = [], 0
    while i < len(bits):
        if bits[i]:
            j = i
            while j < len(bits) and bits[j]:
                j += 1
            naive.append((i, j - i))
            i = j
        else:
            i += 1
    assert set_runs(present) == naive
    size = (len(bits) + 63) // 64 * 8
    assert decode_bitmap(encode_bitmap(present, size), len(bits)).tolist() == bits


# ---- reading migd's own files ------------------------------------------------------


def test_round_trip_is_incomplete_before_the_end_section_and_complete_after() -> None:
    layout = plan_save([("pc.ram", 4 * MiB), ("ram1", 64 * KiB)], offset=0x11921)
    before = saved(layout, end=False).parse(0x11921)
    assert before.complete is False
    after = saved(layout).parse(0x11921)
    assert after == ParsedStream(
        machine="none",
        capabilities=("mapped-ram",),
        blocks=layout.blocks,
        complete=True,
        total_ram=4 * MiB + 64 * KiB,
    )


@pytest.mark.parametrize("offset", [0, 4096, 0x11921])
def test_round_trip_through_a_sparse_temp_file_keeps_the_bytes_before_offset(
    tmp_path: Path, offset: int
) -> None:
    path = tmp_path / "save.img"
    prefix = os.urandom(offset)
    layout = plan_save([("big", 64 * MiB + 12 * KiB), ("small", 8 * KiB)], offset=offset)
    present = np.zeros(layout.blocks[0].pages, dtype=bool)
    present[[1, 2, 16386]] = True
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, prefix, 0)
        for at, data in layout.head_writes:
            os.pwrite(fd, data, at)
        big = layout.blocks[0]
        for page in (1, 2, 16386):
            os.pwrite(fd, bytes([page % 251]) * PAGE_SIZE, big.page_offset(page))

        def read_at(off: int, n: int) -> bytes:
            return os.pread(fd, n, off)

        assert parse_stream(read_at, offset, os.fstat(fd).st_size).complete is False
        os.pwrite(fd, encode_bitmap(present, big.bitmap_size), big.bitmap_offset)
        os.pwrite(fd, qemu_shaped_end(layout), layout.end_offset)
        parsed = parse_stream(read_at, offset, os.fstat(fd).st_size)
        assert parsed.complete and parsed.blocks == layout.blocks
        assert os.pread(fd, offset, 0) == prefix
        pb = parsed.blocks[0]
        bits = decode_bitmap(os.pread(fd, pb.bitmap_size, pb.bitmap_offset), pb.pages)
        assert set_runs(bits) == [(1, 2), (16386, 1)]
        assert os.pread(fd, PAGE_SIZE, pb.page_offset(16386)) == bytes([16386 % 251]) * PAGE_SIZE
    finally:
        os.close(fd)


def test_parse_does_a_bounded_number_of_small_reads() -> None:
    layout = plan_save([(f"b{i}", 4096) for i in range(20)])
    f = saved(layout)
    assert f.parse().complete
    assert len(f.reads) < 20 * 10 + 40
    assert max(n for _, n in f.reads) <= 256


# ---- reading QEMU's files ----------------------------------------------------------


def test_qemu_stream_with_part_sections_switchover_and_devices_is_complete() -> None:
    f = qemu_stream(offset=0x11921)
    parsed = f.parse(0x11921)
    assert parsed.complete
    assert parsed.machine == "pc-q35-10.0"
    assert parsed.capabilities == ("mapped-ram",)
    assert parsed.total_ram == 9 * PAGE_SIZE
    assert [(b.name, b.length) for b in parsed.blocks] == [
        ("pc.ram", 8 * PAGE_SIZE),
        ("/rom@etc/acpi/tables", PAGE_SIZE),
    ]
    # It stops at the RAM end section: of the device section after it, only the record
    # type and the byte after it are read (to see whether a migd vmdescription follows,
    # behind EOF or a flipped EOF byte: it does not).
    (tail_at,) = [at for at, data in f.pieces if data == qemu_tail(2)]
    ram_end = tail_at + len(part(2) * 2 + SWITCHOVER + end(2))
    assert max(off + n for off, n in f.reads) == ram_end + 2


def test_qemu_stream_reads_pages_offset_from_the_header_not_recomputed() -> None:
    def spread(i: int, h: dict[str, int]) -> None:
        h["pages_offset"] += 3 * MiB + 4096 * i  # legal: aligned, after the bitmap

    parsed = qemu_stream(header=spread).parse()
    assert parsed.complete
    assert parsed.blocks[0].pages_offset == 4 * MiB
    assert parsed.blocks[1].pages_offset % MiB == 4096


@pytest.mark.parametrize(
    "tail",
    [
        lambda sid: b"",
        lambda sid: part(sid),
        lambda sid: part(sid) + SWITCHOVER,
        lambda sid: part(sid) + bytes(64),
        lambda sid: part(sid) + end(sid)[:-1],
        lambda sid: part(sid) + end(sid + 1),
        lambda sid: b"\x03" + be32(sid) + be64(0x14) + b"\x7e" + be32(sid),
        lambda sid: DEVICE_GARBAGE + end(sid),
        lambda sid: b"\x08" + be16(11) + be16(9999),
    ],
    ids=["eof", "parts-only", "switchover-only", "zeros", "cut-end", "foreign-end",
         "bad-flags", "device-first", "huge-command"],
)  # fmt: skip
def test_qemu_stream_without_a_valid_ram_end_section_is_incomplete_not_an_error(
    tail: Callable[[int], bytes],
) -> None:
    assert qemu_stream(tail=tail).parse().complete is False


def test_qemu_stream_with_section_id_zero_and_no_extra_subsections_parses() -> None:
    parsed = qemu_stream(sid=0, config=CAPS, machine=b"none").parse()
    assert parsed.complete and parsed.machine == "none"


# ---- reader errors -----------------------------------------------------------------


def hdr(i_bad: int, **fields: int | Callable[[dict[str, int]], int]) -> Callable:
    def mutate(i: int, h: dict[str, int]) -> None:
        if i == i_bad:
            for k, v in fields.items():
                h[k] = v(h) if callable(v) else v

    return mutate


def caps(*names: bytes, count: int | None = None) -> bytes:
    body = be32(len(names) if count is None else count) + b"".join(str8(n) for n in names)
    return b"\x05" + str8(b"configuration/capabilities") + be32(1) + body


def ram_start(*records: bytes, kind: int = 1, name: bytes = b"ram", version: int = 4) -> bytes:
    return bytes([kind]) + be32(2) + str8(name) + be32(0) + be32(version) + b"".join(records)


def shifted(field: str, delta: int) -> Callable[[dict[str, int]], int]:
    return lambda h: h[field] + delta


BAD_STREAMS: list[tuple[str, Callable[[], SparseFile], str]] = [
    ("machine-too-long", lambda: qemu_stream(machine=b"m" * 300), "machine type name too long"),
    (
        "unknown-subsection",
        lambda: qemu_stream(config=CAPS + b"\x05" + str8(b"configuration/foo") + be32(1)),
        "Unknown subsection 'configuration/foo'",
    ),
    (
        "subsection-version",
        lambda: qemu_stream(config=b"\x05" + str8(b"configuration/uuid") + be32(2)),
        "Unsupported version 2 of subsection 'configuration/uuid'",
    ),
    (
        "unknown-cap",
        lambda: qemu_stream(config=caps(b"frobnicate")),
        "Received unknown capability frobnicate",
    ),
    (
        "too-many-caps",
        lambda: qemu_stream(config=caps(count=0xFFFFFFFF)),
        "too many capabilities",
    ),
    (
        "no-caps-subsection",
        lambda: qemu_stream(config=UUID),
        "Capability mapped-ram is on, but received capability is off",
    ),
    (
        "empty-caps",
        lambda: qemu_stream(config=caps()),
        "migd reads only mapped-ram streams",
    ),
    (
        "x-ignore-shared",
        lambda: qemu_stream(config=caps(b"x-ignore-shared", b"mapped-ram")),
        "Capability x-ignore-shared is off, but received capability is on",
    ),
    (
        "page-bits",
        lambda: qemu_stream(config=PAGE_BITS.replace(be32(12), be32(16)) + CAPS),
        "Received TARGET_PAGE_BITS is 16",
    ),
    (
        "other-section-first",
        lambda: qemu_stream(ram_start=ram_start(name=b"block", version=1)),
        "Unsupported section 'block' before the RAM section",
    ),
    (
        "full-section-first",
        lambda: qemu_stream(ram_start=ram_start(kind=4)),
        "Unsupported section 'ram' before the RAM section",
    ),
    (
        "eof-instead-of-ram",
        lambda: qemu_stream(ram_start=b"\x00"),
        "Expected the RAM section start at offset 151, found record type 0x0",
    ),
    (
        "ram-version",
        lambda: qemu_stream(ram_start=ram_start(version=5)),
        "Unsupported RAM section version 5",
    ),
    (
        "header-version",
        lambda: qemu_stream(header=hdr(1, version=2)),
        r"Migration mapped-ram capability version not supported \(expected <= 1, got 2\)",
    ),
    (
        "page-size",
        lambda: qemu_stream(header=hdr(0, page_size=65536)),
        "ramblock pc.ram has page size 65536",
    ),
    (
        "alignment",
        lambda: qemu_stream(header=hdr(1, pages_offset=shifted("pages_offset", 512))),
        "Error reading ramblock /rom@etc/acpi/tables pages, region has bad alignment",
    ),
    (
        "bitmap-in-header",
        lambda: qemu_stream(header=hdr(0, bitmap_offset=shifted("bitmap_offset", -1))),
        "ramblock pc.ram bitmap at offset .* overlaps its header",
    ),
    (
        "bitmap-after-pages",
        lambda: qemu_stream(header=hdr(0, bitmap_offset=shifted("pages_offset", -4))),
        r"ramblock pc.ram bitmap \(8 bytes at offset .*\) does not fit before its pages",
    ),
    (
        "regions-overlap",
        lambda: qemu_stream(header=hdr(1, bitmap_offset=MiB, pages_offset=MiB)),
        "ramblock /rom@etc/acpi/tables bitmap at offset 1048576 overlaps its header",
    ),
    (
        "overshoot",
        lambda: qemu_stream(mem_size=4 * PAGE_SIZE),
        r"RAM block lengths exceed the MEM_SIZE total \(32768 > 16384\)",
    ),
    (
        "undershoot",
        lambda: qemu_stream(mem_size=10 * PAGE_SIZE),
        "RAM block with an empty name",
    ),
    (
        "bad-length",
        lambda: qemu_stream(((b"a", 4096 + 512),), mem_size=8192),
        "ramblock a has bad length 4608",
    ),
    (
        "duplicate-block",
        lambda: qemu_stream(((b"a", 4096), (b"a", 4096))),
        "duplicate ramblock a",
    ),
    (
        "bad-utf8-name",
        lambda: qemu_stream(((b"\xff", 4096),)),
        "RAM block name is not valid UTF-8",
    ),
    (
        "unexpected-flags",
        lambda: qemu_stream(ram_start=ram_start(be64(0x1000 | 0x8))),
        "Unexpected RAM flags: 8",
    ),
    (
        "no-mem-size",
        lambda: qemu_stream(ram_start=ram_start(be64(0x10), b"\x7e", be32(2))),
        "RAM section has no MEM_SIZE record",
    ),
    (
        "duplicate-mem-size",
        lambda: qemu_stream(ram_start=ram_start(be64(0x4))),
        "duplicate MEM_SIZE record",
    ),
]


@pytest.mark.parametrize(("make", "text"), [(m, t) for _, m, t in BAD_STREAMS],
                         ids=[i for i, _, _ in BAD_STREAMS])  # fmt: skip
def test_every_broken_qemu_stream_fails_with_a_clear_format_error(
    make: Callable[[], SparseFile], text: str
) -> None:
    with pytest.raises(FormatError, match=text):
        make().parse()


def test_wrong_magic_is_not_a_migration_stream() -> None:
    f = saved(plan_save([("a", 4096)]))
    f.write(0, b"\x7fELF")
    with pytest.raises(
        FormatError, match="Not a migration stream, magic: 0x7f454c46 != 0x5145564d"
    ):
        f.parse()


def test_stream_version_2_is_unsupported() -> None:
    f = saved(plan_save([("a", 4096)]))
    f.write(4, be32(2))
    with pytest.raises(FormatError, match="Unsupported migration stream version, 2 != 3"):
        f.parse()


def test_a_stream_without_configuration_section_is_refused() -> None:
    f = saved(plan_save([("a", 4096)]))
    f.write(8, b"\x01")
    with pytest.raises(FormatError, match="Configuration section missing, 0x1 != 0x7"):
        f.parse()


def test_mapped_ram_file_is_refused_when_the_reader_has_mapped_ram_off() -> None:
    f = saved(plan_save([("a", 4096)]))
    with pytest.raises(
        FormatError, match="Capability mapped-ram is off, but received capability is on"
    ):
        f.parse(require_mapped_ram=False)


def test_a_region_past_the_end_of_the_file_is_refused() -> None:
    layout = plan_save([("a", 4096), ("b", 8192)])
    f = saved(layout)
    f.size = layout.blocks[1].end - 1
    with pytest.raises(
        FormatError, match=r"ramblock b region \[.*\) extends past the end of the file"
    ):
        f.parse()


def test_missing_start_section_footer_is_an_error() -> None:
    layout = plan_save([("a", 4096)])
    f = saved(layout)
    f.write(layout.end_offset - 5, b"\x7f")
    with pytest.raises(FormatError, match="Missing section footer for ram"):
        f.parse()


@pytest.mark.parametrize("cut", [6, 9, 30, 60, 80, 95])
def test_a_file_cut_inside_the_head_reports_a_truncated_read(cut: int) -> None:
    f = saved(plan_save([("a", 4096)]))
    f.size = cut
    with pytest.raises(FormatError, match=r"truncated: expected \d+ bytes at offset \d+, got \d+"):
        f.parse()


def test_an_empty_file_is_said_to_be_empty_not_truncated() -> None:
    f = saved(plan_save([("a", 4096)]))
    f.size = 0
    with pytest.raises(FormatError, match=r"^the file is empty: not a save file$"):
        f.parse()
    f.size = 5
    with pytest.raises(FormatError, match="no migration stream at offset 5: the file has only 5"):
        f.parse(5)


def test_truncation_message_names_size_offset_and_got() -> None:
    f = saved(plan_save([("a", 4096)]))
    f.size = 6
    with pytest.raises(FormatError, match="truncated: expected 8 bytes at offset 0, got 6"):
        f.parse()


def test_a_short_read_from_the_callback_is_a_truncation_even_if_size_claims_more() -> None:
    f = saved(plan_save([("a", 4096)]))
    with pytest.raises(FormatError, match="truncated: expected 4 bytes at offset 9, got 2"):
        parse_stream(lambda off, n: f.read_at(off, n)[: 2 if off >= 9 else n], 0, f.size)


def test_offset_past_the_end_of_the_file_is_a_truncation() -> None:
    f = saved(plan_save([("a", 4096)]))
    with pytest.raises(FormatError, match="truncated"):
        f.parse(f.size + 10)
    with pytest.raises(FormatError, match="invalid file offset -1"):
        f.parse(-1)


# ---- bitmap trust: layout checks and migd's vmdescription ---------------------------


def test_a_bitmap_offset_that_does_not_follow_the_header_is_refused() -> None:
    # Still inside the region and before the pages, but it would read padding as bitmap.
    f = qemu_stream(header=hdr(0, bitmap_offset=shifted("bitmap_offset", 1)))
    with pytest.raises(FormatError, match=r"bitmap at offset \d+ does not follow its header"):
        f.parse()


def migd_file(present: list[np.ndarray], desc: dict | None = None) -> SparseFile:
    """A migd save of blocks a, b with these bitmaps and the vmdescription migd writes."""
    layout = plan_save([("a", len(present[0]) * PAGE_SIZE), ("b", len(present[1]) * PAGE_SIZE)])
    bitmaps = [encode_bitmap(p, b.bitmap_size) for p, b in zip(present, layout.blocks, strict=True)]
    if desc is None:
        desc = {
            "migd": {
                "blocks": [
                    {
                        "name": b.name,
                        "pages": b.pages,
                        "present": int(p.sum()),
                        "bitmap-sha256": bitmap_digest(data),
                    }
                    for b, p, data in zip(layout.blocks, present, bitmaps, strict=True)
                ]
            }
        }
    f = saved(layout, vmdesc=desc)
    for block, data in zip(layout.blocks, bitmaps, strict=True):
        f.write(block.bitmap_offset, data)
    return f


BITS = [np.array([1, 0, 1, 1, 0, 0, 0, 1, 1, 1], bool), np.array([0, 1, 1], bool)]


def test_migd_files_carry_the_counts_and_digest_that_read_bitmap_checks() -> None:
    f = migd_file(BITS)
    parsed = f.parse()
    assert [b.bitmap_check.present for b in parsed.blocks] == [6, 2]
    for block, bits in zip(parsed.blocks, BITS, strict=True):
        assert read_bitmap(f.read_at, block).tolist() == bits.tolist()


@pytest.mark.parametrize(
    ("byte", "text"),
    [
        (0b00001101, "it marks 5 pages present, the file's description says 6"),
        # Same population, other pages: only the digest sees it.
        (0b10001110, "its SHA-256 differs"),
        (0b10001101 | 0b01000000, "it marks 7 pages present"),
    ],
)
def test_a_corrupt_bitmap_of_a_migd_file_is_refused(byte: int, text: str) -> None:
    f = migd_file(BITS)
    block = f.parse().blocks[0]
    f.write(block.bitmap_offset, bytes([byte]))
    with pytest.raises(FormatError, match=f"bitmap of ramblock a is corrupt: {text}"):
        read_bitmap(f.read_at, block)


def test_a_flipped_padding_bit_is_caught_by_the_digest() -> None:
    f = migd_file(BITS)
    block = f.parse().blocks[1]
    f.write(block.bitmap_offset + 7, b"\x80")
    with pytest.raises(FormatError, match="SHA-256 differs"):
        read_bitmap(f.read_at, block)


def test_counts_without_a_digest_are_still_checked() -> None:
    desc = {"migd": {"blocks": [{"name": "a", "pages": 10, "present": 6},
                                {"name": "b", "pages": 3, "present": 3}]}}  # fmt: skip
    f = migd_file(BITS, desc)
    a, b = f.parse().blocks
    assert a.bitmap_check.sha256 is None
    assert read_bitmap(f.read_at, a).sum() == 6
    with pytest.raises(FormatError, match="marks 2 pages present, the file's description says 3"):
        read_bitmap(f.read_at, b)


def test_qemu_files_have_no_check_and_a_bitmap_is_taken_as_it_is() -> None:
    f = qemu_stream()
    for block in f.parse().blocks:
        assert block.bitmap_check is None
        assert read_bitmap(f.read_at, block).sum() == 0


def test_a_vmdescription_right_after_the_ram_end_without_migd_object_is_refused() -> None:
    """Only migd writes a vmdescription right after the RAM end section (QEMU writes its
    device sections there), always with its object: one without it is a migd file whose
    "migd" key was flipped, which read as QEMU's would go unchecked (red-team, session
    13)."""
    f = migd_file(BITS, {"page_size": 4096, "devices": []})
    with pytest.raises(FormatError, match="has no 'migd' object: the file is corrupt"):
        f.parse()


def _flip_byte(f: SparseFile, at: int, value: int) -> None:
    f.write(at, bytes([value]))


@pytest.mark.parametrize(
    ("where", "value", "error"),
    [
        (0, 0x01, "the byte after the RAM end section is 0x01, not EOF, before migd's"),
        (0, 0x04, "the byte after the RAM end section is 0x04, not EOF, before migd's"),
        (1, 0x07, "followed by EOF and then 0x07, which does not start a vmdescription"),
        (1, 0x00, "followed by EOF and then 0x00, which does not start a vmdescription"),
    ],
)
def test_a_flipped_eof_or_vmdescription_byte_does_not_make_a_migd_file_qemus(
    where: int, value: int, error: str
) -> None:
    layout = plan_save([("a", 10 * PAGE_SIZE), ("b", 3 * PAGE_SIZE)])
    f = migd_file(BITS)
    eof_at = layout.end_offset + len(layout.encode_end(None)) - 1
    _flip_byte(f, eof_at + where, value)
    with pytest.raises(FormatError, match=error):
        f.parse()


@pytest.mark.parametrize(
    ("migd", "error"),
    [
        ({"chucksums": {}}, r"unknown keys \['chucksums'\]"),
        ({"save-id": "\u001b[31m" + "0" * 27}, "save-id is not a save id"),
        ({"save-id": 5}, "save-id is not a save id"),
        ({"save-id": "0" * 31}, "save-id is not a save id"),
    ],
)
def test_a_migd_object_with_a_flipped_key_or_a_bad_save_id_is_refused(
    migd: dict[str, Any], error: str
) -> None:
    desc = {"migd": {"blocks": [], **migd}}
    f = migd_file(BITS, desc)
    with pytest.raises(FormatError, match=error):
        f.parse()


def test_a_vmdescription_nested_thousands_deep_is_a_format_error_not_a_crash() -> None:
    layout = plan_save([("a", 10 * PAGE_SIZE)])
    deep = b"[" * 5000 + b"]" * 5000
    f = saved(layout, end=False)
    f.write(layout.end_offset, layout.encode_end(None) + b"\x06" + be32(len(deep)) + deep)
    with pytest.raises(FormatError, match="nested too deeply"):
        f.parse()


BAD_DESCRIPTIONS = [
    ("not-a-dict", {"migd": []}),
    ("no-blocks", {"migd": {"version": "1"}}),
    ("one-block-missing", {"migd": {"blocks": [{"name": "a", "pages": 10, "present": 6}]}}),
    ("other-name", {"migd": {"blocks": [{"name": "x", "pages": 10, "present": 6},
                                        {"name": "b", "pages": 3, "present": 2}]}}),
    ("other-pages", {"migd": {"blocks": [{"name": "a", "pages": 11, "present": 6},
                                         {"name": "b", "pages": 3, "present": 2}]}}),
    ("no-present", {"migd": {"blocks": [{"name": "a", "pages": 10},
                                        {"name": "b", "pages": 3, "present": 2}]}}),
    ("present-too-big", {"migd": {"blocks": [{"name": "a", "pages": 10, "present": 11},
                                             {"name": "b", "pages": 3, "present": 2}]}}),
    ("present-bool", {"migd": {"blocks": [{"name": "a", "pages": 10, "present": True},
                                          {"name": "b", "pages": 3, "present": 2}]}}),
    ("bad-digest", {"migd": {"blocks": [{"name": "a", "pages": 10, "present": 6,
                                         "bitmap-sha256": "xyz"},
                                        {"name": "b", "pages": 3, "present": 2}]}}),
]  # fmt: skip


@pytest.mark.parametrize(
    "desc", [d for _, d in BAD_DESCRIPTIONS], ids=[i for i, _ in BAD_DESCRIPTIONS]
)
def test_a_migd_vmdescription_without_valid_counts_is_refused(desc: dict) -> None:
    with pytest.raises(FormatError, match="says migd wrote this file, but its per-block page"):
        migd_file(BITS, desc).parse()


@pytest.mark.parametrize(
    ("mangle", "text"),
    [
        (lambda js: js[:-1], "is not valid JSON"),
        (lambda js: js.replace(b'"migd"', b'"mi\xffd"'), "is not valid JSON"),
        (lambda js: b"[1,2]", "is not a JSON object"),
    ],
)
def test_a_mangled_vmdescription_is_an_error_not_a_crash(mangle: Callable, text: str) -> None:
    f = migd_file(BITS)
    layout = plan_save([("a", 10 * PAGE_SIZE), ("b", 3 * PAGE_SIZE)])
    js = f.read_at(layout.end_offset + 24, f.size)
    bad = mangle(js)
    f.size = layout.end_offset + 19
    f.write(layout.end_offset + 19, b"\x06" + be32(len(bad)) + bad)
    with pytest.raises(FormatError, match=text):
        f.parse()


def test_a_vmdescription_longer_than_the_file_is_truncated() -> None:
    f = migd_file(BITS)
    layout = plan_save([("a", 10 * PAGE_SIZE), ("b", 3 * PAGE_SIZE)])
    f.write(layout.end_offset + 20, be32(f.size))
    with pytest.raises(FormatError, match="truncated vmdescription"):
        f.parse()
    f.write(layout.end_offset + 20, be32(0xFFFFFFFF))
    with pytest.raises(FormatError, match="vmdescription too long"):
        f.parse()


# ---- hostile input -----------------------------------------------------------------

_FUZZ_LAYOUT = plan_save([("pc.ram", 16 * PAGE_SIZE), ("b", PAGE_SIZE)], offset=5)
_FUZZ_FILE = saved(_FUZZ_LAYOUT)
_FUZZ_PIECES = [*_FUZZ_LAYOUT.head_writes, (_FUZZ_LAYOUT.end_offset, _FUZZ_LAYOUT.encode_end())]
_FUZZ_SPOTS = [at + i for at, data in _FUZZ_PIECES for i in range(len(data))]


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(
        st.tuples(st.sampled_from(_FUZZ_SPOTS), st.integers(1, 255)), min_size=1, max_size=6
    ),
    cut=st.one_of(st.none(), st.integers(0, _FUZZ_FILE.size)),
    spot_cut=st.one_of(st.none(), st.sampled_from(_FUZZ_SPOTS)),
)
def test_mutated_streams_raise_only_format_error_and_never_hang(
    flips: list[tuple[int, int]], cut: int | None, spot_cut: int | None
) -> None:
    f = saved(_FUZZ_LAYOUT)
    for at, x in flips:
        f.write(at, bytes([f.read_at(at, 1)[0] ^ x]))
    f.size = min(s for s in (_FUZZ_FILE.size, cut, spot_cut) if s is not None)
    f.reads.clear()
    try:
        parsed = f.parse(5)
    except FormatError:
        pass
    else:
        for b in parsed.blocks:
            assert b.header_offset + 28 <= b.bitmap_offset <= b.pages_offset and b.end <= f.size
    assert len(f.reads) < 200
    assert all(n <= 256 for _, n in f.reads)


@settings(max_examples=60, deadline=2000)
@given(
    sizes=st.lists(st.integers(1, 1 << 20), min_size=1, max_size=6),
    offset=st.integers(0, 1 << 24),
)
def test_any_valid_plan_parses_back_to_the_same_layout(sizes: list[int], offset: int) -> None:
    layout = plan_save([(f"blk{i}", n * PAGE_SIZE) for i, n in enumerate(sizes)], offset=offset)
    parsed = saved(layout).parse(offset)
    assert parsed.complete and parsed.blocks == layout.blocks
    for b in layout.blocks:
        assert b.pages_offset % MAPPED_RAM_ALIGN == 0 and b.bitmap_offset == b.header_offset + 28
    assert isinstance(layout.blocks[0], BlockLayout)


@pytest.mark.parametrize("keep", [0, 1], ids=["before-eof", "after-eof"])
def test_a_migd_save_cut_at_its_ram_end_is_incomplete_not_qemus(keep: int) -> None:
    """Cut right before or after the EOF byte, a migd save lost its description and with
    it its checksums: it was read as QEMU's file, unchecked, and a flipped page was
    restored as `completed` (red-team, session 14)."""
    layout = plan_save([("a", 10 * PAGE_SIZE), ("b", 3 * PAGE_SIZE)])
    f = migd_file(BITS)
    f.size = layout.end_offset + len(layout.encode_end(None)) - 1 + keep
    with pytest.raises(FormatError, match="save file is incomplete: it ends at its RAM end"):
        f.parse()
