"""io/threads.py's WorkerPool: the threads every job's channels, populator and hashing
run in."""

from __future__ import annotations

import os
import threading

from migd.io.threads import WORKER_NICE, WorkerPool


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
