"""Worker-thread calls of the commands and jobs (opens, stats, syncs, closes, unmaps),
with a cap on how many threads one client uid's requests hold at once.

Every blocking call a session makes goes through `to_thread` or `submit` here: its own
commands, the jobs it starts (their tasks inherit the session's context) and the release
of what a scoped session leaves. The server tells this module whose requests its session
task serves (`serve_uid`), a context variable that tasks started from it carry along.

Root's and migd's own uid (the management), and the daemon's own steps (configuration,
shutdown), use the event loop's default executor (app/daemon.py: 64 threads), as before.
Any other uid gets a pool of its own of UID_WORKER_THREADS threads: its further calls
wait in that pool's queue, so a uid whose calls never return (a FUSE filesystem it
serves that stops answering) holds its own threads only, never another uid's nor the
management's.

The job's channel, populator and hashing threads run in io/threads.py's WorkerPool,
which has no cap and so cannot be held by anyone (a capped one could deadlock: a
transfer's hashing threads wait for its channels); only a job's own steps (job_thread:
the head, the syncs, the end section) come here, counted against the uid that started it.
What ends a job (closing its files, taking back a cancelled save's end) runs in a second
pool of the uid's (submit_cleanup), so a cancel is never kept waiting behind that uid's
stuck calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from ..state.paths import is_root_or_migd

# Threads one uid other than root's and migd's may hold at once. 16 leaves room for a
# dozen requests stuck on one dead NFS or FUSE mount (a case migd serves, test_faults)
# plus a job's steps; a pool's threads are made only as its uid needs them, and a stuck
# one costs a stack, not CPU. Calls past the cap wait in the pool's queue rather than
# being refused: a refusal would fail a client's object-add, or a job's step half-way,
# for its own uid's other requests; waiting keeps a request's meaning (it takes as long
# as its filesystem), and a waiting call is dropped when its request is cancelled.
UID_WORKER_THREADS = 16

# The uid whose requests the current task serves: None for the daemon's own steps.
_SERVING: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "migd_serving_uid", default=None
)
# A client whose uid could not be read (SO_PEERCRED failed): capped, as another uid.
UNKNOWN_UID = -1

_T = TypeVar("_T")


def serve_uid(uid: int | None) -> None:
    """The current task (a session's) serves `uid`'s requests, and so do the tasks it
    starts from now on (jobs, releases). None: the peer's uid is unknown."""
    _SERVING.set(UNKNOWN_UID if uid is None else uid)


def capped_uid() -> int | None:
    """The uid whose requests the current task serves when it is capped (any uid but
    root's and migd's, UNKNOWN_UID included); None for root's, migd's and the daemon's
    own steps. The job table counts a job against it as the pools count its calls."""
    uid = _SERVING.get()
    return None if uid is None or is_root_or_migd(uid) else uid


class _Pool:
    """One uid's pool of one kind, with the count of its calls not yet done (queued or
    running): the pool is let go when that count falls to zero."""

    def __init__(self, uid: int, kind: str) -> None:
        prefix = f"asyncio-uid{uid}" + ("" if kind == "calls" else f"-{kind}")
        self.executor = ThreadPoolExecutor(UID_WORKER_THREADS, thread_name_prefix=prefix)
        self.pending = 0


class UidPools:
    """The per-uid pools, made on a uid's first call and let go once it has no call
    queued or running. A ThreadPoolExecutor's threads never end while it lives: kept for
    the daemon's life, every uid that ever made one request (a socket open to all, the
    65,536 sub-uids of a rootless container's user) kept a thread per pool for months,
    until thread creation hit the pids limit and failed root's calls too. A uid's next
    call after that makes a new pool, which costs a thread start, not a leak."""

    def __init__(self) -> None:
        self._pools: dict[tuple[int, str], _Pool] = {}
        # Taken on the event loop (submit) and in worker threads (a call's end): never
        # held while a future is cancelled or a pool shut down, whose callbacks take it.
        self._lock = threading.Lock()

    def submit(self, uid: int, kind: str, call: Callable[[], _T]) -> Future[_T]:
        """Run `call` in `uid`'s pool of `kind` ("calls", or "cleanups": see
        submit_cleanup), counted until its future is done (run, failed or cancelled)."""
        with self._lock:
            pool = self._pools.get((uid, kind))
            if pool is None:
                pool = self._pools[(uid, kind)] = _Pool(uid, kind)
            # Counted before it is submitted: a done callback may run before submit returns.
            pool.pending += 1
            try:
                future = pool.executor.submit(call)
            except BaseException:
                self._done(uid, kind, pool)
                raise
        future.add_done_callback(lambda _: self._release(uid, kind, pool))
        return future

    def _release(self, uid: int, kind: str, pool: _Pool) -> None:
        with self._lock:
            idle = self._done(uid, kind, pool)
        if idle:
            # Its threads end once idle; one still running a call (cancelled, say) ends
            # after it. Not waited for: this runs in one of them.
            pool.executor.shutdown(wait=False)

    def _done(self, uid: int, kind: str, pool: _Pool) -> bool:
        """One of `pool`'s calls is done (the lock held): True when it was the last and
        the pool was let go (the caller shuts it down, outside the lock)."""
        pool.pending -= 1
        if pool.pending > 0 or self._pools.get((uid, kind)) is not pool:
            return False
        del self._pools[(uid, kind)]
        return True

    def count(self) -> int:
        """The pools alive (tests: none once no call of other uids is left)."""
        with self._lock:
            return len(self._pools)

    def shutdown(self) -> None:
        """At daemon stop: calls still queued are dropped (their requests were cancelled
        with their sessions), idle threads end; a thread still in a call is not waited
        for here."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.executor.shutdown(wait=False, cancel_futures=True)


POOLS = UidPools()


def submit(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> asyncio.Future[_T]:
    """Run func(*args, **kwargs) in a worker thread of the current task's uid: the
    future's cancel drops a call still queued, not one running (engine.job_thread waits
    for that one). The call sees the caller's context variables, as asyncio.to_thread."""
    return _submit("calls", functools.partial(func, *args, **kwargs))


