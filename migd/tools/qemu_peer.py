"""What `migd vm` believes of the QEMU it talks to: only what it can check itself.

`migd vm` runs as root, and QEMU's QMP replies are the word of a process that may run
unprivileged (`-run-with user=...`, or a QEMU a guest took over) or not be QEMU at all:
anything can listen on a socket path. A memory backend's `mem-path` from `qom-get` is
therefore opened only if the process at the other end of the QMP socket (SO_PEERCRED)
maps that very file shared and writable (/proc/PID/maps: device and inode). A QEMU maps
each RAM backend's file for its whole life, and no process can map a file it could not
open: so migd never reads or writes a file on the word of a process that could not have
read and written it itself (red-team, session 13: a fake QEMU as `nobody` named a
root-only file, which root's migd saved into the image and a restore overwrote). The fd
so checked is what the daemon gets (add-fd, mem-path /dev/fdset/N), never the name again.

Also here: every part of a reply that `migd vm` reads is checked for the type QEMU sends,
so that a malformed reply is a clear error, never a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
from typing import Any, TypeVar

from .client import ClientError, peer_credentials, unix_socket

_T = TypeVar("_T")
# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
MAX_ID_CHARS = 128  # far beyond any id QEMU's users give; keeps the image header small


def expect(value: object, kind: type[_T], what: str) -> _T:
    """`value` if it has the type QEMU sends for `what`, else ClientError."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise ClientError(
            f"QEMU's {what} is {shown}, not the {kind.__name__} QEMU sends: is this a QEMU?"
        )
    return value


def member(reply: object, key: str, kind: type[_T], command: str) -> _T:
    """reply[key] of a command's reply object, of the type QEMU sends."""
    fields = expect(reply, dict, f"reply to {command}")
    if key not in fields:
        raise ClientError(f"QEMU's reply to {command} has no '{key}': is this a QEMU?")
    return expect(fields[key], kind, f"'{key}' in its reply to {command}")


def backend_id(value: object) -> str:
    """A memory backend id as QEMU's query-memdev gives it."""
    text = expect(value, str, "memory backend id (query-memdev)")
    if len(text) > MAX_ID_CHARS or not _QEMU_ID.fullmatch(text):
        raise ClientError(
            f"QEMU's memory backend id {text[:MAX_ID_CHARS]!r} is not an id QEMU accepts"
        )
    return text


_SO_PEERPIDFD = 77  # Linux 6.5: a pidfd of the peer; not in Python 3.11's socket module


class Peer:
    """The process that made QEMU's QMP socket: its pid (SO_PEERCRED) and, where the
    kernel gives one, a pidfd of that very process (SO_PEERPIDFD).

    SO_PEERCRED keeps the pid of the process that called listen(), even after it exited:
    a listener of `nobody`'s could fork a server and exit, and once a root QEMU got that
    pid number, its maps made the check pass (red-team, session 13). The pidfd stays
    bound to the process it was made for: `alive()` is true only while that process is
    the one the pid names, so a check that reads /proc/PID/maps and then finds it alive
    read the maps of the listener itself."""

    def __init__(self, qemu: Any) -> None:
        pid, _, _ = peer_credentials(qemu)
        if pid <= 0:
            raise ClientError("QEMU's QMP socket gives no peer pid")
        self.pid = pid
        self.pidfd: int | None = None
        self.exited = False
        try:
            self.pidfd = unix_socket(qemu).getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
        except OSError as exc:
            # ESRCH: the process that made the socket is gone (its pid may be another's
            # by now); else a kernel before 6.5: the pid alone (docs/vm-image.md).
            self.exited = exc.errno == errno.ESRCH

    def alive(self) -> bool:
        """Whether the process that made the socket still runs under that pid."""
        if self.exited:
            return False
        if self.pidfd is None:
            return os.path.exists(f"/proc/{self.pid}")
        try:
            with open(f"/proc/self/fdinfo/{self.pidfd}") as info:
                for line in info:
                    if line.startswith("Pid:"):
                        return int(line.split()[1]) == self.pid
        except (OSError, ValueError):
            return False
        return False

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _maps_shared_writable(pid: int, st: os.stat_result) -> bool:
    """Whether process `pid` has the file (device, inode) mapped shared and writable."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 5 or fields[4] != str(st.st_ino):
                    continue
                major, _, minor = fields[3].partition(":")
                perms = fields[1]
                if (
                    int(major, 16) == os.major(st.st_dev)
                    and int(minor, 16) == os.minor(st.st_dev)
                    and "w" in perms
                    and "s" in perms
                ):
                    return True
    except (OSError, ValueError):
        return False
    return False


def open_guest_ram(peer: Peer, path: str, backend: str) -> int:
    """A read-write fd of `path`, the file QEMU (`peer`) says backs `backend`, once it is
    checked to be a regular file that process maps shared and writable; ClientError
    otherwise. The name is opened once, O_PATH (which opens no device: a name swapped for
    a link to /dev/watchdog between a stat and an open armed it as root), and everything
    is checked on that fd, which is then reopened read-write through /proc/self/fd."""
    try:
        path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise ClientError(
            f"memory backend '{backend}': cannot open its file {path!r}: {exc.strerror}"
        ) from None
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISREG(st.st_mode):
            raise ClientError(
                f"memory backend '{backend}': its file {path!r} is not a regular file"
            )
        if not (_maps_shared_writable(peer.pid, st) and peer.alive()):
            raise ClientError(
                f"memory backend '{backend}': QEMU (pid {peer.pid}, the QMP socket's peer) "
                f"does not map {path!r}: migd opens only the RAM files the QEMU it talks to "
                "really uses (is the socket QEMU's own, the backend share=on, and the "
                "process that made the socket still running?)"
            )
        try:
            return os.open(f"/proc/self/fd/{path_fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ClientError(
                f"memory backend '{backend}': cannot open its file {path!r}: {exc.strerror}"
            ) from None
    finally:
        os.close(path_fd)
