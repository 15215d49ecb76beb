"""Which client the current task serves, for the log lines of what it starts.

A session's task sets it (qmp/server.py); the tasks it starts (jobs, releases) inherit it
with the rest of its context, so a job's log lines can name the client that started it,
and the journal ties them to that client's "client N connected: pid=... uid=..." line.
"""

from __future__ import annotations

from contextvars import ContextVar

_CLIENT: ContextVar[str | None] = ContextVar("migd_client", default=None)


def serve_client(label: str) -> None:
    """The current task (a session's) and the tasks it starts serve `label` ("client 3")."""
    _CLIENT.set(label)


def current_client() -> str | None:
    """The client the current task serves; None for the daemon's own steps."""
    return _CLIENT.get()
