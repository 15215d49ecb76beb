"""The job's status machine and cancellation, on the engine itself (no QMP)."""

from __future__ import annotations

import asyncio
import dataclasses
import os

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
    engine = _engine(events)
    if direction == "restore":  # a file to restore from, saved first
        await engine.start_save(FileTarget(str(image)))
        assert engine.job is not None and engine.job.task is not None
        await engine.job.task
        events.clear()
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
