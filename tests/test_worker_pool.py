"""io/threads.py's WorkerPool (the threads every job's channels, populator and hashing
run in) and its Populator."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

from migd.io.engine import PageRun
from migd.io.threads import WORKER_NICE, Populator, RunCursor, WorkerPool
from migd.pages import PAGE_SIZE


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_workers_run_nicer_than_the_event_loop_thread_and_are_named_after_their_work() -> None:
    """The loop thread must win the CPU when it wakes while workers keep the cores busy
    (query-jobs p99 during concurrent restores, docs/jobs.md)."""
    seen: dict[str, object] = {}

    def work() -> None:
        seen["nice"] = _nice()
        seen["name"] = threading.current_thread().name

    pool = WorkerPool()
    pool.submit("migd-restore", work).result(timeout=10)
    assert seen == {"nice": min(19, _nice() + WORKER_NICE), "name": "migd-restore"}
    assert _nice() < 19 and seen["nice"] > _nice()  # strictly nicer, whatever the constant
    # Back to idle between jobs, and the priority stays lowered (never raised back).
    again: dict[str, object] = {}
    pool.submit("migd-save", lambda: again.update(nice=_nice())).result(timeout=10)
    assert again["nice"] == seen["nice"]


def test_the_populator_maps_only_runs_ahead_of_the_channels() -> None:
    """Runs the channels have taken (and the next one) are theirs to fault in: mapping them
    too walked every page twice on a fast disk (issue 19). Zero runs count in the queue's
    order but are never populated."""
    mapped: list[int] = []
    block = SimpleNamespace(
        populate=lambda offset, length: mapped.append(offset // PAGE_SIZE), map_in=None
    )
    runs = [PageRun(0, first, 8, zero=(first == 40)) for first in range(0, 80, 8)]
    cursor = RunCursor()
    cursor.taken = 3  # runs 0-2 taken, run 3 about to be
    Populator([block], runs, threading.Event(), cursor).run()
    assert mapped == [32, 48, 56, 64, 72]
    # Channels that have not started yet leave everything but the first run to it.
    mapped.clear()
    Populator([block], runs, threading.Event(), RunCursor()).run()
    assert mapped == [8, 16, 24, 32, 48, 56, 64, 72]
