"""Every single-byte mutation of a real migd save's metadata: refused, or restored exactly.

A real save (three blocks, random and zero pages) is mutated one byte at a time over
all of its metadata: stream head, block records and headers, bitmaps, the RAM end
section, EOF and the vmdescription. Each byte is changed three ways (all bits, the low
bit, rotated by one: the same population of set bits, which counts alone cannot see).
For every mutated file the restore must be refused with a clear error, or give exactly
the memory that was saved: never other memory with `completed`.

The whole sweep runs through migd's own reader (format.parse_stream, the block match of
migrate-incoming and format.read_bitmap, which the restore uses) in-process; a sample
of each kind of mutation also runs through the daemon end to end.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from qemu.qmp import ExecuteError

from migd.errors import FormatError
from migd.migration.mapped_ram import checksum_table, format

from .conftest import add_file_backend, enable_mapped_ram, qmp_error, save, wait_migration

MiB = 1 << 20
PAGE = format.PAGE_SIZE
BACKENDS = {"ram0": 4 * MiB, "ram1": MiB, "ram2": 64 << 10}


def _memory(size: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    data = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    pages = size // PAGE
    for page in rng.choice(pages, pages // 4, replace=False).tolist():
        data[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
    data[: 9 * PAGE] = bytes(9 * PAGE)  # a zero first bitmap byte: a shifted bitmap shows
    return bytes(data)


def metadata_spans(raw: bytes) -> list[tuple[str, int, int]]:
    """(what, start, end) of every metadata byte range of a migd save at offset 0."""
    parsed = format.parse_stream(lambda at, n: raw[at : at + n], 0, len(raw))
    blocks = parsed.blocks
    spans = [("head", 0, blocks[0].bitmap_offset)]
    for i, block in enumerate(blocks):
        if i:
            spans.append((f"{block.name} record", blocks[i - 1].end, block.bitmap_offset))
        spans.append(
            (f"{block.name} bitmap", block.bitmap_offset, block.bitmap_offset + block.bitmap_size)
        )
    end = parsed.description_end
    spans.append(("end, EOF and vmdescription", blocks[-1].end, end))
    # The zero padding before the checksum table: its first and last bytes (all of its
    # 4 KiB would triple the sweep, and every byte is checked the same way).
    table_at = checksum_table.table_offset(end)
    spans.append(("padding", end, min(end + 16, table_at)))
    spans.append(("padding", max(end + 16, table_at - 16), table_at))
    spans.append(("checksum table", table_at, len(raw)))
    return spans


def mutated_bytes(value: int) -> list[int]:
    rotated = ((value << 1) | (value >> 7)) & 0xFF
    return sorted({value ^ 0xFF, value ^ 0x01, rotated} - {value})


def restored_by_migd(raw: bytes, sizes: dict[str, int]) -> dict[str, bytes] | str:
    """The memory a restore of `raw` into backends of `sizes` leaves, or why it refuses.

    The checks are migd's own, in the order the restore makes them; the pages are then
    taken from the file as the channels read them (a clear bit reads as a zero page), and
    each MiB of the result checked against the file's checksum table as the restore's
    default `verify` does (the xxh3-128 of the memory of each unit, docs/checksums.md).
    """

    def read_at(at: int, n: int) -> bytes:
        return raw[at : at + n]

    try:
        parsed = format.parse_stream(read_at, 0, len(raw))
        if not parsed.complete:
            return "save file is incomplete"
        table = checksum_table.read_table(read_at, parsed, len(raw))
        for block in parsed.blocks:  # migration._match_blocks, without skip-unmatched
            if sizes.get(block.name) != block.length:
                return f"no backend for block {block.name} of {block.length} bytes"
        out = {}
        for block in parsed.blocks:
            present = format.read_bitmap(read_at, block)
            slots = np.frombuffer(raw, np.uint8, block.length, block.pages_offset)
            pages = slots.reshape(-1, PAGE).copy()
            pages[~present] = 0
            out[block.name] = pages.tobytes()
        if table is not None:
            for block, digests in zip(parsed.blocks, table.digests, strict=True):
                memory = out[block.name]
                units = [memory[at : at + MiB] for at in range(0, len(memory), MiB)]
                if b"".join(xxhash.xxh3_128_digest(u) for u in units) != digests:
                    return f"checksum mismatch in {block.name}"
        return out
    except FormatError as exc:
        return exc.desc


def write_sparse(path: Path, data: bytes) -> None:
    """Zero pages as holes: the save finds them page by page (SEEK_HOLE), so the bitmaps
    get scattered clear bits (the zero scan only skips runs of 1 MiB)."""
    with open(path, "wb") as f:
        f.truncate(len(data))
        for at in range(0, len(data), PAGE):
            if any(data[at : at + PAGE]):
                os.pwrite(f.fileno(), data[at : at + PAGE], at)


@pytest.fixture
async def saved(qmp, shm: Path, short_dir: Path) -> dict[str, Any]:
    """A real migd save of three backends; the backends then hold other data."""
    original = {}
    for seed, (id, size) in enumerate(BACKENDS.items()):
        original[id] = _memory(size, seed + 50)
        write_sparse(shm / id, original[id])
        await add_file_backend(qmp, id, shm / id, size)
    await enable_mapped_ram(qmp, channels=2)
    assert (await save(qmp, short_dir / "good.img"))["status"] == "completed"
    other = {id: _memory(size, seed + 70) for seed, (id, size) in enumerate(BACKENDS.items())}
    for id, data in other.items():
        (shm / id).write_bytes(data)
    return {"raw": (short_dir / "good.img").read_bytes(), "original": original, "other": other}


def sweep(raw: bytes, original: dict[str, bytes]) -> dict[str, Any]:
    """Every mutation of every metadata byte, through migd's reader."""
    sizes = {name: len(data) for name, data in original.items()}
    figures: dict[str, Any] = {"mutations": 0, "refused": 0, "exact": 0, "wrong": []}
    data = bytearray(raw)
    for what, start, stop in metadata_spans(raw):
        for at in range(start, stop):
            value = data[at]
            for new in mutated_bytes(value):
                data[at] = new
                result = restored_by_migd(bytes(data), sizes)
                figures["mutations"] += 1
                if isinstance(result, str):
                    figures["refused"] += 1
                elif result == original:
                    figures["exact"] += 1
                else:
                    figures["wrong"].append((what, at, value, new))
            data[at] = value
    return figures


