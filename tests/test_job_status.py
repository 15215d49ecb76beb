"""The job's status machine and cancellation, on the engine itself (no QMP)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import weakref
from pathlib import Path

import pytest

from migd.io.target import FileTarget
from migd.migration.engine import MigrationEngine
from migd.migration.job import TRANSITIONS, IllegalTransition, Job, MigrationStatus
from migd.state.memory import MemoryRegistry, create_ram_backend

MiB = 1 << 20


def _engine(events: list[str], **params: object) -> MigrationEngine:
    memory = MemoryRegistry()
    backend = create_ram_backend("ram0", 64 * MiB)
    backend.view(0, backend.size)[:] = b"\x5a" * backend.size  # no zero page to skip
    memory.add(backend)
    def emit(name: str, data: dict[str, object]) -> None:
        if name == "MIGRATION":  # the status changes (MIGRATION_PASS carries none)
            events.append(str(data["status"]))

    engine = MigrationEngine(memory, emit=emit)
    engine.set_capabilities({"mapped_ram": True, "multifd": True, "events": True})
    engine.set_parameters(params)
    return engine


async def _engine_with_a_save(events: list[str], image: Path) -> MigrationEngine:
    """An engine whose backend was saved, completed, into `image`: a file to restore
    from; `events` is cleared of the save's."""
    engine = _engine(events)
    await engine.start_save(FileTarget(str(image)))
    assert engine.job is not None and engine.job.task is not None
    await engine.job.task
    events.clear()
    return engine


def test_an_illegal_status_change_is_refused_and_changes_nothing(short_dir):
    engine = _engine([])
    job = Job("save", FileTarget(str(short_dir / "s.img")), [], 0)
    job.status = MigrationStatus.completed
    with pytest.raises(IllegalTransition, match="completed -> active"):
        engine._set_status(job, MigrationStatus.active)
    assert job.status is MigrationStatus.completed


def test_every_status_has_its_transitions_and_final_ones_have_none():
    assert set(TRANSITIONS) == set(MigrationStatus)
    for final in (MigrationStatus.completed, MigrationStatus.failed, MigrationStatus.cancelled):
        assert not TRANSITIONS[final]


async def test_a_save_and_a_cancelled_save_go_through_allowed_changes_only(short_dir):
    events: list[str] = []
    engine = _engine(events)
    await engine.start_save(FileTarget(str(short_dir / "a.img")))
    assert engine.job is not None and engine.job.task is not None
    await engine.job.task
    assert events == ["setup", "active", "completed"]

    events.clear()
    engine.set_parameters({"max_bandwidth": 4 * MiB})  # slow enough to cancel mid-way
    await engine.start_save(FileTarget(str(short_dir / "b.img")))
    job = engine.job
    assert job is not None and job.task is not None
    while job.status is not MigrationStatus.active:
        await asyncio.sleep(0.01)
    await engine.cancel()
    await job.task
    assert events == ["setup", "active", "cancelling", "cancelled"]


async def test_a_job_task_cancelled_under_its_threads_tells_them_to_stop(short_dir):
    """Leaving the thread pool waits for its threads: an exception there (here the job's
    task cancelled) must first set the job's cancel event, or the loop blocks until the
    threads have moved every page, however long max-bandwidth makes that."""
    engine = _engine([], max_bandwidth=4 * MiB)
    await engine.start_save(FileTarget(str(short_dir / "c.img")))
    job = engine.job
    assert job is not None and job.task is not None
    while not job.counters or job.totals()[0] == 0:
        await asyncio.sleep(0.01)
    job.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job.task
    assert job.cancel.is_set()
    moved = sum(c.pages_done for c in job.counters)
    assert moved * 4096 < job.total_bytes  # the threads stopped, not finished


@pytest.mark.parametrize("direction", ["save", "restore"])
async def test_a_cancel_while_the_channels_open_ends_cancelled_and_never_active(
    short_dir, direction
):
    """The window between the last cancel check of setup and `active`: here the cancel
    comes while the first channel fd is being opened (an fdset opener, in its thread)."""
    events: list[str] = []
    image = short_dir / "s.img"
    # A restore's file to restore from is saved first.
    engine = await _engine_with_a_save(events, image) if direction == "restore" else _engine(events)
    loop = asyncio.get_running_loop()
    calls = 0

    def opener(path: str, flags: int, direct: bool) -> int:
        nonlocal calls
        calls += 1
        fd = os.open(image, (flags & ~os.O_CREAT) | os.O_CREAT, 0o600)
        if calls == 2:  # the first channel: migrate_cancel arrives meanwhile
            asyncio.run_coroutine_threadsafe(engine.cancel(), loop).result(timeout=30)
        return fd

    engine.openers = dataclasses.replace(engine.openers, fdset=opener)
    target = FileTarget("/dev/fdset/1")
    if direction == "save":
        await engine.start_save(target)
    else:
        await engine.start_restore(target, skip_unmatched=False)
    assert engine.job is not None and engine.job.task is not None
    await engine.job.task
    assert calls >= 2
    assert events == ["setup", "cancelling", "cancelled"]
    assert engine.job.error_desc is None or "no memory backend was changed" in engine.job.error_desc


