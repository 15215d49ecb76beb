"""memory-save with x-dirty-pages: a save updated in place (the live save of docs/vm-image.md).

A first save is made while the memory may still change; then only the pages reported
dirty are saved again. The result must restore to exactly the memory at the update, every
kept unit is checked against the first save's checksums (a change nobody reported fails
the update), and a refused or failed update never leaves a file that reads as complete.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import add_file_backend, fill_random, is_complete_save, qmp_error
from .test_jobs import wait_concluded

MiB = 1 << 20
PAGE = 4096
SIZE = 8 * MiB
PAGES = SIZE // PAGE


def bitmap(pages: list[int], total: int = PAGES) -> str:
    bits = np.zeros(total, dtype=bool)
    bits[pages] = True
    return base64.b64encode(np.packbits(bits, bitorder="little").tobytes()).decode()


def write_page(path: Path, page: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, page * PAGE)
    finally:
        os.close(fd)


async def job(qmp: Any, job_id: str, arguments: dict[str, Any]) -> dict[str, Any]:
    await qmp.execute("memory-save", {"job-id": job_id, **arguments})
    result = (await wait_concluded(qmp, job_id))[job_id]
    await qmp.execute("job-dismiss", {"id": job_id})
    return result


async def restore_over_garbage(qmp: Any, ram: Path, image: Path) -> bytes:
    """The image restored into the backend, garbage written over it first."""
    fill_random(ram, SIZE, seed=99)
    await qmp.execute("memory-restore", {"job-id": "check", "uri": f"file:{image}"})
    result = (await wait_concluded(qmp, "check"))["check"]
    assert "error" not in result, result
    await qmp.execute("job-dismiss", {"id": "check"})
    return ram.read_bytes()


@pytest.fixture
async def first_save(qmp: Any, shm: Path, short_dir: Path) -> tuple[Path, Path]:
    ram, image = shm / "ram", short_dir / "m.sav"
    fill_random(ram, SIZE, seed=3)
    write_page(ram, 7, bytes(PAGE))  # a zero page: absent from the first save
    await add_file_backend(qmp, "ram", ram, SIZE, **{"ramblock-name": "m"})
    first = await job(qmp, "first", {"backends": ["ram"], "uri": f"file:{image}"})
    assert "error" not in first
    return ram, image


async def test_an_update_rewrites_the_dirty_pages_and_restores_the_memory_as_it_is_now(
    qmp: Any, shm: Path, first_save: tuple[Path, Path]
) -> None:
    ram, image = first_save
    write_page(ram, 3, os.urandom(PAGE))  # changed data
    write_page(ram, 7, os.urandom(PAGE))  # was zero, is data now
    write_page(ram, PAGES - 1, bytes(PAGE))  # was data, is zero now
    dirty = [3, 7, PAGES - 1]
    update = {"backends": ["ram"], "uri": f"file:{image}",
              "x-dirty-pages": [{"backend": "ram", "bitmap": bitmap(dirty)}]}  # fmt: skip
    result = await job(qmp, "update", update)
    assert "error" not in result, result
    assert is_complete_save(image)
    expected = ram.read_bytes()
    assert await restore_over_garbage(qmp, ram, image) == expected


async def test_a_change_nobody_reported_fails_the_update_and_the_file_reads_incomplete(
    qmp: Any, shm: Path, first_save: tuple[Path, Path]
) -> None:
    ram, image = first_save
    write_page(ram, 3, os.urandom(PAGE))
    write_page(ram, 600, os.urandom(PAGE))  # in another unit, and not reported
    update = {"backends": ["ram"], "uri": f"file:{image}",
              "x-dirty-pages": [{"backend": "ram", "bitmap": bitmap([3])}]}  # fmt: skip
    result = await job(qmp, "update", update)
    assert "no page there was reported dirty" in result.get("error", ""), result
    assert "bytes 0x200000-0x300000" in result["error"]  # unit 2 holds page 600
    assert not is_complete_save(image)


async def test_a_zero_page_that_became_data_unreported_is_caught_too(
    qmp: Any, shm: Path, first_save: tuple[Path, Path]
) -> None:
    # Page 7 is absent from the first save (its bit clear, its slot never written): the
    # check reads the memory of absent pages too.
    ram, image = first_save
    write_page(ram, 7, os.urandom(PAGE))
    update = {"backends": ["ram"], "uri": f"file:{image}", "x-dirty-pages": []}
    result = await job(qmp, "update", update)
    assert "no page there was reported dirty" in result.get("error", ""), result


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("other-offset", "does not hold a complete migd save of these backends at offset 4096"),
        ("no-checksums", "it has no checksums"),
        ("truncated", "the checksum table is cut short"),
        ("bad-length", "'x-dirty-pages' of 'ram' has 3 bytes; its 2048 pages need 256"),
        ("unknown", "'x-dirty-pages' names 'nope': not a backend of this job"),
        ("not-base64", "'x-dirty-pages' of 'ram': the bitmap is not base64"),
        ("twice", "'x-dirty-pages' names 'ram' twice"),
    ],
)
async def test_an_update_of_a_file_that_is_not_its_save_is_refused_and_changes_nothing(
    qmp: Any, shm: Path, short_dir: Path, first_save: tuple[Path, Path], change: str,
    expected: str,
) -> None:  # fmt: skip
    _, image = first_save
    uri = f"file:{image}"
    entries = [{"backend": "ram", "bitmap": bitmap([1])}]
    if change == "other-offset":
        uri += ",offset=4096"
    elif change == "no-checksums":
        assert "error" not in await job(
            qmp, "plain", {"backends": ["ram"], "uri": uri, "checksums": False}
        )
    elif change == "truncated":
        os.truncate(image, image.stat().st_size - 100)
    elif change == "bad-length":
        entries = [{"backend": "ram", "bitmap": base64.b64encode(b"abc").decode()}]
    elif change == "unknown":
        entries = [{"backend": "nope", "bitmap": bitmap([1])}]
    elif change == "not-base64":
        entries = [{"backend": "ram", "bitmap": "!!"}]
    elif change == "twice":
        entries = entries * 2
    before = image.read_bytes()
    args = {"job-id": "u", "backends": ["ram"], "uri": uri, "x-dirty-pages": entries}
    assert expected in await qmp_error(qmp, "memory-save", args)
    assert image.read_bytes() == before
    assert await qmp.execute("query-jobs") == []
