"""The worker threads of other uids' requests are capped per uid (migd/io/blocking.py).

The end-to-end case, 64 requests of `nobody` stuck on its own FUSE mount while root's and
a third uid's are answered, is in test_faults.py; these check the one place every call
goes through, and that the daemon's modules use no other.
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

from migd.io import blocking
from migd.io.blocking import UID_WORKER_THREADS

DAEMON_PACKAGES = ("app", "api", "qmp", "migration", "io", "state")
# The client side (tools/, bench/) runs no daemon: its threads are its own.
OTHER_WAYS = re.compile(r"\basyncio\.to_thread\b|\brun_in_executor\b")
HOLD = 60.0  # a bound on a failed test, never a speed assertion


def test_the_daemon_runs_blocking_calls_through_io_blocking_only() -> None:
    root = Path(blocking.__file__).parent.parent
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for package in DAEMON_PACKAGES
        for path in sorted((root / package).rglob("*.py"))
        if path != Path(blocking.__file__)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if OTHER_WAYS.search(line.split("#")[0]) and '"""' not in line
    ]
    assert offenders == []


def thread_name() -> str:
    return threading.current_thread().name


async def test_a_uids_calls_past_the_cap_wait_and_root_is_not_held() -> None:
    """UID_WORKER_THREADS calls of one uid that do not return: its next call waits for
    one of them, root's and the daemon's own calls run meanwhile, and the call that
    waited runs once a thread is free; the uid is the task's, inherited by the tasks it
    starts (a job's)."""
    release = threading.Event()
    started = threading.Semaphore(0)
    running = 0
    most = 0
    lock = threading.Lock()

    def held() -> str:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        started.release()
        release.wait(HOLD)
        with lock:
            running -= 1
        return threading.current_thread().name

    async def as_uid(uid: int) -> list[asyncio.Future[str]]:
        blocking.serve_uid(uid)
        # A task started here (a job's) serves the same uid.
        return await asyncio.create_task(calls(UID_WORKER_THREADS + 1))

    async def calls(count: int) -> list[asyncio.Future[str]]:
        return [blocking.submit(held) for _ in range(count)]

    try:
        futures = await asyncio.create_task(as_uid(65534))
        for _ in range(UID_WORKER_THREADS):
            assert await asyncio.to_thread(started.acquire, True, HOLD)

        # Root's call and the daemon's own (no uid) are answered while nobody's are held.
        async def root() -> str:
            blocking.serve_uid(0)
            return await blocking.to_thread(thread_name)

        assert not (await asyncio.create_task(root())).startswith("asyncio-uid")
        assert not (await blocking.to_thread(thread_name)).startswith("asyncio-uid")
        release.set()
        names = await asyncio.gather(*futures)
        assert {name.split("_")[0] for name in names} == {"asyncio-uid65534"}
        assert most == UID_WORKER_THREADS
    finally:
        release.set()
        blocking.POOLS.shutdown()


def uid_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("asyncio-uid")]


async def test_a_uids_pool_is_let_go_once_its_calls_are_done() -> None:
    """Many uids making one call each (a socket open to all, a rootless container's
    sub-uids) leave no pool and no thread behind: a pool whose calls are all done is let
    go and its threads end (before: each uid's pool, and a thread of it, was kept for the
    daemon's life, 65,536 sub-uids made 65,536 threads). A uid with a call still
    running keeps its pool, and its next call runs in it."""
    uids = range(70000, 70000 + 200)
    release = threading.Event()

    async def one_call(uid: int) -> str:
        blocking.serve_uid(uid)
        return await blocking.to_thread(thread_name)

    async def held_and_next(uid: int) -> tuple[asyncio.Future[bool], str]:
        blocking.serve_uid(uid)
        held = blocking.submit(release.wait, HOLD)
        return held, await blocking.to_thread(thread_name)

    try:
        for uid in uids:
            assert (await asyncio.create_task(one_call(uid))).startswith(f"asyncio-uid{uid}_")
        assert blocking.POOLS._pools == {}
        for thread in uid_threads():
            thread.join(HOLD)
        assert uid_threads() == []

        held, name = await asyncio.create_task(held_and_next(65534))
        assert name.startswith("asyncio-uid65534_")
        assert list(blocking.POOLS._pools) == [(65534, "calls")]
        release.set()
        assert await held
        assert blocking.POOLS._pools == {}
    finally:
        release.set()
        blocking.POOLS.shutdown()
