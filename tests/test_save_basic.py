"""Saving memory backends with migrate: the file's bytes, channels, direct-io."""

from __future__ import annotations

import os

import pytest

from .conftest import (
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    parse_save,
    read_bitmap,
    save,
)

MiB = 1 << 20


@pytest.mark.parametrize("channels", [1, 2, 8])
async def test_save_writes_every_page_into_its_slot(qmp, shm, short_dir, channels):
    data = fill_random(shm / "ram0", 8 * MiB)
    await add_file_backend(qmp, "ram0", shm / "ram0", 8 * MiB)
    await enable_mapped_ram(qmp, channels=channels, direct_io=True)
    info = await save(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    parsed = parse_save(short_dir / "save.img")
    assert parsed.complete and [b.name for b in parsed.blocks] == ["ram0"]
    block = parsed.blocks[0]
    assert block.pages_offset % MiB == 0
    assert read_bitmap(short_dir / "save.img", block).all()
    with open(short_dir / "save.img", "rb") as f:
        assert os.pread(f.fileno(), 8 * MiB, block.pages_offset) == data
    assert info["ram"]["normal"] == 2048 and info["ram"]["remaining"] == 0
    assert os.stat(short_dir / "save.img").st_mode & 0o777 == 0o600
