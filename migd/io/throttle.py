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

    def __init__(self, rate: int) -> None:
        self._lock = threading.Lock()
        self._rate = rate
        self._start = time.monotonic()
        self._granted = 0

    @property
    def rate(self) -> int:
        """Bytes per second now (0 = unlimited): I/O calls are sized to it."""
        return self._rate

    def set_rate(self, rate: int) -> None:
        """A new cap from now on; what was granted under the old one is not owed."""
        with self._lock:
            self._rate = rate
            self._start = time.monotonic()
            self._granted = 0

    def wait(self, nbytes: int, cancel: threading.Event) -> None:
        with self._lock:
            if self._rate <= 0:
                return
            self._granted += nbytes
        while True:
            with self._lock:
                if self._rate <= 0:
                    return
                delay = self._start + self._granted / self._rate - time.monotonic()
            if delay <= 0 or cancel.wait(min(delay, self.POLL)):
                return
