"""A restore never puts guest RAM into a memory file other local users may read.

Red-team, session 13: root created a new mem-path under umask 022 (0644), object-add'ed
it and restored a VM's memory into it; `nobody` then read the guest RAM. A restore into
a memory file named by path that group or others may read is now refused before any
byte changes; a passed fd is the client's to protect (as for save files).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    qmp_error,
    restore,
    save,
)

MiB = 1 << 20
SIZE = 4 * MiB


async def _saved(qmp: Any, shm: Path, short_dir: Path, seed: int) -> Path:
    """A save of backend m0 (shm/m0, random data): the save file."""
    fill_random(shm / "m0", SIZE, seed=seed)
    await add_file_backend(qmp, "m0", shm / "m0", SIZE)
    await enable_mapped_ram(qmp)
    image = short_dir / "f.sav"
    assert (await save(qmp, image))["status"] == "completed"
    return image


@pytest.mark.parametrize("mode", [0o644, 0o640], ids=["by-others", "by-its-group"])
async def test_a_restore_into_a_memory_file_others_may_read_is_refused(
    qmp, shm, short_dir, mode
):
    """0644 hands the guest RAM to every local user, 0640 to every member of the file's
    group: both are refused before any byte of the memory changes."""
    image = await _saved(qmp, shm, short_dir, seed=1)
    saved = hashlib.sha256((shm / "m0").read_bytes()).hexdigest()
    fill_random(shm / "m0", SIZE, seed=2)
    before = (shm / "m0").read_bytes()
    (shm / "m0").chmod(mode)
    text = await qmp_error(qmp, "migrate-incoming", {"uri": f"file:{image}"})
    assert text == (
        f"Memory backend 'm0' file '{shm / 'm0'}' may be read by group or others "
        f"(mode {mode:04o}): a restore would put guest RAM where they can read it; chmod "
        "go-rw it (QEMU creates mem-path files 0644 under umask 022) or pass the file as an fd"
    )
    assert (shm / "m0").read_bytes() == before
    (shm / "m0").chmod(0o600)
    assert (await restore(qmp, image))["status"] == "completed"
    assert hashlib.sha256((shm / "m0").read_bytes()).hexdigest() == saved


async def test_a_memory_file_passed_as_an_fd_is_the_clients_to_protect(qmp, shm, short_dir):
    image = await _saved(qmp, shm, short_dir, seed=3)
    await qmp.execute("object-del", {"id": "m0"})
    (shm / "m1").write_bytes(bytes(SIZE))
    (shm / "m1").chmod(0o644)
    fd = os.open(shm / "m1", os.O_RDWR)
    try:
        qmp.send_fd_scm(fd)
        fdset = (await qmp.execute("add-fd", {}))["fdset-id"]
    finally:
        os.close(fd)
    await qmp.execute(
        "object-add",
        {"qom-type": "memory-backend-file", "id": "m0", "size": SIZE, "share": True,
         "mem-path": f"/dev/fdset/{fdset}"},
    )  # fmt: skip
    assert (await restore(qmp, image))["status"] == "completed"
    assert (shm / "m1").read_bytes() == (shm / "m0").read_bytes()
