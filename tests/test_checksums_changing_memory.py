"""Memory that changes under a job must never make a save's checksums disagree with its
file, nor make a restore blame a good file (red-team, session 13).

A buffered save wrote each page from the mapping and its hashing threads read the memory
again afterwards: memory written meanwhile (a guest left running, another process) gave a
file that `completed` but failed `migd verify` and every restore. Now such a save hashes
what its file holds. A buffered restore read its units back from memory to check them:
memory punched or written by another process meanwhile failed the restore with "the file
is corrupt", about a file that verifies. Now the unit is read from the file too, and the
error says which of the two changed.

The change is planted deterministically: UnitChecksums.done, called by a channel once a
unit's pages are written (save) or read in (restore), first rewrites that unit's memory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from migd.io import checksums as checksums_module

from .conftest import add_file_backend, enable_mapped_ram, fill_random, restore, save

MiB = 1 << 20
SIZE = 8 * MiB


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migd", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _rewrite_each_unit_after_its_io(monkeypatch: Any, memory_file: Path) -> list[int]:
    """Every unit a channel reports done gets new bytes in memory first; returns the
    list of units so rewritten (to assert the plant ran)."""
    done = checksums_module.UnitChecksums.done
    rewritten: list[int] = []

    def rewriting_done(self: Any, block_index: int, first_page: int, pages: int) -> None:
        at = first_page * 4096
        with open(memory_file, "r+b") as f:
            f.seek(at)
            f.write(bytes([0x5A]) * (pages * 4096))
        rewritten.append(first_page)
        done(self, block_index, first_page, pages)

    monkeypatch.setattr(checksums_module.UnitChecksums, "done", rewriting_done)
    return rewritten


async def test_a_buffered_save_records_the_checksums_of_what_its_file_holds(
    qmp, shm, short_dir, monkeypatch
):
    fill_random(shm / "m0", SIZE, seed=3)
    await add_file_backend(qmp, "m0", shm / "m0", SIZE)
    await enable_mapped_ram(qmp, channels=2, direct_io=False)
    rewritten = _rewrite_each_unit_after_its_io(monkeypatch, shm / "m0")
    image = short_dir / "f.sav"
    assert (await save(qmp, image))["status"] == "completed"
    assert rewritten, "the plant never ran: the save took another path"
    checked = _verify(image)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # And it restores (what the file holds: the memory as the channels wrote it).
    monkeypatch.undo()
    fill_random(shm / "m0", SIZE, seed=4)
    info = await restore(qmp, image)
    assert info["status"] == "completed", info.get("error-desc")


async def test_a_restore_whose_memory_changes_under_it_blames_the_memory_not_the_file(
    qmp, shm, short_dir, monkeypatch
):
    fill_random(shm / "m0", SIZE, seed=5)
    await add_file_backend(qmp, "m0", shm / "m0", SIZE)
    await enable_mapped_ram(qmp, channels=2, direct_io=False)
    image = short_dir / "f.sav"
    assert (await save(qmp, image))["status"] == "completed"
    rewritten = _rewrite_each_unit_after_its_io(monkeypatch, shm / "m0")
    info = await restore(qmp, image)
    assert rewritten
    assert info["status"] == "failed"
    error = info["error-desc"]
    assert error.startswith("The memory of ramblock 'm0' changed during the restore: ")
    assert f"no longer hold what '{image}' holds there" in error
    assert "the file is intact; memory backends 'm0' hold partial data" in error
    assert "corrupt" not in error
    assert _verify(image).returncode == 0


async def test_a_restore_of_a_corrupt_unit_still_says_the_file_is_corrupt(
    qmp, shm, short_dir
):
    """The read back from the file is what tells the two apart: a unit bad in the file
    is still the file's fault."""
    fill_random(shm / "m0", SIZE, seed=6)
    await add_file_backend(qmp, "m0", shm / "m0", SIZE)
    await enable_mapped_ram(qmp, channels=2, direct_io=False)
    image = short_dir / "f.sav"
    assert (await save(qmp, image))["status"] == "completed"
    from .conftest import parse_save

    block = parse_save(image).blocks[0]
    with open(image, "r+b") as f:  # one byte of the block's first page
        f.seek(block.pages_offset + 100)
        byte = f.read(1)
        f.seek(block.pages_offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    info = await restore(qmp, image)
    assert info["status"] == "failed"
    assert "checksum mismatch in ramblock 'm0'" in info["error-desc"]
    assert "the file is corrupt" in info["error-desc"]


pytestmark = pytest.mark.usefixtures("shm")
