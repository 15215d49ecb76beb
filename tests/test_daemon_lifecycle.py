"""Starting, stopping and socket handling of `migd serve`, as real processes."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from .conftest import RawClient, start_daemon


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_daemon_within_two_seconds_and_removes_the_socket(short_dir, sig):
    d = start_daemon(short_dir / "qmp.sock")
    client = RawClient(d.socket_path).negotiate()  # a connected client must not delay exit
    started = time.monotonic()
    assert d.stop(sig, timeout=5) == 0
    assert time.monotonic() - started < 2.0
    assert not d.socket_path.exists()
    client.close()


def test_socket_is_created_with_mode_0600_in_a_new_parent_directory(short_dir):
    path = short_dir / "a" / "b" / "qmp.sock"
    d = start_daemon(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        d.stop()


def test_socket_mode_option_is_applied(short_dir):
    d = start_daemon(short_dir / "qmp.sock", "--socket-mode", "0660")
    try:
        assert stat.S_IMODE(os.stat(d.socket_path).st_mode) == 0o660
    finally:
        d.stop()


def test_stale_socket_file_left_by_a_dead_daemon_is_replaced(short_dir):
    path = short_dir / "qmp.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    d = start_daemon(path)
    try:
        assert "return" in RawClient(path).execute("qmp_capabilities")
    finally:
        d.stop()


def test_live_socket_is_refused_with_exit_code_1_and_left_working(short_dir):
    d = start_daemon(short_dir / "qmp.sock")
    try:
        second = subprocess.run(
            [sys.executable, "-m", "migd", "serve", "--socket", str(d.socket_path)],
            capture_output=True,
            timeout=20,
        )
        assert second.returncode == 1
        assert f"another migd is serving it (pid {d.proc.pid}".encode() in second.stderr
        assert "return" in RawClient(d.socket_path).execute("qmp_capabilities")
    finally:
        d.stop()


def test_a_live_socket_of_another_program_is_refused_naming_it_not_called_a_migd(short_dir):
    """Every live socket at the path was "another migd" (red-team, session 17): here a
    listener of the test's own process, as a QEMU's QMP socket or another service's."""
    path = short_dir / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "migd", "serve", "--socket", str(path)],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert second.returncode == 1
        assert "another migd" not in second.stderr, second.stderr
        with open("/proc/self/cmdline", "rb") as f:  # how this process was started
            program = os.path.basename(os.fsdecode(f.read().split(b"\0")[0]))
        assert f"it is in use: {program!r} (pid {os.getpid()}, uid {os.getuid()})" in (
            second.stderr
        ), second.stderr
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left in place
    finally:
        listener.close()


def test_a_regular_file_in_the_socket_path_is_not_deleted(short_dir):
    path = short_dir / "qmp.sock"
    path.write_text("precious")
    result = subprocess.run(
        [sys.executable, "-m", "migd", "serve", "--socket", str(path)],
        capture_output=True,
        timeout=20,
    )
    assert result.returncode == 1
    assert b"exists and is not a socket" in result.stderr
    assert path.read_text() == "precious"


@pytest.mark.parametrize("where", ["read-only", "under-a-file"])
def test_a_socket_directory_that_cannot_be_made_is_one_error_line(short_dir, readonly_dir, where):
    """The socket's directory on a read-only mount (the unit's ProtectSystem=strict and
    a --socket outside /run) or under a file: a traceback ending in os.makedirs was all
    the journal said (red-team, round 10c). Now one line naming the directory; exit 1."""
    if where == "read-only":
        path, directory, why = readonly_dir / "d" / "m.sock", readonly_dir / "d", "Read-only"
    else:
        (short_dir / "f").write_text("")
        path, directory, why = short_dir / "f" / "m.sock", short_dir / "f", "is not a directory"
    result = subprocess.run(
        [sys.executable, "-m", "migd", "serve", "--socket", str(path)],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.splitlines()
    assert f"Cannot listen on '{path}': cannot create its directory '{directory}': " in line
    assert why in line, line


def test_a_listener_whose_backlog_is_full_is_refused_not_waited_for(short_dir):
    """A socket whose listener accepts nothing and whose backlog is full (a stopped or
    hung migd its clients piled up on): the start's probe of it blocked in connect() for
    ever, with no log line (red-team, round 10c). It is refused at once now, exit 1."""
    path = short_dir / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued = []
    try:
        while True:  # fill the backlog: the kernel refuses the next connect with EAGAIN
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            queued.append(client)
            try:
                client.connect(str(path))
            except BlockingIOError:
                break
        result = subprocess.run(
            [sys.executable, "-m", "migd", "serve", "--socket", str(path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        for client in queued:
            client.close()
        listener.close()
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert f"Cannot listen on '{path}': a socket is there and migd cannot tell whether" in line
    assert "Resource temporarily unavailable" in line, line
    assert path.exists()


def test_bad_socket_mode_is_a_usage_error(short_dir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "migd",
            "serve",
            "--socket",
            str(short_dir / "s"),
            "--socket-mode",
            "rw",
        ],
        capture_output=True,
        timeout=20,
    )
    assert result.returncode == 2
    assert b"not an octal mode" in result.stderr


def test_sigterm_the_moment_the_socket_appears_is_a_clean_stop(short_dir):
    """A client (systemd, a test) may connect and stop migd as soon as the socket exists:
    the signal must already run migd's shutdown, not the default action that kills it
    and leaves the socket behind."""
    sock = short_dir / "qmp.sock"
    for _ in range(10):
        proc = subprocess.Popen(
            [sys.executable, "-m", "migd", "serve", "--socket", str(sock)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while not sock.exists():  # bounded busy wait: catch the socket's first moment
            assert proc.poll() is None and time.monotonic() < deadline, "migd did not bind"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not sock.exists()
