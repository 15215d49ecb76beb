"""object-add and object-del refuse what QEMU 10 refuses in QEMU's words (issue 15,
wording), measured on QEMU 10.0, and a refused object-add leaves nothing behind.

migd's own rules (ownership, link count, a partial restore's mark, a directory) keep
migd's texts: tests/test_file_ownership.py, tests/test_partial_restore.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import qmp_error

FILE = "memory-backend-file"
RAM = "memory-backend-ram"


def _add(qom_type: str, size: Any, mem_path: Path | None = None) -> dict[str, Any]:
    args = {"qom-type": qom_type, "id": "m0", "size": size}
    if mem_path is not None:
        args["mem-path"] = str(mem_path)
    return args


@pytest.mark.parametrize(
    ("qom_type", "size", "text"),
    [
        (FILE, 0, "property 'size' of memory-backend-file doesn't take value '0'"),
        (RAM, 0, "property 'size' of memory-backend-ram doesn't take value '0'"),
        (FILE, 4097, "backend 'memory-backend-file' memory size must be multiple of 4 KiB"),
        # QEMU rounds this one up to whole pages; migd refuses it in the same words.
        (RAM, 4097, "backend 'memory-backend-ram' memory size must be multiple of 4 KiB"),
        (RAM, "4096", "Parameter 'size' expects uint64"),
        (RAM, 1.5, "Parameter 'size' expects uint64"),
        (RAM, 1 << 64, "Parameter 'size' expects uint64"),
        (RAM, True, "Parameter 'size' expects uint64"),
        (RAM, None, "Parameter 'size' expects uint64"),
    ],
)
async def test_a_size_qemu_refuses_is_refused_in_its_words(qmp, shm, qom_type, size, text):
    path = shm / "m0" if qom_type == FILE else None
    assert await qmp_error(qmp, "object-add", _add(qom_type, size, path)) == text
    assert await qmp.execute("query-memdev") == []
    assert list(shm.iterdir()) == []  # QEMU leaves the file it created; migd creates none


async def test_a_mem_path_that_cannot_be_opened_is_refused_in_qemus_words(qmp, shm):
    missing = shm / "no-such-dir" / "ram"
    text = await qmp_error(qmp, "object-add", _add(FILE, 4096, missing))
    assert text == f"can't open backing store {missing} for guest RAM: No such file or directory"
    (shm / "file").write_bytes(b"")
    under_file = shm / "file" / "ram"
    text = await qmp_error(qmp, "object-add", _add(FILE, 4096, under_file))
    assert text == f"can't open backing store {under_file} for guest RAM: Not a directory"
    assert await qmp.execute("query-memdev") == []


async def test_a_mem_path_on_a_read_only_filesystem_is_refused_in_qemus_words(qmp, readonly_dir):
    # QEMU run as an unprivileged user says the same for EACCES (measured): one text for
    # every errno of the open.
    path = readonly_dir / "ram"
    text = await qmp_error(qmp, "object-add", _add(FILE, 4096, path))
    assert text == f"can't open backing store {path} for guest RAM: Read-only file system"


async def test_a_directory_keeps_migds_text(qmp, shm):
    # QEMU makes a temporary file in a directory; migd refuses it.
    text = await qmp_error(qmp, "object-add", _add(FILE, 4096, shm))
    assert text == f"Could not open '{shm}': Is a directory"


async def test_object_del_of_an_unknown_id_is_qemus_text(qmp):
    assert await qmp_error(qmp, "object-del", {"id": "nope"}) == "object 'nope' not found"
