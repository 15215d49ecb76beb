"""The disk, shared by every job: at most `slots` page I/O calls in flight daemon-wide,
granted so that each job gets its turn whatever its channel count.

Every channel thread of every job holds a slot for the length of one pwritev/preadv.
When calls wait for a slot, the next free one goes to the waiting job with the fewest
calls in flight (ties: the longest waiting call), so N running jobs each keep about
slots/N calls in flight, and a job with 8 channels does not crowd out one with 2. The
disk stays saturated as long as the slots are enough to saturate it (docs/jobs.md gives
the measurement behind the default); one job alone is never held back below `slots`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Measured with migd.bench.concurrency (8 jobs x 512 MiB, 2 channels each, docs/jobs.md):
# 8 slots left concurrent restores 1.15-1.38x slower than the same restores one after
# another (1 MiB reads need more of them in flight than 8 MiB writes); 16 made them
# 0.78-0.98x, and 32 no better; saves were the same with 8, 16 and 32 (0.92-1.12x).
DEFAULT_SLOTS = 16


class DiskShare:
    POLL = 0.05  # a waiting call looks at its job's cancel event this often

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        self.slots = slots
        self._cond = threading.Condition()
        self._in_flight: dict[object, int] = {}  # job -> calls holding a slot
        self._waiting: dict[int, object] = {}  # ticket -> job, in arrival order
        self._tickets = itertools.count()
        self._total = 0

    @contextmanager
    def slot(self, job: object, cancel: threading.Event) -> Iterator[bool]:
        """Hold a slot for one I/O call of `job`; yields False (and holds none) if the
        job was cancelled while it waited."""
        got = self._acquire(job, cancel)
        try:
            yield got
        finally:
            if got:
                self._release(job)

    def _acquire(self, job: object, cancel: threading.Event) -> bool:
        with self._cond:
            ticket = next(self._tickets)
            self._waiting[ticket] = job
            try:
                while not (self._total < self.slots and self._next() == ticket):
                    if cancel.is_set():
                        return False
                    self._cond.wait(self.POLL)
            finally:
                del self._waiting[ticket]
            self._in_flight[job] = self._in_flight.get(job, 0) + 1
            self._total += 1
            self._cond.notify_all()  # another slot may be free for the next in line
            return True

    def _next(self) -> int:
        """The ticket the next free slot goes to: fewest calls in flight, then oldest."""
        return min(self._waiting, key=lambda t: (self._in_flight.get(self._waiting[t], 0), t))

    def _release(self, job: object) -> None:
        with self._cond:
            left = self._in_flight[job] - 1
            if left:
                self._in_flight[job] = left
            else:
                del self._in_flight[job]
            self._total -= 1
            self._cond.notify_all()

    @property
    def in_flight(self) -> dict[object, int]:
        """A snapshot: calls in flight per job."""
        with self._cond:
            return dict(self._in_flight)
