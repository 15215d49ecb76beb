"""Whether a client sees the directory of a file it names as migd does.

migd may run in a mount namespace of its own (systemd's PrivateTmp=yes, ProtectSystem,
a container): a client naming `/tmp/x` then means its /tmp, while migd would create the
file in its private one, where the client never finds it, and a save said `completed`
would be nowhere the client can reach. So before a named file is opened, the directory
that holds it is looked up as the client sees it, through the client's root
(/proc/PID/root, the name resolved inside it with openat2's RESOLVE_IN_ROOT so that an
absolute symlink on the way stays in the client's tree) and compared, by device and
inode, with migd's own. The client is the process at the other end of the connection:
its pid from SO_PEERCRED, checked after the lookup to still be that very process through
a pidfd of it (SO_PEERPIDFD), so that a pid reused meanwhile is never taken for it.

Where the client's root cannot be looked into (it exited, a kernel without SO_PEERPIDFD,
or migd may not: a client holding capabilities migd lacks, as under the shipped unit,
which drops them all), nothing is refused: migd does as before."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import struct

from .paths import FileRefused

log = logging.getLogger(__name__)

SO_PEERPIDFD = 77  # Linux 6.5; not in Python 3.11's socket module
_SYS_OPENAT2 = 437  # x86-64 and the generic table alike
_RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)


class OtherView(FileRefused):
    """The client and migd see different directories under one name."""


def peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd of the process that connected `sock`, None where the kernel gives none."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        return None  # ESRCH: it exited; ENOPROTOOPT: a kernel before 6.5


def _pidfd_names(pidfd: int, pid: int) -> bool:
    """Whether the process `pidfd` refers to still runs under the pid `pid`."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as info:
            for line in info:
                if line.startswith("Pid:"):
                    return int(line.split()[1]) == pid
    except (OSError, ValueError):
        return False
    return False


def _open_in_root(root_fd: int, path: str) -> int:
    """`path` opened O_PATH as a process whose root is `root_fd` resolves it."""
    how = struct.pack("QQQ", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT)
    fd = _libc.syscall(_SYS_OPENAT2, root_fd, os.fsencode(path), how, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _client_directory(pid: int, pidfd: int, directory: str) -> os.stat_result | None:
    """The directory as the client sees it; None where its root cannot be looked into.
    Raises FileNotFoundError (and the like) when the client has no such directory."""
    try:
        root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None  # gone, or not ours to look into (EACCES: it holds capabilities)
    try:
        # Taken after the root is held: that root is the client's, not a pid reuser's.
        if not _pidfd_names(pidfd, pid):
            return None
        fd = _open_in_root(root_fd, directory)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)
    finally:
        os.close(root_fd)


def refuse_other_view(path: str, pid: int | None, pidfd: int | None) -> None:
    """Refuse `path` if the client (pid, pinned by pidfd) sees another directory holding
    it than migd does. Called before anything is created."""
    if pid is None or pid <= 0 or pidfd is None or pid == os.getpid():
        return
    if not os.path.isabs(path):
        return  # relative to migd's working directory: no directory of the client's to compare
    directory = os.path.dirname(os.path.normpath(path)) or "/"
    try:
        st = os.stat(directory)
        mine: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        mine = None  # migd's own open says what is wrong, unless the client sees one
    try:
        theirs = _client_directory(pid, pidfd, directory)
    except (FileNotFoundError, NotADirectoryError):
        seen = None  # the client has no such directory
    except OSError:
        return
    else:
        if theirs is None:
            return  # the client could not be looked into
        seen = (theirs.st_dev, theirs.st_ino)
    if seen == mine:
        return
    raise OtherView(
        f"'{path}': the client's {directory} is not migd's (migd runs in another mount "
        "namespace, e.g. systemd's PrivateTmp=yes): use a directory both see, such as "
        "/var/lib/migd, or pass the file as an fd"
    )


def check_client_view(path: str, pid: int | None, sock: socket.socket | None) -> None:
    """refuse_other_view with a pidfd taken from the client's connection (the kernel keeps
    the peer's process there, so the pidfd is of the process that connected)."""
    if sock is None or pid is None:
        return
    pidfd = peer_pidfd(sock)
    try:
        refuse_other_view(path, pid, pidfd)
    finally:
        if pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(pidfd)