def submit_cleanup(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> asyncio.Future[_T]:
    """submit, for what ends a job (closing its files, taking back a cancelled save's
    end): a capped uid's run in a pool of their own, so they never wait behind that
    uid's other calls. A cancel drops a job's steps queued behind its uid's stuck calls
    and must then close the job's files: in the same queue, the job stayed `cancelling`
    for as long as they did. Closes are not done on the event loop either: a close on a
    FUSE or NFS mount that stopped answering waits for it (its FLUSH)."""
    return _submit("cleanups", functools.partial(func, *args, **kwargs))


class RunningCalls:
    """The calls worker threads are running now, by name and start: the process's exit
    waits for each (the executors' threads are joined), so shutdown says which are still
    running (app/daemon.py) rather than wait in silence for one stuck on a dead mount."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[int, tuple[str, float]] = {}
        self._keys = itertools.count()
        self._idle_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def run(self, name: str, call: Callable[[], _T]) -> _T:
        """call(), listed as `name` while it runs (in its worker thread)."""
        key = next(self._keys)
        with self._lock:
            self._calls[key] = (name, time.monotonic())
        try:
            return call()
        finally:
            waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
            with self._lock:
                del self._calls[key]
                if not self._calls:
                    waiters, self._idle_waiters = self._idle_waiters, []
            for loop, future in waiters:
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_set_done, future)

    def snapshot(self) -> list[tuple[str, float]]:
        """(name, seconds running) of each call running now, longest first."""
        now = time.monotonic()
        with self._lock:
            calls = sorted(self._calls.values(), key=lambda c: c[1])
        return [(name, now - start) for name, start in calls]

    def idle(self) -> asyncio.Future[None]:
        """A future of the running loop, done once no call runs."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._calls:
                self._idle_waiters.append((loop, future))
                return future
        future.set_result(None)
        return future


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


RUNNING = RunningCalls()


def _call_name(call: Callable[..., Any]) -> str:
    """The function a (partial of a) call runs, for shutdown's report."""
    while isinstance(call, functools.partial):
        call = call.func
    inner = getattr(getattr(call, "__self__", None), "_call", None)  # a Step's own call
    if inner is not None:
        return _call_name(inner)
    return getattr(call, "__qualname__", type(call).__name__)


def _submit(kind: str, call: Callable[[], _T]) -> asyncio.Future[_T]:
    uid = _SERVING.get()
    run = functools.partial(
        RUNNING.run, _call_name(call), functools.partial(contextvars.copy_context().run, call)
    )
    loop = asyncio.get_running_loop()
    if uid is None or is_root_or_migd(uid):
        return loop.run_in_executor(None, run)
    # What run_in_executor does, with the pool's own submit (which counts the call).
    return asyncio.wrap_future(POOLS.submit(uid, kind, run), loop=loop)


class Step:
    """A call submitted to a worker thread that a cancel may drop while it is still
    queued (engine.job_thread: a job's step waiting behind its uid's stuck calls). Once
    its thread has started it, the call runs to its end: nothing is closed under it."""

    def __init__(
        self, func: Callable[..., _T], /, *args: Any, cleanup: bool = False, **kwargs: Any
    ) -> None:
        """`cleanup`: in the uid's cleanups pool (submit_cleanup), not its calls'."""
        self._call = functools.partial(func, *args, **kwargs)
        self._lock = threading.Lock()
        self._state = "queued"  # -> "running" or "dropped", once
        self.future: asyncio.Future[Any] | None = (submit_cleanup if cleanup else submit)(
            self._run
        )

    def _run(self) -> Any:
        with self._lock:
            if self._state == "dropped":
                return None  # its future is cancelled: nobody reads this
            self._state = "running"
        return self._call()

    @property
    def dropped(self) -> bool:
        return self._state == "dropped"

    def drop(self) -> bool:
        """Drop the call if no thread has started it (it never will): True; False when it
        runs or ran. Its future is then cancelled, which frees its place in the queue."""
        with self._lock:
            if self._state != "queued":
                return False
            self._state = "dropped"
        if self.future is not None:
            self.future.cancel()
        return True

    def forget(self) -> None:
        """Its waiter is done with it: the future holds the call's error, whose traceback
        holds the waiter's frames, which hold this step (a cycle that kept the error's
        frames, and views of backends' memory with them, until a GC pass)."""
        self.future = None


async def to_thread(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """asyncio.to_thread, in the current task's uid's threads (submit)."""
    return await submit(func, *args, **kwargs)
