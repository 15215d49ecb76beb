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

Where migd may not look into the client's root (a client holding capabilities migd lacks,
as under the shipped unit, which drops them all: EACCES), the mount tables are compared
instead: /proc/PID/mountinfo is readable without capabilities. This fallback is a
heuristic: the directory's name is looked up literally, on both sides alike, in the
client's mount table and in migd's own, each giving the mount that holds it (the longest
mount point prefixing it, the last listed on one point being on top) as (device,
root within that filesystem + the rest of the name). Symlinks are not followed: the
client's cannot be read, and following migd's own on one side only would tell two
identical tables apart (/var/run -> /run crosses mounts). It is still sound: it refuses
only where the two mount tables disagree about that very name, as PrivateTmp's bind of
/tmp/systemd-private-XXX/tmp over /tmp does (another root within the filesystem); mount
ids are not compared, a namespace's copy of a mount having an id of its own.

Where neither can be read (the client exited, a kernel without SO_PEERPIDFD), nothing is
refused: migd does as before."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
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


_ESCAPE = re.compile(rb"\\([0-7]{3})")
MountKey = tuple[bytes, bytes]  # (major:minor, root within the filesystem + the rest)


def _unescape(field: bytes) -> bytes:
    """A mountinfo name with the kernel's octal escapes (\\040 for a space, \\134 for a
    backslash...) undone."""
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def _under(directory: bytes, point: bytes) -> bool:
    """Whether `directory` is the mount point `point` or lies beneath it."""
    return point == b"/" or directory == point or directory.startswith(point + b"/")


def mount_of(mountinfo: bytes, directory: str) -> MountKey | None:
    """What holds `directory` (absolute, normalized) by the mount table `mountinfo`: the
    device of the mount on the longest mount point prefixing it (of several on one point,
    the last listed, which is on top) and the name within that filesystem. None where no
    mount holds it (a table of another root, unreadable lines)."""
    name = os.fsencode(directory)
    best: tuple[bytes, bytes, bytes] | None = None  # (mount point, device, root)
    for line in mountinfo.split(b"\n"):  # not splitlines: a name may hold a \r
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        device, root, point = fields[2], _unescape(fields[3]), _unescape(fields[4])
        if _under(name, point) and (best is None or len(point) >= len(best[0])):
            best = (point, device, root)
    if best is None:
        return None
    point, device, root = best
    rest = name[len(point) :] if point != b"/" else name
    return device, (root.rstrip(b"/") + rest) or b"/"


def _client_mountinfo(pid: int, pidfd: int) -> bytes | None:
    """The client's mount table; None where it cannot be read, or the pid is no longer
    the client's (checked after reading: what was read is then the client's)."""
    try:
        with open(f"/proc/{pid}/mountinfo", "rb") as table:
            mountinfo = table.read()
    except OSError:
        return None
    return mountinfo if _pidfd_names(pidfd, pid) else None


def _tables_disagree(pid: int, pidfd: int, directory: str) -> bool:
    """Whether the client's mount table puts `directory` elsewhere than migd's does (the
    fallback where the client's root may not be looked into; see the module's text)."""
    theirs = _client_mountinfo(pid, pidfd)
    if theirs is None:
        return False
    try:
        with open("/proc/self/mountinfo", "rb") as table:
            mine = table.read()
    except OSError:
        return False
    seen = mount_of(theirs, directory)
    return seen is not None and seen != mount_of(mine, directory)


class _RootClosed(Exception):
    """The client's root may not be looked into (EACCES): compare mount tables instead."""


def _client_directory(pid: int, pidfd: int, directory: str) -> os.stat_result | None:
    """The directory as the client sees it; None where its root cannot be looked into.
    Raises FileNotFoundError (and the like) when the client has no such directory, and
    _RootClosed where migd may not look into its root."""
    try:
        root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError as exc:
        raise _RootClosed from exc  # it holds capabilities migd lacks
    except OSError:
        return None  # gone
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
    except _RootClosed:
        if _tables_disagree(pid, pidfd, directory):
            raise _other_view(path, directory) from None
        return
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
    raise _other_view(path, directory)


def _other_view(path: str, directory: str) -> OtherView:
    return OtherView(
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
