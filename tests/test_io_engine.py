"""The job's handling of its I/O engine's failures, through the IOEngine seam: a fake
engine (tests/fake_engine.py) raises a chosen error or waits for the cancel, in an
in-process daemon, and the job's status, error-desc, files and fds are checked."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest

from migd.errors import ChannelError, MemoryFault, MigrationError
from migd.io.engine import ENGINES, load_engine
from migd.io.target import NotSeekable, parse_uri
from migd.io.threads import ThreadEngine

from .conftest import (
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    is_complete_save,
    migd_threads,
    open_fds,
    poll_until,
    qmp_error,
    restore,
    save,
    wait_migration,
)
from .fake_engine import FakeEngine

MiB = 1 << 20
SIZE = 8 * MiB


def _unmapped(mem_path: Path) -> bool:
    """Neither mapped nor open in this process: object-del after a failed job unmaps at
    once, so no frame or traceback of the job's error may still hold a view of the memory."""
    maps = Path("/proc/self/maps").read_text()
    return str(mem_path) not in maps and not any(str(mem_path) in fd for fd in open_fds())


async def _ready(migd_inproc: Any, qmp: Any, shm: Path, fake: FakeEngine) -> None:
    fill_random(shm / "ram0", SIZE, seed=3)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE)
    await enable_mapped_ram(qmp)
    migd_inproc.daemon.services.engine.io_engine = fake


async def test_a_save_whose_engine_fails_ends_failed_with_its_error_and_no_complete_file(
    migd_inproc, qmp, shm, short_dir
):
    image = short_dir / "save.img"
    text = f"Could not write '{image}': Input/output error"
    fake = FakeEngine(error=ChannelError(text))
    await _ready(migd_inproc, qmp, shm, fake)
    fds_before = open_fds()
    info = await save(qmp, image)
    assert info["status"] == "failed"
    assert info["error-desc"] == text
    assert fake.directions == ["save"]
    assert not is_complete_save(image)  # no end section: readers refuse it
    assert open_fds() == fds_before and migd_threads() == []


async def test_a_restore_whose_engine_fails_says_the_backends_hold_partial_data(
    migd_inproc, qmp, shm, short_dir
):
    image = short_dir / "save.img"
    text = f"Could not read '{image}': Bad address"
    fake = FakeEngine(error=MemoryFault(text), at=2)  # the save (1st) is real
    await _ready(migd_inproc, qmp, shm, fake)
    assert (await save(qmp, image))["status"] == "completed"
    gc.disable()  # only migd itself may release the mapping (see _unmapped)
    try:
        info = await restore(qmp, image)
        assert info["status"] == "failed"
        assert info["error-desc"] == f"{text}; memory backends 'ram0' hold partial data"
        assert fake.directions == ["save", "restore"]
        await qmp.execute("object-del", {"id": "ram0"})
        assert _unmapped(shm / "ram0")
    finally:
        gc.enable()
    # The mark stays: object-add of that file is refused until a restore completes.
    add = {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE}
    desc = await qmp_error(qmp, "object-add", {**add, "mem-path": str(shm / "ram0")})
    assert "interrupted restore of" in desc and str(image) in desc, desc


async def test_an_unexpected_engine_exception_is_an_internal_error_and_migd_serves_on(
    migd_inproc, qmp, shm, short_dir
):
    fake = FakeEngine(error=RuntimeError("planted"))
    await _ready(migd_inproc, qmp, shm, fake)
    info = await save(qmp, short_dir / "a.img")
    assert info["status"] == "failed"
    assert info["error-desc"] == "Internal error: RuntimeError: planted"
    # The daemon goes on: the next job (a real transfer) completes.
    assert [m["id"] for m in await qmp.execute("query-memdev")] == ["ram0"]
    info = await save(qmp, short_dir / "b.img")
    assert info["status"] == "completed", info
    assert is_complete_save(short_dir / "b.img")
    assert fake.calls == 2


@pytest.mark.parametrize("direction", ["save", "restore"])
async def test_migrate_cancel_reaches_the_engine(migd_inproc, qmp, shm, short_dir, direction):
    image = short_dir / "save.img"
    fake = FakeEngine(hang=True, at=1 if direction == "save" else 2)
    await _ready(migd_inproc, qmp, shm, fake)
    if direction == "save":
        await qmp.execute("migrate", {"uri": f"file:{image}"})
    else:
        assert (await save(qmp, image))["status"] == "completed"
        await qmp.execute("migrate-incoming", {"uri": f"file:{image}"})
    await poll_until(lambda: qmp.execute("query-migrate"), lambda _: fake.hanging, "engine runs")
    await qmp.execute("migrate_cancel")
    info = await wait_migration(qmp)
    assert info["status"] == "cancelled"
    assert fake.cancel_seen
    if direction == "save":
        assert not is_complete_save(image)
    else:
        assert info["error-desc"] == "Restore cancelled; memory backends 'ram0' hold partial data"


def test_the_engine_table_names_the_threads_engine_by_default_and_refuses_others():
    assert isinstance(load_engine(), ThreadEngine)
    assert set(ENGINES) == {"threads"}
    with pytest.raises(MigrationError, match=r"unknown I/O engine 'uring' \(known: threads\)"):
        load_engine("uring")


def test_the_target_table_parses_file_uris_and_keeps_qemus_texts_for_the_others():
    target = parse_uri("file:/x/save.img,offset=0x1000")
    assert (target.path, target.offset, str(target)) == (
        "/x/save.img",
        0x1000,
        "file:/x/save.img,offset=4096",
    )
    with pytest.raises(NotSeekable) as refused:
        parse_uri("unix:/run/x.sock")
    assert refused.value.desc == "Migration requires seekable transport (e.g. file)"
    with pytest.raises(MigrationError) as unknown:
        parse_uri("nope:x")
    assert unknown.value.desc == "unknown migration protocol: nope:x"
