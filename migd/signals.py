"""Signal handlers of in-process callers that want a signal handed on to them.

A client command (tools/client.py's Interrupt) catches SIGINT, SIGTERM and SIGHUP while
it runs, to cancel what it started and clean up before it ends. The CLI then exits
saying it was interrupted. An in-process caller that runs such commands in a loop
(`migd bench --vm`) must see that signal too, or it goes on to its next round: it marks
its handler with `hand_caught_signals_to`, and the command raises the signal again for
that handler once it has ended. The CLI's own handlers (asyncio's for Ctrl-C) are not
marked.
"""

from __future__ import annotations

from typing import Any, TypeVar

_HANDED_ON: set[Any] = set()
_H = TypeVar("_H")


def hand_caught_signals_to(handler: _H) -> _H:
    """Mark `handler` (installed with signal.signal) as one a caught signal goes on to."""
    _HANDED_ON.add(handler)
    return handler


def wants_caught_signals(handler: Any) -> bool:
    return handler in _HANDED_ON
