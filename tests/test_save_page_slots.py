"""A direct-io save on ext4 sizes its file and allocates its page slots before the
channels write (so their O_DIRECT writes run side by side instead of one at a time under
the inode lock), and frees the slots of the zero pages it skipped afterwards
(migration/mapped_ram/page_slots.py). Not on other filesystems, nor where the disk lacks
the room; the channels of one save read their memory one at a time (io/threads.py
COPY_THREADS)."""

from __future__ import annotations

import os
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from migd.io import threads
from migd.migration.mapped_ram import format
from migd.migration.mapped_ram import save as save_io

from .conftest import (
    add_file_backend,
    enable_mapped_ram,
    restore,
    save,
    wait_migration,
    wait_status,
)

MiB = 1 << 20
SIZE = 24 * MiB


def memory_with_zeros_between(path: Path, size: int, head: int, tail: int) -> bytes:
    """`head` random bytes, zeros, `tail` random bytes: the zeros written, so that they
    are data of the memory file (the save's runs cover them) and only its zero scan
    skips them."""
    rng = np.random.default_rng(7)
    data = rng.bytes(head) + bytes(size - head - tail) + rng.bytes(tail)
    path.write_bytes(data)
    return data


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.mark.parametrize("on", ["ext4", "tmpfs"])
async def test_slots_allocated_ahead_on_ext4_only_and_zero_pages_freed_after(
    qmp, shm, short_dir, on
):
    data = memory_with_zeros_between(shm / "ram0", SIZE, 8 * MiB, 4 * MiB)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    # Slow enough that the save is still at its first writes once it is active.
    await enable_mapped_ram(qmp, channels=2, direct_io=True, **{"max-bandwidth": 2 * MiB})
    target = (short_dir if on == "ext4" else shm) / "save.img"
    await qmp.execute("migrate", {"uri": f"file:{target}"})
    await wait_status(qmp, "active")
    allocated_while_saving = allocated(target)
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 0})
    info = await wait_migration(qmp)
    assert info["status"] == "completed", info
    if on == "ext4":  # every slot allocated before the pages went out
        assert allocated_while_saving >= SIZE
    else:
        assert allocated_while_saving < SIZE // 2
    # Either way, the 12 MiB of zero pages take no room in the finished file.
    assert allocated(target) < SIZE - 11 * MiB, allocated(target)
    assert info["ram"]["duplicate"] == 12 * MiB // 4096
    (shm / "ram0").write_bytes(b"\xee" * SIZE)
    assert (await restore(qmp, target))["status"] == "completed"
    assert (shm / "ram0").read_bytes() == data


async def test_a_cancelled_save_leaves_no_room_taken_by_pages_it_never_wrote(
    qmp, shm, short_dir
):
    memory_with_zeros_between(shm / "ram0", SIZE, 12 * MiB, 12 * MiB)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    await enable_mapped_ram(qmp, channels=2, direct_io=True, **{"max-bandwidth": MiB})
    target = short_dir / "save.img"
    await qmp.execute("migrate", {"uri": f"file:{target}"})
    await wait_status(qmp, "active")
    assert allocated(target) >= SIZE  # every slot, ahead
    await qmp.execute("migrate_cancel")
    info = await wait_migration(qmp)
    assert info["status"] == "cancelled", info
    # At 1 MiB/s it wrote a few MiB before the cancel: only those keep their room.
    assert allocated(target) < SIZE // 2, allocated(target)


async def test_a_save_that_fits_only_without_its_zero_pages_is_not_allocated_ahead(
    qmp, shm, small_ext4
):
    """48 MiB of memory onto a 24 MiB ext4: allocating every slot would fill the disk
    before the last pages are written; skipping the zero pages, the save fits."""
    size = 48 * MiB
    data = memory_with_zeros_between(shm / "ram0", size, 2 * MiB, 8 * MiB)
    await add_file_backend(qmp, "ram0", shm / "ram0", size, share=True)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    info = await save(qmp, small_ext4 / "save.img")
    assert info["status"] == "completed", info
    assert allocated(small_ext4 / "save.img") < 12 * MiB
    (shm / "ram0").write_bytes(b"\xee" * size)
    assert (await restore(qmp, small_ext4 / "save.img"))["status"] == "completed"
    assert (shm / "ram0").read_bytes() == data


async def test_a_saves_channels_read_their_memory_one_at_a_time(
    qmp, shm, short_dir, monkeypatch
):
    """Four channels, each filling its own staging buffer: never two fills at once."""
    fill = threads.Staging.fill
    lock, inside, most = threading.Lock(), [0], [0]

    def counted_fill(self, fd, offset, pages):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.002)  # widens the window in which another fill would overlap
            return fill(self, fd, offset, pages)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(threads.Staging, "fill", counted_fill)
    data = memory_with_zeros_between(shm / "ram0", SIZE, 12 * MiB, 12 * MiB)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    await enable_mapped_ram(qmp, channels=4, direct_io=True)
    info = await save(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    assert most[0] == 1
    os.truncate(shm / "ram0", 0)
    os.truncate(shm / "ram0", SIZE)
    assert (await restore(qmp, short_dir / "save.img"))["status"] == "completed"
    assert (shm / "ram0").read_bytes() == data


def test_the_head_is_written_into_a_file_already_sized_to_its_end(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_head sizes the file (ftruncate: its size on disk too) before the head's
    pieces go in through the page cache: ext4 takes every O_DIRECT page write past the
    size on disk for one that extends the file, one at a time under the inode lock."""
    layout = format.plan_save([("pc.ram", 16 * MiB), ("vga.vram", 4 * MiB)])
    path = short_dir / "save.img"
    path.write_bytes(b"\xaa" * (layout.end_offset + 8 * MiB))  # an old, longer file
    sizes: list[int] = []
    original = save_io.pwrite_all

    def recording(fd: int, data: bytes, offset: int, name: str) -> None:
        sizes.append(os.fstat(fd).st_size)
        original(fd, data, offset, name)

    monkeypatch.setattr(save_io, "pwrite_all", recording)
    job = types.SimpleNamespace(target=types.SimpleNamespace(name=str(path)), main_bytes=0)
    fd = os.open(path, os.O_RDWR)
    try:
        save_io.write_head(job, layout, fd)  # type: ignore[arg-type]
    finally:
        os.close(fd)
    assert sizes == [layout.end_offset] * len(layout.head_writes) and len(sizes) >= 2
    content = path.read_bytes()
    assert len(content) == layout.end_offset
    for at, data in layout.head_writes:
        assert content[at : at + len(data)] == data
    slots = layout.blocks[0]
    assert content[slots.pages_offset : slots.end].count(0) == slots.end - slots.pages_offset
