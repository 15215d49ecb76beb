"""An existing mem-path is used with QEMU's size rules (issue 12 item 6).

QEMU 10 (qemu_ram_alloc_from_fd / file_ram_alloc): a non-empty file smaller than 'size'
is refused and never grown; a larger one is used as a prefix; a new or empty file is
extended to 'size'. A refused object-add leaves an existing file exactly as it was.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from migd.state.memory import MAX_SIZE

from .conftest import add_file_backend, enable_mapped_ram, fill_random, parse_save, qmp_error, save

MiB = 1 << 20


def _state(path: Path) -> tuple[int, int, str]:
    st = path.stat()
    if st.st_size > 64 * MiB:  # grown by the old code: never read it
        return st.st_size, st.st_mtime_ns, "?"
    return st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def _object_add(path: Path, size: int) -> dict:
    return {"qom-type": "memory-backend-file", "id": "ram0", "size": size, "mem-path": str(path)}


async def test_a_smaller_non_empty_file_is_refused_with_qemus_text_and_left_alone(qmp, shm):
    path = shm / "ram0"
    fill_random(path, MiB)
    before = _state(path)
    text = await qmp_error(qmp, "object-add", _object_add(path, 4 * MiB))
    assert text == (
        "ram0 backing store size 0x100000 is too small for 'size' option 0x400000 "
        "plus 'offset' option 0x0"
    )
    assert _state(path) == before
    assert await qmp.execute("query-memdev") == []


async def test_a_larger_file_is_used_as_a_prefix_and_saved_as_such(qmp, shm, short_dir):
    path = shm / "ram0"
    data = fill_random(path, 4 * MiB)
    await add_file_backend(qmp, "ram0", path, MiB)
    memdevs = await qmp.execute("query-memdev")
    assert [(m["id"], m["size"]) for m in memdevs] == [("ram0", MiB)]
    assert path.stat().st_size == 4 * MiB
    await enable_mapped_ram(qmp)
    assert (await save(qmp, short_dir / "vm.sav"))["status"] == "completed"
    block = parse_save(short_dir / "vm.sav").blocks[0]
    assert block.length == MiB
    with open(short_dir / "vm.sav", "rb") as f:
        assert os.pread(f.fileno(), MiB, block.pages_offset) == data[:MiB]


async def test_an_empty_file_is_extended_to_size(qmp, shm):
    path = shm / "ram0"
    path.write_bytes(b"")
    path.chmod(0o600)
    await add_file_backend(qmp, "ram0", path, 2 * MiB)
    assert path.stat().st_size == 2 * MiB


async def test_a_size_that_cannot_be_mapped_leaves_an_existing_file_as_it_was(qmp, shm):
    """Before: ftruncate to the size, then mmap failed: the file stayed at 4 EiB."""
    empty, small = shm / "empty", shm / "small"
    empty.write_bytes(b"")
    empty.chmod(0o600)
    os.utime(empty, ns=(1_000_000_000, 1_000_000_000))  # an mtime a change would move
    fill_random(small, MiB)
    expected = {
        empty: f"Could not map '{empty}': Cannot allocate memory",
        small: f"ram0 backing store size 0x100000 is too small for 'size' option "
        f"0x{MAX_SIZE:x} plus 'offset' option 0x0",
    }
    for path, text in expected.items():
        before = _state(path)
        assert await qmp_error(qmp, "object-add", _object_add(path, MAX_SIZE)) == text
        assert _state(path) == before
    assert await qmp.execute("query-memdev") == []
