"""Restoring with migrate-incoming: round trips, zeroing, and files that must be refused."""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import pytest

from .conftest import (
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    migd_threads,
    open_fds,
    parse_save,
    qmp_error,
    read_bitmap,
    read_pages,
    restore,
    save,
    wait_migration,
    wait_status,
)

MiB = 1 << 20
PAGE = 4096


def _mixed(size: int, seed: int = 9) -> bytes:
    """Random memory with 2 MiB zero clusters and scattered zero pages."""
    rng = np.random.default_rng(seed)
    data = bytearray(rng.integers(0, 256, size, dtype=np.uint8))
    for c in rng.choice(size // (2 * MiB), max(1, size // (2 * MiB) // 2), replace=False):
        data[c * 2 * MiB : (c + 1) * 2 * MiB] = bytes(2 * MiB)
    for p in rng.choice(size // PAGE, size // PAGE // 10, replace=False):
        data[p * PAGE : (p + 1) * PAGE] = bytes(PAGE)
    return bytes(data)


async def _saved(qmp, shm, short_dir, size=16 * MiB, channels=2, direct_io=True, offset=None):
    """Save a mixed backend `ram0`, then point it at a fresh file full of other data."""
    data = _mixed(size)
    (shm / "src").write_bytes(data)
    await add_file_backend(qmp, "ram0", shm / "src", size)
    await enable_mapped_ram(qmp, channels=channels, direct_io=direct_io)
    info = await save(qmp, short_dir / "save.img", offset=offset)
    assert info["status"] == "completed", info
    await qmp.execute("object-del", {"id": "ram0"})
    fill_random(shm / "dst", size, seed=77)
    await add_file_backend(qmp, "ram0", shm / "dst", size)
    return data


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("save_channels", "restore_channels"), [(1, 1), (2, 2), (8, 8), (2, 5)])
@pytest.mark.parametrize("direct_io", [True, False])
async def test_round_trip_restores_every_byte_and_zeroes_absent_pages(
    qmp, shm, short_dir, save_channels, restore_channels, direct_io
):
    data = await _saved(qmp, shm, short_dir, channels=save_channels, direct_io=direct_io)
    await qmp.execute("migrate-set-parameters", {"multifd-channels": restore_channels})
    info = await restore(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    assert (shm / "dst").read_bytes() == data
    assert info["ram"]["total"] == len(data) and info["ram"]["remaining"] == 0


async def test_file_saved_with_multifd_restores_without_it(qmp, shm, short_dir):
    data = await _saved(qmp, shm, short_dir, channels=4)
    caps = [{"capability": "multifd", "state": False}]
    await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    assert (await restore(qmp, short_dir / "save.img"))["status"] == "completed"
    assert (shm / "dst").read_bytes() == data


async def test_restore_with_an_offset_after_a_management_header(qmp, shm, short_dir):
    (short_dir / "save.img").write_bytes(b"H" * 0x11921)
    data = await _saved(qmp, shm, short_dir, offset=0x11921)
    info = await restore(qmp, short_dir / "save.img", offset=0x11921)
    assert info["status"] == "completed", info
    assert (shm / "dst").read_bytes() == data
    assert (short_dir / "save.img").read_bytes()[:0x11921] == b"H" * 0x11921


async def test_restore_into_anonymous_memory(qmp, shm, short_dir):
    data = _mixed(8 * MiB)
    (shm / "src").write_bytes(data)
    await add_file_backend(qmp, "src", shm / "src", 8 * MiB, **{"ramblock-name": "pc.ram"})
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
    await qmp.execute("object-del", {"id": "src"})
    await qmp.execute(
        "object-add",
        {
            "qom-type": "memory-backend-ram",
            "id": "anon",
            "size": 8 * MiB,
            "ramblock-name": "pc.ram",
        },
    )
    info = await restore(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    # the anonymous backend is saved again to compare: its bytes must be the original's
    await save(qmp, short_dir / "again.img")
    assert read_pages(short_dir / "again.img", first_block(short_dir / "again.img")) == data


async def test_restore_skips_unmatched_blocks_only_when_asked(qmp, shm, short_dir):
    await _saved(qmp, shm, short_dir)
    await qmp.execute("object-add", {"qom-type": "memory-backend-ram", "id": "extra", "size": MiB})
    assert (await save(qmp, short_dir / "two.img"))["status"] == "completed"
    await qmp.execute("object-del", {"id": "extra"})
    saved = (shm / "dst").read_bytes()  # what two.img holds for ram0
    # Other data in ram0, so that the restore has something to change.
    with open(shm / "dst", "r+b") as f:
        f.write(_mixed(len(saved), seed=10))
    before = _digest(shm / "dst")
    text = await qmp_error(qmp, "migrate-incoming", {"uri": f"file:{short_dir}/two.img"})
    assert text == 'Unknown ramblock "extra", cannot accept migration'
    assert _digest(shm / "dst") == before
    info = await restore(qmp, short_dir / "two.img", **{"skip-unmatched-blocks": True})
    assert info["status"] == "completed" and info["x-skipped-blocks"] == ["extra"]
    assert (shm / "dst").read_bytes() == saved


async def test_restore_refuses_when_mapped_ram_is_off(qmp, shm, short_dir):
    await _saved(qmp, shm, short_dir)
    caps = [{"capability": "mapped-ram", "state": False}]
    await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    text = await qmp_error(qmp, "migrate-incoming", {"uri": f"file:{short_dir}/save.img"})
    assert "mapped-ram" in text


async def test_restore_of_a_missing_file_is_refused(qmp, shm, short_dir):
    await enable_mapped_ram(qmp)
    text = await qmp_error(qmp, "migrate-incoming", {"uri": f"file:{short_dir}/nope.img"})
    assert text == f"Could not open '{short_dir}/nope.img': No such file or directory"


def _corrupt_header_field(path, block, field_offset, value, fmt=">Q"):
    with open(path, "r+b") as f:
        f.seek(block.header_offset + field_offset)
        f.write(struct.pack(fmt, value))


CORRUPTIONS = {
    "not a stream": (
        lambda p, b: p.write_bytes(b"ELF!" + p.read_bytes()[4:]),
        "Not a migration stream",
    ),
    "stream version": (
        lambda p, b: _patch(p, 4, struct.pack(">I", 2)),
        "Unsupported migration stream version",
    ),
    "header version": (
        lambda p, b: _corrupt_header_field(p, b, 0, 2, ">I"),
        "version not supported",
    ),
    "page size": (lambda p, b: _corrupt_header_field(p, b, 4, 8192), "page size"),
    "misaligned pages": (
        lambda p, b: _corrupt_header_field(p, b, 20, b.pages_offset + 512),
        "bad alignment",
    ),
    "region past the end": (
        lambda p, b: _corrupt_header_field(p, b, 20, b.pages_offset + (1 << 40)),
        "extends past the end of the file",
    ),
    "incomplete": (lambda p, b: _truncate_tail(p), "incomplete"),
    "truncated": (
        lambda p, b: os.truncate(p, b.pages_offset + 4096),
        "extends past the end of the file",
    ),
    "empty": (lambda p, b: os.truncate(p, 0), "the file is empty: not a save file"),
}


def _patch(path, at, data):
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def first_block(path):
    return parse_save(path).blocks[0]


def _truncate_tail(path):
    """Cut the RAM end section off, as an interrupted save leaves the file."""
    raw = path.read_bytes()
    block = first_block(path)
    os.truncate(path, block.end + 13)  # start section EOS + footer only
    assert len(raw) > block.end + 13


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
async def test_corrupt_files_are_refused_and_backends_stay_untouched(qmp, shm, short_dir, name):
    await _saved(qmp, shm, short_dir)
    target = short_dir / "save.img"
    damage, expected = CORRUPTIONS[name]
    damage(target, first_block(target))
    before, fds_before = _digest(shm / "dst"), open_fds()
    job_before = await qmp.execute("query-migrate")  # the save's: completed
    text = await qmp_error(qmp, "migrate-incoming", {"uri": f"file:{target}"})
    assert str(target) in text and expected in text
    assert _digest(shm / "dst") == before
    assert open_fds() == fds_before and migd_threads() == []
    # A refused restore starts no job: query-migrate still shows the save, unchanged.
    assert await qmp.execute("query-migrate") == job_before


async def test_length_mismatch_names_both_lengths(qmp, shm, short_dir):
    await _saved(qmp, shm, short_dir, size=4 * MiB)
    await qmp.execute("object-del", {"id": "ram0"})
    await add_file_backend(qmp, "ram0", shm / "dst2", 8 * MiB)
    text = await qmp_error(qmp, "migrate-incoming", {"uri": f"file:{short_dir}/save.img"})
    assert str(4 * MiB) in text and str(8 * MiB) in text and "Length mismatch" in text


async def _saved_into_small_tmpfs(qmp, shm, short_dir, small_tmpfs):
    """A 32 MiB save (about 14 MiB of pages to read) and a backend `ram0` on an 8 MiB
    tmpfs whose first 2 MiB hold other data."""
    await _saved(qmp, shm, short_dir, size=32 * MiB)
    await qmp.execute("object-del", {"id": "ram0"})
    dst = small_tmpfs / "ram"
    fill_random(dst, 2 * MiB, seed=5)
    os.truncate(dst, 32 * MiB)  # a sparse 32 MiB file: the backend uses it as it is
    await add_file_backend(qmp, "ram0", dst, 32 * MiB)
    return dst


async def test_restore_into_a_filesystem_too_small_fails_before_changing_memory(
    qmp, shm, short_dir, small_tmpfs
):
    dst = await _saved_into_small_tmpfs(qmp, shm, short_dir, small_tmpfs)
    before = _digest(dst)
    info = await restore(qmp, short_dir / "save.img")
    assert info["status"] == "failed"
    block = first_block(short_dir / "save.img")
    needed = int(read_bitmap(short_dir / "save.img", block).sum()) * PAGE
    assert info["error-desc"] == (
        f"Could not restore '{short_dir}/save.img': memory backends 'ram0' need {needed} "
        f"bytes, but their filesystem has room for {8 * MiB}; no memory backend was changed"
    )
    assert _digest(dst) == before
    assert migd_threads() == []


async def test_backends_sharing_a_filesystem_must_fit_in_it_together(
    qmp, shm, short_dir, small_tmpfs
):
    """The room check sums what every backend on one filesystem needs: two backends on the
    8 MiB tmpfs, 5 MiB of pages each, fit one by one but not together. Counted one at a
    time, the restore started and failed half-way with ENOSPC, both backends partial;
    refused as a whole, it names both and changes neither."""
    for i, id in enumerate(("a", "b")):
        fill_random(shm / id, 5 * MiB, seed=i + 1)
        os.truncate(shm / id, 8 * MiB)  # 5 MiB of data, then 3 MiB of zero pages
        await add_file_backend(qmp, id, shm / id, 8 * MiB)
    await enable_mapped_ram(qmp)
    assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
    for id in ("a", "b"):
        await qmp.execute("object-del", {"id": id})
        (small_tmpfs / id).touch()
        os.truncate(small_tmpfs / id, 8 * MiB)  # sparse: every page needs room
        await add_file_backend(qmp, id, small_tmpfs / id, 8 * MiB)
    info = await restore(qmp, short_dir / "save.img")
    assert info["status"] == "failed"
    assert info["error-desc"] == (
        f"Could not restore '{short_dir}/save.img': memory backends 'a', 'b' need "
        f"{10 * MiB} bytes, but their filesystem has room for {8 * MiB}; no memory backend "
        "was changed"
    )
    for id in ("a", "b"):
        assert os.stat(small_tmpfs / id).st_blocks == 0  # not a page written
    assert migd_threads() == []


async def test_memory_that_runs_out_during_a_restore_is_reported_as_such(
    qmp, shm, short_dir, small_tmpfs, monkeypatch
):
    """When the room check cannot see it coming (another writer fills the filesystem),
    the allocation ahead of the reads fails: ENOSPC with the backend, not EFAULT."""
    from migd.migration import plan

    dst = await _saved_into_small_tmpfs(qmp, shm, short_dir, small_tmpfs)
    monkeypatch.setattr(plan, "check_room", lambda path, needs: None)
    fds_before = open_fds()
    info = await restore(qmp, short_dir / "save.img")
    assert info["status"] == "failed"
    assert info["error-desc"] == (
        f"Could not allocate memory for memory backend 'ram0' in '{dst}': "
        "No space left on device; memory backends 'ram0' hold partial data"
    )
    assert open_fds() == fds_before and migd_threads() == []
    await qmp.execute("object-del", {"id": "ram0"})
    await add_file_backend(qmp, "ram0", shm / "dst", 32 * MiB)
    assert (await restore(qmp, short_dir / "save.img"))["status"] == "completed"


async def test_cancelled_restore_says_the_backend_holds_partial_data(qmp, shm, short_dir):
    await _saved(qmp, shm, short_dir, size=32 * MiB)
    fds_before = open_fds()
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 4 * MiB})
    await qmp.execute("migrate-incoming", {"uri": f"file:{short_dir}/save.img"})
    await wait_status(qmp, "active")
    await qmp.execute("migrate_cancel")
    info = await wait_migration(qmp)
    assert info["status"] == "cancelled"
    assert "'ram0' hold partial data" in info["error-desc"]
    assert open_fds() == fds_before and migd_threads() == []
