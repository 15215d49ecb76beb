"""Shared fixtures: a real migd daemon process on a short UNIX socket path, raw clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT = 15.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: UNIX socket paths must stay under 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="migd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll until the daemon accepts connections (or dies); raises on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"migd exited with {proc.returncode}: {proc.stderr.read().decode()}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise TimeoutError(f"migd did not listen on {path} within {timeout}s")


class DaemonProcess:
    def __init__(self, socket_path: Path, proc: subprocess.Popen[bytes]) -> None:
        self.socket_path = socket_path
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_daemon(
    socket_path: Path, *extra: str, env: dict[str, str] | None = None
) -> DaemonProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", "migd", "serve", "--socket", str(socket_path), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    wait_for_socket(socket_path, proc, START_TIMEOUT)
    return DaemonProcess(socket_path, proc)


@pytest.fixture
def daemon(short_dir: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(short_dir / "qmp.sock")
    yield d
    d.stop()
    if d.proc.stderr:
        d.proc.stderr.close()


class RawClient:
    """A plain socket client that reads whole QMP messages (CRLF-terminated lines)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""
        self.greeting = self.recv()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg: dict[str, Any]) -> None:
        self.send_raw(json.dumps(msg).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by migd")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return json.loads(line)

    def recv_reply(self) -> dict[str, Any]:
        """The next reply, skipping events."""
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg

    def execute(
        self, name: str, arguments: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        self.send(msg)
        return self.recv_reply()

    def negotiate(self) -> RawClient:
        assert self.execute("qmp_capabilities") == {"return": {}}
        return self

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(daemon: DaemonProcess) -> Iterator[RawClient]:
    client = RawClient(daemon.socket_path)
    yield client
    client.close()


def open_fds(pid: int | None = None) -> set[str]:
    where = f"/proc/{pid}/fd" if pid else "/proc/self/fd"
    return set(os.listdir(where))