async def test_every_single_byte_mutation_of_the_metadata_is_refused_or_exact(saved):
    assert (
        restored_by_migd(saved["raw"], {n: len(d) for n, d in saved["original"].items()})
        == (saved["original"])
    )
    figures = sweep(saved["raw"], saved["original"])
    wrong = figures["wrong"]
    print(
        f"\n{figures['mutations']} mutations: {figures['refused']} refused, "
        f"{figures['exact']} restored exactly, {len(wrong)} silently wrong"
    )
    assert figures["mutations"] > 2000
    assert not wrong, f"{len(wrong)} mutations restore other memory, e.g. {wrong[:5]}"


def _bitmap_of(raw: bytes, name: str) -> format.BlockLayout:
    parsed = format.parse_stream(lambda at, n: raw[at : at + n], 0, len(raw))
    return next(b for b in parsed.blocks if b.name == name)


def _samples(raw: bytes) -> list[tuple[str, int, int]]:
    """(kind, offset, new byte): one mutation of each kind, for the end-to-end runs."""
    ram0 = _bitmap_of(raw, "ram0")
    ram1 = _bitmap_of(raw, "ram1")
    first = next(at for at in range(ram0.bitmap_offset + 2, ram1.header_offset) if raw[at])
    end = _bitmap_of(raw, "ram2").end + 13  # the RAM end section's record type
    vmdesc = raw.rindex(b'"present":')
    vmdesc_end = format.parse_stream(lambda at, n: raw[at : at + n], 0, len(raw)).description_end
    machine = raw.index(b"none")
    bitmap = range(ram1.bitmap_offset, ram1.bitmap_offset + ram1.bitmap_size)
    last = next(at for at in bitmap if raw[at] not in (0, 0xFF))  # rotating it changes it
    return [
        ("bitmap bit cleared", first, raw[first] & (raw[first] - 1)),
        ("bitmap rotated", last, ((raw[last] << 1) | (raw[last] >> 7)) & 0xFF),
        ("bitmap offset moved", ram0.header_offset + 19, (raw[ram0.header_offset + 19] + 8) & 0xFF),
        ("vmdescription count", vmdesc + 10, ord("9") if raw[vmdesc + 10] != ord("9") else 49),
        ("vmdescription brace", vmdesc_end - 1, ord("]")),
        ("checksum table", len(raw) - 5, raw[len(raw) - 5] ^ 0x01),
        ("padding", vmdesc_end, 0x20),
        ("end section", end, raw[end] ^ 0xFF),
        ("machine name", machine, ord("m")),
    ]


async def test_mutated_files_through_the_daemon_are_refused_or_restored_exactly(
    saved, qmp, shm: Path, short_dir: Path
):
    raw, original, other = saved["raw"], saved["original"], saved["other"]
    sizes = {n: len(d) for n, d in original.items()}
    target = short_dir / "mutated.img"
    for kind, at, new in _samples(raw):
        data = bytearray(raw)
        assert data[at] != new, kind
        data[at] = new
        target.write_bytes(bytes(data))
        expected = restored_by_migd(bytes(data), sizes)
        for id, memory in other.items():
            (shm / id).write_bytes(memory)
        try:
            await qmp.execute("migrate-incoming", {"uri": f"file:{target}"})
        except ExecuteError as exc:
            status, desc = "refused", exc.error.error.desc
        else:
            info = await wait_migration(qmp)
            status, desc = info["status"], info.get("error-desc", "")
        memory = {id: (shm / id).read_bytes() for id in BACKENDS}
        if status == "completed":
            assert memory == original, f"{kind}: completed with other memory"
            assert not isinstance(expected, str), f"{kind}: in-process says {expected}"
        else:
            assert status in ("refused", "failed"), (kind, status)
            assert str(target) in desc and "Internal error" not in desc, (kind, desc)
            assert memory == other, f"{kind}: a refused restore changed memory"
            assert isinstance(expected, str), f"{kind}: in-process restores it, daemon: {desc}"
        print(f"{kind}: {status} {desc}")
    assert os.path.getsize(short_dir / "good.img") == len(raw)


async def test_an_empty_save_file_is_refused_as_empty_naming_it(qmp, shm: Path, short_dir: Path):
    await add_file_backend(qmp, "ram0", shm / "ram0", MiB)
    await enable_mapped_ram(qmp)
    empty = short_dir / "empty.img"
    empty.touch()
    desc = await qmp_error(qmp, "migrate-incoming", {"uri": f"file:{empty}"})
    assert desc == f"'{empty}': the file is empty: not a save file"