async def test_a_cancel_accepted_while_a_save_finishes_ends_it_cancelled(short_dir, monkeypatch):
    """job-cancel answered (`cancelling`, JOB `aborting`) while the save wrote its bitmaps
    and end section after its last cancel check: the job went on to `completed`, an order
    QEMU never gives (red-team, session 15). A cancel accepted is a cancel, as in QEMU."""
    from migd.migration.mapped_ram import format

    events: list[str] = []
    engine = _engine(events)
    loop = asyncio.get_running_loop()
    bitmap_digest = format.bitmap_digest

    def cancelled_while_finishing(data: bytes) -> str:
        # After finish_save's last cancel check: its bitmaps are being written.
        asyncio.run_coroutine_threadsafe(engine.cancel(), loop).result(timeout=30)
        return bitmap_digest(data)

    monkeypatch.setattr(format, "bitmap_digest", cancelled_while_finishing)
    await engine.start_save(FileTarget(str(short_dir / "a.img")))
    assert engine.job is not None and engine.job.task is not None
    await engine.job.task
    assert events == ["setup", "active", "cancelling", "cancelled"]


async def test_a_cancel_accepted_as_a_restore_ends_says_its_memory_is_whole(
    short_dir, monkeypatch
):
    """The same for a restore, whose cancel came while its partial marks were being
    cleared (every page landed): cancelled, saying the backends hold the restored data."""
    events: list[str] = []
    image = short_dir / "s.img"
    engine = await _engine_with_a_save(events, image)
    loop = asyncio.get_running_loop()
    clear_all = engine.partial.clear_all

    def cancelled_while_clearing(*args: object) -> None:
        asyncio.run_coroutine_threadsafe(engine.cancel(), loop).result(timeout=30)
        clear_all(*args)

    monkeypatch.setattr(engine.partial, "clear_all", cancelled_while_clearing)
    await engine.start_restore(FileTarget(str(image)), skip_unmatched=False)
    assert engine.job is not None and engine.job.task is not None
    await engine.job.task
    assert events == ["setup", "active", "cancelling", "cancelled"]
    assert engine.job.error_desc == (
        "Restore cancelled after its last page had landed; memory backends 'ram0' hold "
        "the whole restored data"
    )


async def test_a_cancel_while_a_restore_plans_its_runs_ends_cancelled_memory_untouched(
    short_dir, monkeypatch
):
    """The restore's last step before `active` is planning its runs (a thread: the memory
    files' SEEK_DATA walks). A cancel accepted meanwhile (`cancelling`) must end the job
    there: `cancelling` never goes back to `active`, and no page of the backend changes."""
    from migd.migration import plan

    events: list[str] = []
    image = short_dir / "s.img"
    engine = await _engine_with_a_save(events, image)
    backend = engine.memory.get("ram0")
    backend.view(0, backend.size)[:] = b"\xa5" * backend.size  # unlike the saved pages
    loop = asyncio.get_running_loop()
    plan_restore_runs = plan.plan_restore_runs

    def cancelled_while_planning(*args: object, **kwargs: object) -> object:
        planned = plan_restore_runs(*args, **kwargs)
        asyncio.run_coroutine_threadsafe(engine.cancel(), loop).result(timeout=30)
        return planned

    monkeypatch.setattr(plan, "plan_restore_runs", cancelled_while_planning)
    await engine.start_restore(FileTarget(str(image)), skip_unmatched=False)
    assert engine.job is not None and engine.job.task is not None
    await engine.job.task
    assert events == ["setup", "cancelling", "cancelled"]
    assert bytes(backend.view(0, backend.size)) == b"\xa5" * backend.size
    assert engine.job.error_desc is None or "no memory backend was changed" in engine.job.error_desc


async def test_a_save_whose_backend_was_restored_into_while_it_started_is_refused(
    short_dir, monkeypatch
):
    """A save reads the backends' partial marks in a thread; a restore into one of them
    that starts and ends (cancelled: partial) meanwhile would leave it saving a mix of
    pages its check never saw. The save is refused and leaves no file."""
    import threading

    image, other = short_dir / "s.img", short_dir / "t.img"
    engine = _engine([])
    await engine.start_save(FileTarget(str(image)))
    assert engine.job is not None and engine.job.task is not None
    await engine.job.task
    checking, go_on = threading.Event(), threading.Event()
    check_save = engine.partial.check_save

    def held_check(*args: object) -> None:
        check_save(*args)
        checking.set()
        assert go_on.wait(30)

    monkeypatch.setattr(engine.partial, "check_save", held_check)
    saving = asyncio.ensure_future(engine.start_save(FileTarget(str(other))))
    while not checking.is_set():
        await asyncio.sleep(0.01)
    engine.set_parameters({"max_bandwidth": 4 * MiB})
    await engine.start_restore(FileTarget(str(image)), skip_unmatched=False)
    restoring = engine.job
    assert restoring is not None and restoring.task is not None
    await engine.cancel()
    await restoring.task
    assert restoring.status is MigrationStatus.cancelled
    go_on.set()
    with pytest.raises(Exception, match="'ram0' was restored into while this save started"):
        await saving
    assert not other.exists()


async def test_an_ended_and_dismissed_job_is_not_kept_alive_by_the_daemon(short_dir):
    """Nothing the daemon schedules after a job's end holds the job: the staging pool's
    trim timer (scheduled at every job's end, run 10 s later) kept the job's task
    context, and with it the job, its plan and its target (round 8b)."""
    engine = _engine([])
    await engine.start_save(FileTarget(str(short_dir / "gone.img")))
    job = engine.job
    assert job is not None and job.task is not None
    await job.task
    if job.id in engine.jobs:  # listed until job-dismiss (unless auto-dismissed)
        engine.dismiss_job(job.id)
    ref = weakref.ref(job)
    del job
    await engine.start_save(FileTarget(str(short_dir / "next.img")))  # query-migrate's now
    assert engine.job is not None and engine.job.task is not None
    await engine.job.task
    gc.collect()
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]
