"""What a save puts where: bitmaps, holes for skipped zero runs, offsets, several blocks."""

from __future__ import annotations

import os

import numpy as np
import pytest

from .conftest import (
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    parse_save,
    read_bitmap,
    read_pages,
    save,
)

MiB = 1 << 20
PAGE = 4096


def _is_hole(path, start, length) -> bool:
    """True when [start, start+length) holds no allocated data (SEEK_DATA jumps past it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            nxt = os.lseek(fd, start, os.SEEK_DATA)
        except OSError:
            return True  # no data after start at all
        return nxt >= start + length
    finally:
        os.close(fd)


def _zero_clusters(path, size, clusters, seed=3):
    """Random memory with the given 2 MiB clusters zeroed."""
    data = bytearray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8))
    for c in clusters:
        data[c * 2 * MiB : (c + 1) * 2 * MiB] = bytes(2 * MiB)
    path.write_bytes(data)
    return bytes(data)


async def test_long_zero_runs_are_skipped_as_holes_with_clear_bits(qmp, shm, short_dir):
    size = 16 * MiB
    data = _zero_clusters(shm / "ram0", size, clusters=[1, 2, 6])
    await add_file_backend(qmp, "ram0", shm / "ram0", size)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    info = await save(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    block = parse_save(short_dir / "save.img").blocks[0]
    bits = read_bitmap(short_dir / "save.img", block)
    zero_pages = np.frombuffer(data, np.uint8).reshape(-1, PAGE).any(axis=1) == 0
    assert not bits[zero_pages].any() and bits[~zero_pages].all()
    assert info["ram"]["duplicate"] == int(zero_pages.sum()) == 3 * 512
    assert info["ram"]["normal"] == int((~zero_pages).sum())
    for c in (1, 2, 6):
        assert _is_hole(short_dir / "save.img", block.pages_offset + c * 2 * MiB, 2 * MiB)
    assert not _is_hole(short_dir / "save.img", block.pages_offset, 2 * MiB)
    saved = bytearray(read_pages(short_dir / "save.img", block))
    assert bytes(saved) == data  # holes read as zeros, everything else is the data


async def test_short_zero_runs_are_written_inline_and_keep_their_bits(qmp, shm, short_dir):
    size = 8 * MiB
    data = bytearray(np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8))
    scattered = np.random.default_rng(6).choice(size // PAGE, size // PAGE // 3, replace=False)
    for page in scattered:
        data[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
    (shm / "ram0").write_bytes(data)
    await add_file_backend(qmp, "ram0", shm / "ram0", size)
    await enable_mapped_ram(qmp, channels=2)
    info = await save(qmp, short_dir / "save.img")
    block = parse_save(short_dir / "save.img").blocks[0]
    # scattered zero pages do not break the writes into 4 KiB pieces: they are written
    assert read_bitmap(short_dir / "save.img", block).all()
    assert info["ram"]["duplicate"] == 0
    assert read_pages(short_dir / "save.img", block) == bytes(data)


async def test_zero_page_detection_none_writes_every_page(qmp, shm, short_dir):
    size = 8 * MiB
    data = _zero_clusters(shm / "ram0", size, clusters=[0, 1, 2])
    await add_file_backend(qmp, "ram0", shm / "ram0", size)
    await enable_mapped_ram(qmp, channels=2, **{"zero-page-detection": "none"})
    info = await save(qmp, short_dir / "save.img")
    block = parse_save(short_dir / "save.img").blocks[0]
    assert read_bitmap(short_dir / "save.img", block).all()
    assert info["ram"]["normal"] == size // PAGE and info["ram"]["duplicate"] == 0
    assert read_pages(short_dir / "save.img", block) == data


async def test_never_touched_pages_of_a_sparse_backend_are_found_without_reading(
    qmp, shm, short_dir
):
    size = 32 * MiB
    with open(shm / "sparse", "wb") as f:
        f.truncate(size)
        f.seek(5 * MiB)
        f.write(b"x" * PAGE)
    await add_file_backend(qmp, "ram0", shm / "sparse", size)
    await enable_mapped_ram(qmp, channels=2)
    info = await save(qmp, short_dir / "save.img")
    assert info["ram"]["duplicate"] == size // PAGE - 1
    block = parse_save(short_dir / "save.img").blocks[0]
    bits = read_bitmap(short_dir / "save.img", block)
    assert np.flatnonzero(bits).tolist() == [5 * MiB // PAGE]


async def test_several_blocks_of_odd_sizes_each_get_an_aligned_region(qmp, shm, short_dir):
    sizes = {"ram0": 64 * MiB + 12 * 1024, "vram": 3 * PAGE}
    datas = {
        name: fill_random(shm / name, size, seed=i) for i, (name, size) in enumerate(sizes.items())
    }
    for name, size in sizes.items():
        await add_file_backend(qmp, name, shm / name, size)
    await qmp.execute(
        "object-add",
        {
            "qom-type": "memory-backend-ram",
            "id": "anon",
            "size": 2 * MiB,
            "ramblock-name": "pc.bios",
        },
    )
    await enable_mapped_ram(qmp, channels=8, direct_io=True)
    info = await save(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    parsed = parse_save(short_dir / "save.img")
    assert parsed.complete
    assert {b.name: b.length for b in parsed.blocks} == {**sizes, "pc.bios": 2 * MiB}
    assert parsed.total_ram == sum(sizes.values()) + 2 * MiB
    for block in parsed.blocks:
        assert block.pages_offset % MiB == 0
        assert block.bitmap_offset == block.header_offset + 28
        if block.name in datas:
            assert read_pages(short_dir / "save.img", block) == datas[block.name]
        else:  # fresh anonymous memory is all zero pages: nothing written
            assert not read_bitmap(short_dir / "save.img", block).any()


@pytest.mark.parametrize("offset", [4096, 0x11921])
async def test_bytes_before_the_offset_survive_and_offsets_are_absolute(
    qmp, shm, short_dir, offset
):
    data = fill_random(shm / "ram0", 4 * MiB)
    header = os.urandom(offset)
    target = short_dir / "save.img"
    target.write_bytes(header + b"old save data that must go" * 1000)
    await add_file_backend(qmp, "ram0", shm / "ram0", 4 * MiB)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    assert (await save(qmp, target, offset=offset))["status"] == "completed"
    assert target.read_bytes()[:offset] == header
    block = parse_save(target, offset).blocks[0]
    assert block.header_offset > offset and block.pages_offset % MiB == 0
    assert read_pages(target, block) == data


async def test_save_without_multifd_goes_through_the_main_channel(qmp, shm, short_dir):
    data = fill_random(shm / "ram0", 4 * MiB)
    await add_file_backend(qmp, "ram0", shm / "ram0", 4 * MiB)
    await enable_mapped_ram(qmp, multifd=False, direct_io=True)  # direct-io has no effect
    info = await save(qmp, short_dir / "save.img")
    assert info["status"] == "completed"
    block = parse_save(short_dir / "save.img").blocks[0]
    assert read_pages(short_dir / "save.img", block) == data


async def test_vmdescription_carries_migds_metadata(qmp, shm, short_dir):
    import hashlib
    import json

    import xxhash

    data = fill_random(shm / "ram0", MiB)
    await add_file_backend(qmp, "ram0", shm / "ram0", MiB)
    await enable_mapped_ram(qmp)
    await save(qmp, short_dir / "save.img")
    raw = (short_dir / "save.img").read_bytes()
    at = parse_save(short_dir / "save.img").description_end
    length = length_of_json(raw, at)
    desc = json.loads(raw[at - length : at])
    bitmap = hashlib.sha256(b"\xff" * 32).hexdigest()  # 256 pages, all present
    assert desc["migd"]["blocks"] == [
        {"name": "ram0", "pages": 256, "present": 256, "bitmap-sha256": bitmap}
    ]
    # docs/checksums.md: the table at the next 4 KiB boundary, zeros before it, one
    # xxh3-128 per MiB of memory, and nothing after it.
    table_at = -(-at // 4096) * 4096
    assert raw[at:table_at] == bytes(table_at - at)
    table = raw[table_at:]
    assert table == xxhash.xxh3_128_digest(data)
    assert desc["migd"]["checksums"] == {
        "algorithm": "xxh3-128",
        "unit-bytes": MiB,
        "table-bytes": 16,
        "table-xxh3-128": xxhash.xxh3_128_hexdigest(table),
    }
    assert len(desc["migd"]["save-id"]) == 32


def length_of_json(raw: bytes, end: int) -> int:
    """The length of the vmdescription JSON that ends at `end` (its be32 length before it)."""
    for length in range(2, 1 << 16):
        if int.from_bytes(raw[end - length - 4 : end - length], "big") == length:
            return length
    raise AssertionError("no vmdescription length found")


def test_zero_scan_reports_only_zero_runs_long_enough_to_skip() -> None:
    from migd.io.zero_scan import MIN_SKIP_PAGES, runs_to_write, zero_pages

    pages = 4 * MIN_SKIP_PAGES
    data = np.random.default_rng(4).integers(1, 256, (pages, PAGE), dtype=np.uint8)
    data[0:200:3] = 0  # scattered zero pages: written inline, never reported
    data[MIN_SKIP_PAGES : 2 * MIN_SKIP_PAGES + 10] = 0  # a long run: skipped
    data[3 * MIN_SKIP_PAGES :] = 0
    cut = 3 * MIN_SKIP_PAGES + 100
    data[cut, 100] = 1  # its first word is zero: the run is scanned, both halves too short
    zero = zero_pages(memoryview(bytearray(data.tobytes())))
    expected = np.zeros(pages, dtype=bool)
    expected[MIN_SKIP_PAGES : 2 * MIN_SKIP_PAGES + 10] = True
    assert zero.tolist() == expected.tolist()
    # ... and neither half is long enough to skip: only the first run is left out
    assert runs_to_write(zero) == [
        (0, MIN_SKIP_PAGES),
        (2 * MIN_SKIP_PAGES + 10, 2 * MIN_SKIP_PAGES - 10),
    ]
