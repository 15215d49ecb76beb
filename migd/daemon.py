"""The daemon: owns the server and the services; signals, readiness, shutdown order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import Any

import sdnotify

from . import __version__
from .commands import Context, dispatch
from .config import Config
from .memory import MemoryRegistry
from .migration import MigrationEngine
from .qmp import Request, greeting
from .registry import version_numbers
from .server import Server, Session, bind_unix_socket
from .services import Services

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


def inherited_listener() -> socket.socket | None:
    """The socket systemd passed us (LISTEN_FDS/LISTEN_PID), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    if count < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # children must not think the socket is theirs
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(sock.fileno(), False)
    return sock


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        memory = MemoryRegistry()
        self.services = Services(memory, MigrationEngine(memory, self._emit, self.notify))
        self.server: Server | None = None
        self._stop: asyncio.Event | None = None
        self._notifier = sdnotify.SystemdNotifier()
        self._owns_socket_path = False

    def notify(self, state: str) -> None:
        if os.environ.get("NOTIFY_SOCKET"):
            self._notifier.notify(state)

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        if self.server is not None:
            self.server.broadcast_event(name, data)

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _dispatch(self, session: Session, req: Request) -> dict[str, Any]:
        return await dispatch(Context(session=session, services=self.services), req)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        listener = inherited_listener()
        if listener is None:
            listener = bind_unix_socket(self.config.socket_path, self.config.socket_mode)
            self._owns_socket_path = True
            where = self.config.socket_path
        else:
            where = f"inherited socket {listener.getsockname()!r}"
        major, minor, micro = version_numbers()
        self.server = Server(
            listener, greeting(major, minor, micro, f"migd {__version__}"), self._dispatch
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self.server.start()
        log.info("migd %s serving QMP on %s", __version__, where)
        self.notify("READY=1\nSTATUS=serving")
        try:
            await self._stop.wait()
        finally:
            self.notify("STOPPING=1")
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, end the job, close sessions and backends, remove the socket."""
        assert self.server is not None
        await self.server.stop_accepting()
        await self.services.close()
        await self.server.close()
        if self._owns_socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.socket_path)
        log.info("migd stopped")
