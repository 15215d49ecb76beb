"""Checksummed saves (docs/checksums.md): every MiB of memory is checked on restore.

A real save of two backends (random pages, zero runs the save skips, scattered zero
pages, a block whose last unit is short) is restored after single-bit flips at random
offsets in its page data: each restore must fail, naming the file, the block and the
unit's file offset, with `verify` on (memory then partial, and said so) and with
`before-write` (memory untouched). Flips in the checksum table, its padding, a file cut
short or extended are refused before anything changes. A file saved with N channels
verifies with M; QEMU's files and saves without checksums restore unverified, and say so.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from migd.migration.mapped_ram import checksum_table

from .conftest import (
    add_file_backend,
    enable_mapped_ram,
    parse_save,
    qmp_error,
    read_bitmap,
    restore,
    save,
    wait_migration,
)

MiB = 1 << 20
PAGE = 4096
SIZES = {"ram0": 4 * MiB, "ram1": MiB + 8 * PAGE}  # ram1: a last unit of 8 pages
FLIPS = 12


def _memory(size: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    data = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    pages = size // PAGE
    for page in rng.choice(pages, pages // 8, replace=False).tolist():
        data[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)  # scattered zero pages
    if size >= 4 * MiB:
        data[MiB : 2 * MiB + 3 * PAGE] = bytes(MiB + 3 * PAGE)  # a zero run the save skips
    return bytes(data)


@pytest.fixture
async def saved(qmp, shm: Path, short_dir: Path) -> dict[str, Any]:
    """A checksummed save with 4 channels; the backends then hold other data."""
    original = {}
    for seed, (id, size) in enumerate(SIZES.items()):
        original[id] = _memory(size, seed + 10)
        (shm / id).write_bytes(original[id])
        await add_file_backend(qmp, id, shm / id, size)
    await enable_mapped_ram(qmp, channels=4)
    info = await save(qmp, short_dir / "good.img")
    assert info["status"] == "completed", info
    other = {id: _memory(size, seed + 20) for seed, (id, size) in enumerate(SIZES.items())}
    _put(shm, other)
    return {"path": short_dir / "good.img", "original": original, "other": other, "info": info}


def _put(shm: Path, memory: dict[str, bytes]) -> None:
    for id, data in memory.items():
        with open(shm / id, "r+b") as f:
            f.write(data)


def _memory_of(shm: Path) -> dict[str, bytes]:
    return {id: (shm / id).read_bytes() for id in SIZES}


def _units(size: int) -> int:
    return -(-size // MiB)


def _present_page_offsets(path: Path) -> list[tuple[str, int, int]]:
    """(block, page index, file offset) of every present page of the save."""
    out = []
    for block in parse_save(path).blocks:
        for page in np.flatnonzero(read_bitmap(path, block)).tolist():
            out.append((block.name, page, block.pages_offset + page * PAGE))
    return out


def _flipped(path: Path, target: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    target.write_bytes(bytes(data))


def _unit_offset(path: Path, block_name: str, page: int) -> int:
    block = next(b for b in parse_save(path).blocks if b.name == block_name)
    return block.pages_offset + page // 256 * MiB


async def test_a_save_records_a_checksum_of_every_mib_and_its_restore_is_verified(saved, qmp, shm):
    units = sum(_units(s) for s in SIZES.values())
    assert "x-checksums" not in saved["info"]  # a save's members are QEMU's
    # Independently of migd's hashing code: each unit is the xxh3-128 of its memory.
    parsed = parse_save(saved["path"])
    raw = saved["path"].read_bytes()
    table = raw[checksum_table.table_offset(parsed.description_end) :]
    expected = b"".join(
        xxhash.xxh3_128_digest(saved["original"][b.name][at : at + MiB])
        for b in parsed.blocks
        for at in range(0, b.length, MiB)
    )
    assert table == expected
    save_id = parsed.migd["save-id"]
    assert len(save_id) == 32 and parsed.migd["checksums"]["table-bytes"] == 16 * units

    info = await restore(qmp, saved["path"])
    assert info["status"] == "completed", info
    assert info["x-checksums"] == {
        "state": "verified", "units": units, "units-done": units, "save-id": save_id
    }  # fmt: skip
    assert _memory_of(shm) == saved["original"]


async def test_every_bit_flip_in_page_data_fails_the_restore_naming_block_and_offset(
    saved, qmp, shm, short_dir
):
    path, target = saved["path"], short_dir / "flipped.img"
    rng = random.Random(16)
    for block_name, page, offset in rng.sample(_present_page_offsets(path), FLIPS):
        at = offset + rng.randrange(PAGE)
        _flipped(path, target, at, rng.randrange(8))
        info = await restore(qmp, target)
        unit_at = _unit_offset(path, block_name, page)
        assert info["status"] == "failed", (at, info)
        assert info["error-desc"].startswith(
            f"'{target}': checksum mismatch in ramblock '{block_name}' at file offset {unit_at:#x} "
        ), info
        assert info["error-desc"].endswith("memory backends 'ram0', 'ram1' hold partial data")
        assert info["x-checksums"]["state"] == "mismatch"


async def test_with_verify_before_write_a_flip_changes_no_memory(saved, qmp, shm, short_dir):
    path, target = saved["path"], short_dir / "flipped.img"
    rng = random.Random(61)
    for block_name, page, offset in rng.sample(_present_page_offsets(path), FLIPS // 2):
        _flipped(path, target, offset + rng.randrange(PAGE), rng.randrange(8))
        info = await restore(qmp, target, verify="before-write")
        assert info["status"] == "failed", info
        unit_at = _unit_offset(path, block_name, page)
        assert f"ramblock '{block_name}' at file offset {unit_at:#x} " in info["error-desc"]
        assert info["error-desc"].endswith("; no memory backend was changed"), info
        assert _memory_of(shm) == saved["other"]
    info = await restore(qmp, path, verify="before-write")
    assert info["status"] == "completed", info
    assert info["x-checksums"]["state"] == "verified"
    assert _memory_of(shm) == saved["original"]


async def test_with_verify_off_a_flip_restores_and_query_migrate_says_unverified(
    saved, qmp, shm, short_dir
):
    """What the checks prevent: the same flip, unchecked, is wrong memory as `completed`."""
    path, target = saved["path"], short_dir / "flipped.img"
    _, _, offset = _present_page_offsets(path)[5]
    _flipped(path, target, offset + 100, 3)
    info = await restore(qmp, target, verify="off")
    assert info["status"] == "completed"
    assert info["x-checksums"]["state"] == "unverified"
    assert info["x-checksums"]["note"] == "'verify' is off"
    assert _memory_of(shm) != saved["original"]


@pytest.mark.parametrize("where", ["table", "padding"])
async def test_a_flip_in_the_checksum_table_or_its_padding_is_refused_before_any_change(
    saved, qmp, shm, short_dir, where
):
    path, target = saved["path"], short_dir / "flipped.img"
    end = parse_save(path).description_end
    table_at = checksum_table.table_offset(end)
    at = {"table": os.path.getsize(path) - 7, "padding": table_at - 1}[where]
    _flipped(path, target, at, 0)
    desc = await qmp_error(qmp, "migrate-incoming", {"uri": f"file:{target}"})
    expected = {
        "table": f"the checksum table at offset {table_at:#x} does not match its digest",
        "padding": f"the padding before the checksum table at {table_at:#x} is not zero",
    }[where]
    assert desc.startswith(f"'{target}': {expected}"), desc
    assert _memory_of(shm) == saved["other"]


@pytest.mark.parametrize("change", ["truncated", "extended"])
async def test_a_file_cut_short_or_extended_is_refused_before_any_change(
    saved, qmp, shm, short_dir, change
):
    path, target = saved["path"], short_dir / "changed.img"
    raw = path.read_bytes()
    target.write_bytes(raw[:-1] if change == "truncated" else raw + b"\0")
    desc = await qmp_error(qmp, "migrate-incoming", {"uri": f"file:{target}"})
    expected = {
        "truncated": f"the checksum table is cut short: it ends at offset {len(raw):#x}, "
        f"the file at {len(raw) - 1:#x} (the file is truncated)",
        "extended": f"the file goes on 1 byte after the end of the save at offset "
        f"{len(raw):#x}: it was extended or appended to",
    }[change]
    assert desc == f"'{target}': {expected}"
    assert _memory_of(shm) == saved["other"]


@pytest.mark.parametrize(("multifd", "channels"), [(False, 1), (True, 3)])
async def test_a_file_saved_with_four_channels_verifies_with_another_count(
    saved, qmp, shm, multifd, channels
):
    await enable_mapped_ram(qmp, multifd=multifd, channels=channels)
    info = await restore(qmp, saved["path"])
    assert info["status"] == "completed", info
    assert info["x-checksums"]["state"] == "verified"
    assert _memory_of(shm) == saved["original"]


async def test_a_save_without_checksums_has_no_table_and_restores_unverified(qmp, shm, short_dir):
    data = _memory(2 * MiB, seed=3)
    (shm / "ram0").write_bytes(data)
    await add_file_backend(qmp, "ram0", shm / "ram0", 2 * MiB)
    await enable_mapped_ram(qmp)
    await qmp.execute("migrate", {"uri": f"file:{short_dir}/plain.img", "checksums": False})
    info = await wait_migration(qmp)
    assert info["status"] == "completed"
    parsed = parse_save(short_dir / "plain.img")
    assert "checksums" not in parsed.migd
    assert os.path.getsize(short_dir / "plain.img") == parsed.description_end
    (shm / "ram0").write_bytes(bytes(2 * MiB))
    info = await restore(qmp, short_dir / "plain.img", verify="before-write")
    assert info["status"] == "completed", info
    assert info["x-checksums"]["state"] == "unverified"
    assert info["x-checksums"]["note"].startswith("the file has no checksums")
    assert (shm / "ram0").read_bytes() == data


async def test_units_of_holes_and_of_zero_runs_have_the_checksum_of_zeros(qmp, shm, short_dir):
    """A sparse backend: units the save never reads still get (zero) checksums."""
    size = 3 * MiB
    with open(shm / "ram0", "wb") as f:
        f.truncate(size)
        f.seek(2 * MiB + 5 * PAGE)
        f.write(b"x" * PAGE)
    await add_file_backend(qmp, "ram0", shm / "ram0", size)
    await enable_mapped_ram(qmp)
    assert (await save(qmp, short_dir / "sparse.img"))["status"] == "completed"
    raw = (short_dir / "sparse.img").read_bytes()
    table = raw[checksum_table.table_offset(parse_save(short_dir / "sparse.img").description_end) :]
    memory = (shm / "ram0").read_bytes()
    assert table == b"".join(
        xxhash.xxh3_128_digest(memory[a : a + MiB]) for a in range(0, size, MiB)
    )
    (shm / "ram0").write_bytes(os.urandom(size))
    info = await restore(qmp, short_dir / "sparse.img")
    assert info["x-checksums"]["state"] == "verified"
    assert (shm / "ram0").read_bytes() == memory


async def test_skipped_blocks_are_not_counted_as_verified(saved, qmp, shm):
    await qmp.execute("object-del", {"id": "ram1"})
    info = await restore(qmp, saved["path"], **{"skip-unmatched-blocks": True})
    assert info["status"] == "completed", info
    assert info["x-skipped-blocks"] == ["ram1"]
    assert info["x-checksums"]["units"] == info["x-checksums"]["units-done"] == 4
    assert (shm / "ram0").read_bytes() == saved["original"]["ram0"]


async def test_a_flip_after_the_whole_file_check_passed_is_still_caught_as_pages_land(
    saved, qmp, shm, short_dir, monkeypatch
):
    """`before-write` checks the whole file, then reads it again to restore it: a byte
    that changes in between (another writer, a disk that returns other bytes the second
    time) must still fail the restore, never complete with it (red-team, session 17: held;
    this guards the second check, which an optimisation could take for redundant)."""
    from migd.migration import engine as engine_module

    path, target = saved["path"], short_dir / "changing.img"
    target.write_bytes(path.read_bytes())
    block_name, page, offset = _present_page_offsets(path)[-1]
    checked = engine_module.verify_file

    def check_then_flip(*args: Any, **kwargs: Any) -> None:
        checked(*args, **kwargs)
        with open(target, "r+b") as f:  # the file as it passed, now with one bit flipped
            os.pwrite(f.fileno(), bytes([os.pread(f.fileno(), 1, offset)[0] ^ 4]), offset)

    monkeypatch.setattr(engine_module, "verify_file", check_then_flip)
    info = await restore(qmp, target, verify="before-write")
    assert info["status"] == "failed", info
    unit_at = _unit_offset(path, block_name, page)
    assert info["error-desc"].startswith(
        f"'{target}': checksum mismatch in ramblock '{block_name}' at file offset {unit_at:#x} "
    ), info
    assert info["x-checksums"]["state"] == "mismatch"
