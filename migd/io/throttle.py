"""The bandwidth cap shared by every channel of a job (max-bandwidth)."""

from __future__ import annotations

import threading
import time


class Throttle:
    """Caps the bytes per second of all channels together (0 = unlimited).

    The rate can change while channels wait (migrate-set-parameters max-bandwidth during
    a migration, as in QEMU): a waiting channel looks again every POLL seconds.
    """

    POLL = 0.05
    # Time not used to send earns at most this much credit: a cap is a rate, not a budget.
    # The daemon's cap lives as long as the daemon, and counting from its start, an idle
    # daemon (8 s at 16 MiB/s) let the next jobs send 128 MiB at full speed (red-team,
    # session 15); a channel held up by a slow disk likewise earned a burst over the cap.
    # A second's worth: less left parallel channels whose calls take long (remote
    # storage, 0.3-0.45 s each) waiting for no reason, under the cap.
    CREDIT_SECONDS = 1.0

    def __init__(self, rate: int, parent: Throttle | None = None) -> None:
        self.parent = parent  # a cap shared with other jobs (the daemon's), waited for too
        self._lock = threading.Lock()
        self._rate = rate
        self._start = time.monotonic()
        self._granted = 0

    @property
    def rate(self) -> int:
        """Bytes per second now (0 = unlimited), the lower of this cap and its parent's: I/O
        calls are sized to it."""
        parent = self.parent.rate if self.parent is not None else 0
        return min((r for r in (self._rate, parent) if r > 0), default=0)

    def set_rate(self, rate: int) -> None:
        """A new cap from now on; what was granted under the old one is not owed."""
        with self._lock:
            self._rate = rate
            self._start = time.monotonic()
            self._granted = 0

    def wait(self, nbytes: int, cancel: threading.Event) -> None:
        self._wait(nbytes, cancel)
        if self.parent is not None:
            self.parent.wait(nbytes, cancel)

    def _wait(self, nbytes: int, cancel: threading.Event) -> None:
        with self._lock:
            if self._rate <= 0:
                return
            earliest = time.monotonic() - self.CREDIT_SECONDS
            if self._start + self._granted / self._rate < earliest:
                self._start, self._granted = earliest, 0
            self._granted += nbytes
        while True:
            with self._lock:
                if self._rate <= 0:
                    return
                delay = self._start + self._granted / self._rate - time.monotonic()
            if delay <= 0 or cancel.wait(min(delay, self.POLL)):
                return
