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

import os
import re
import stat
from typing import Any, TypeVar

from .client import ClientError, peer_credentials

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


def peer_pid(qemu: Any) -> int:
    """The pid of the process at the other end of a QMPClient's UNIX socket."""
    pid, _, _ = peer_credentials(qemu)
    if pid <= 0:
        raise ClientError("QEMU's QMP socket gives no peer pid")
    return pid


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


def open_guest_ram(pid: int, path: str, backend: str) -> int:
    """A read-write fd of `path`, the file QEMU (`pid`) says backs `backend`, once it is
    checked to be a regular file that process maps shared and writable; ClientError
    otherwise. Never opens a FIFO or a device (stat first, then O_NONBLOCK, fstat)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ClientError(
                f"memory backend '{backend}': its file {path!r} is not a regular file"
            )
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ClientError(
            f"memory backend '{backend}': cannot open its file {path!r}: {exc.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ClientError(
                f"memory backend '{backend}': its file {path!r} is not a regular file"
            )
        if not _maps_shared_writable(pid, st):
            raise ClientError(
                f"memory backend '{backend}': QEMU (pid {pid}, the QMP socket's peer) does "
                f"not map {path!r}: migd opens only the RAM files the QEMU it talks to "
                "really uses (is the socket QEMU's own, and the backend share=on?)"
            )
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise
