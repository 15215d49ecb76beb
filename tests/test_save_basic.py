"""Saving memory backends with migrate: the file's bytes, channels, direct-io."""

from __future__ import annotations

import os

import pytest

from migd import format

from .conftest import add_file_backend, enable_mapped_ram, fill_random, save

MiB = 1 << 20


def _parse(path, offset=0):
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return format.parse_stream(lambda at, n: os.pread(f.fileno(), n, at), offset, size)


def _bitmap(path, block):
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), block.bitmap_size, block.bitmap_offset)
    return format.decode_bitmap(data, block.pages)


@pytest.mark.parametrize("channels", [1, 2, 8])
async def test_save_writes_every_page_into_its_slot(qmp, shm, short_dir, channels):
    data = fill_random(shm / "ram0", 8 * MiB)
    await add_file_backend(qmp, "ram0", shm / "ram0", 8 * MiB)
    await enable_mapped_ram(qmp, channels=channels, direct_io=True)
    info = await save(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    parsed = _parse(short_dir / "save.img")
    assert parsed.complete and [b.name for b in parsed.blocks] == ["ram0"]
    block = parsed.blocks[0]
    assert block.pages_offset % MiB == 0
    assert _bitmap(short_dir / "save.img", block).all()
    with open(short_dir / "save.img", "rb") as f:
        assert os.pread(f.fileno(), 8 * MiB, block.pages_offset) == data
    assert info["ram"]["normal"] == 2048 and info["ram"]["remaining"] == 0
    assert os.stat(short_dir / "save.img").st_mode & 0o777 == 0o600
