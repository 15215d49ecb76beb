"""memory-save x-live then x-update: the two passes of a live save (docs/vm-image.md).

The first pass saves memory that may change while it runs and records the checksums of
what its file holds; the second, once memory stands still, hashes every unit and saves
again those that changed. The result must restore to exactly the memory at the update,
whatever changed when, and a refused update changes nothing; a failed one never leaves a
file that reads as complete.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from migd.tools.verify import verify_save

from .conftest import add_file_backend, fill_random, is_complete_save, poll_until, qmp_error
from .test_jobs import wait_concluded

MiB = 1 << 20
PAGE = 4096
SIZE = 8 * MiB
PAGES = SIZE // PAGE


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
    first = await job(qmp, "first", {"backends": ["ram"], "uri": f"file:{image}", "x-live": True})
    assert "error" not in first
    return ram, image


def update_args(image: Path, **extra: Any) -> dict[str, Any]:
    return {"backends": ["ram"], "uri": f"file:{image}", "x-update": True, **extra}


async def test_an_update_saves_what_changed_and_restores_the_memory_as_it_is_now(
    qmp: Any, shm: Path, first_save: tuple[Path, Path]
) -> None:
    ram, image = first_save
    write_page(ram, 3, os.urandom(PAGE))  # changed data
    write_page(ram, 7, os.urandom(PAGE))  # was zero (absent), is data now
    write_page(ram, PAGES - 1, bytes(PAGE))  # was data, is zero now
    for page in range(512, 768):  # a whole unit of data zeroed: skipped, its bits cleared
        write_page(ram, page, bytes(PAGE))
    result = await job(qmp, "update", update_args(image))
    assert "error" not in result, result
    assert is_complete_save(image)
    expected = ram.read_bytes()
    assert await restore_over_garbage(qmp, ram, image) == expected


async def test_a_live_pass_while_memory_changes_then_an_update_gives_the_memory_at_the_update(
    qmp: Any, shm: Path, short_dir: Path
) -> None:
    # A writer changes pages all through the first pass, as a running guest does: some
    # while their slot is written, some after their unit was read back. The update
    # must find every one of them.
    ram, image = shm / "ram", short_dir / "m.sav"
    fill_random(ram, SIZE, seed=4)
    await add_file_backend(qmp, "ram", ram, SIZE, **{"ramblock-name": "m"})
    stop = threading.Event()
    writes = 0

    def writer() -> None:
        nonlocal writes
        rng = np.random.default_rng(7)
        fd = os.open(ram, os.O_WRONLY)
        try:
            while not stop.is_set():
                page = int(rng.integers(PAGES))
                data = bytes(PAGE) if writes % 5 == 0 else rng.bytes(PAGE)
                os.pwrite(fd, data, page * PAGE)
                writes += 1
        finally:
            os.close(fd)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        args = {"backends": ["ram"], "uri": f"file:{image}", "x-live": True,
                "max-bandwidth": 16 * MiB}  # fmt: skip
        assert "error" not in await job(qmp, "live", args)
    finally:
        stop.set()
        thread.join()
    assert writes > 100
    # The first pass's checksums are those of the file as written, not of memory that
    # changed after its pages were: the file verifies whole.
    report = verify_save(str(image), 0, 2)
    assert report.units_checked == report.units == SIZE // MiB
    result = await job(qmp, "update", update_args(image))
    assert "error" not in result, result
    expected = ram.read_bytes()
    assert await restore_over_garbage(qmp, ram, image) == expected


async def test_an_update_cut_off_leaves_a_file_that_reads_incomplete(
    qmp: Any, shm: Path, first_save: tuple[Path, Path]
) -> None:
    ram, image = first_save
    fill_random(ram, SIZE, seed=11)  # every unit changed: 8 MiB to write at 1 MiB/s
    await qmp.execute(
        "memory-save", {"job-id": "u", **update_args(image, **{"max-bandwidth": MiB})}
    )
    await poll_until(
        lambda: qmp.execute("query-jobs"),
        lambda jobs: jobs[0]["status"] == "running" and jobs[0]["current-progress"] > 0,
        "the update writes",
    )
    await qmp.execute("job-cancel", {"id": "u"})
    result = (await wait_concluded(qmp, "u"))["u"]
    assert result.get("error"), result
    assert not is_complete_save(image)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("other-offset", "does not hold a complete migd save of these backends at offset 4096"),
        ("no-checksums", "it has no checksums"),
        ("truncated", "the checksum table is cut short"),
        ("both-passes", "'x-live' and 'x-update' are the two passes: give one"),
        ("update-without-checksums", "'x-update' needs 'checksums'"),
        ("missing", "No such file or directory"),
    ],
)
async def test_an_update_of_a_file_that_is_not_its_save_is_refused_and_changes_nothing(
    qmp: Any, shm: Path, short_dir: Path, first_save: tuple[Path, Path], change: str,
    expected: str,
) -> None:  # fmt: skip
    _, image = first_save
    args = update_args(image)
    if change == "other-offset":
        args["uri"] += ",offset=4096"
    elif change == "no-checksums":
        assert "error" not in await job(
            qmp, "plain", {"backends": ["ram"], "uri": f"file:{image}", "checksums": False}
        )
    elif change == "truncated":
        os.truncate(image, image.stat().st_size - 100)
    elif change == "both-passes":
        args["x-live"] = True
    elif change == "update-without-checksums":
        args["checksums"] = False
    elif change == "missing":
        args["uri"] = f"file:{short_dir}/nothing.sav"
    before = image.read_bytes()
    assert expected in await qmp_error(qmp, "memory-save", {"job-id": "u", **args})
    assert image.read_bytes() == before
    assert not (short_dir / "nothing.sav").exists()
    assert await qmp.execute("query-jobs") == []


async def test_a_byte_flipped_in_the_file_between_the_passes_is_refused_at_restore(
    qmp: Any, shm: Path, first_save: tuple[Path, Path]
) -> None:
    """The update finds what changed in memory, not on disk: a unit whose bytes changed in
    the file after the live pass (bad luck on the disk) hashes in memory as its table
    says and is kept. The restore's per-unit check must then refuse the file instead of
    restoring the flipped byte as `completed`."""
    from .conftest import parse_save

    ram, image = first_save
    block = parse_save(image).blocks[0]
    at = block.pages_offset + 5 * MiB + 1234  # in unit 5, a data page
    with open(image, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))
    result = await job(qmp, "update", update_args(image))
    assert "error" not in result, result
    fill_random(ram, SIZE, seed=99)
    await qmp.execute("memory-restore", {"job-id": "check", "uri": f"file:{image}"})
    result = (await wait_concluded(qmp, "check"))["check"]
    assert "checksum mismatch in ramblock 'm'" in result.get("error", ""), result
