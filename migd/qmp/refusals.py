"""The log lines of refused requests: which client's command failed, and why.

A management application that gets an error from migd often shows the operator nothing
but "operation failed"; the daemon's log is where they look next. So every error reply
is logged at info level with the client's number (the "client N connected: pid= uid="
line says who that is), the command and QMP's error class and text. A client may send
refused requests without pause (a fuzzer, a broken retry loop): at most LIMIT lines are
written per WINDOW seconds, over all clients together, and the lines left out are counted
in one line when the window ends, so the log cannot be flooded and nothing is hidden
silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

LIMIT = 20  # lines per window, all clients together
WINDOW = 10.0  # seconds


class RefusalLog:
    """Logs refused requests, LIMIT per WINDOW seconds (module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._window_start = -WINDOW  # the first refusal opens a window
        self._logged = 0
        self._left_out = 0
        self._summary: asyncio.TimerHandle | None = None

    def refused(self, client: int, command: str | None, error: dict[str, Any]) -> None:
        """An error reply to client `client`'s request `command` (None: not a request)."""
        now = self._clock()
        if now - self._window_start >= WINDOW:
            self._end_window()
            self._window_start = now
        if self._logged < LIMIT:
            self._logged += 1
            what = f"'{_printable(command, 80)}'" if command is not None else "a request"
            log.info(
                "client %d: %s refused: %s: %s",
                client, what, error.get("class"), _printable(str(error.get("desc")), 400),
            )  # fmt: skip
            return
        self._left_out += 1
        if self._summary is None:
            # Said when the window ends, even if no refusal comes after it.
            loop = asyncio.get_running_loop()
            self._summary = loop.call_at(
                loop.time() + max(0.0, self._window_start + WINDOW - now), self._end_window
            )

    def _end_window(self) -> None:
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        if self._left_out:
            log.info(
                "%d more refused requests in %.0f s not logged (at most %d lines per %.0f s)",
                self._left_out, WINDOW, LIMIT, WINDOW,
            )  # fmt: skip
        self._logged = 0
        self._left_out = 0
        self._window_start = self._clock()

    def close(self) -> None:
        """At shutdown: say what was left out, and drop the timer."""
        self._end_window()


def _printable(text: str, limit: int) -> str:
    """`text` as one log line: the client chose it (a command name, a path in an error), so
    a newline or an escape sequence in it is shown escaped, not written to the log, and a
    long one is cut."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."
