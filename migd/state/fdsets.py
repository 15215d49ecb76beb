"""Passed fds: getfd's named fds, add-fd's fdsets, and /dev/fdset/N resolution.

QEMU's rules (monitor/fds.c): an open of "/dev/fdset/N" dups the most recently added fd
of set N whose access mode and O_DIRECT flag match the open, so a management app can
hand over one file as two fds (one with O_DIRECT for the multifd channels, one without
for the main channel). Opens come from the event loop and from worker threads, hence
the lock. As in QEMU, a set lives on while dups of it are open (a running migration's
channels, a memory backend mapping a memfd), even after remove-fd closed all its fds:
query-fdsets then lists it with no fds, and add-fd's automatic ids pass it by. Whoever
holds such a dup closes it with close_dup, which lets the set go with its last dup.

Passed fds are capped (unlike QEMU): migd keeps no more than its open-file limit minus a
reserve open, so that passing fds (getfd, add-fd, or fds sent with no command yet) can
never stop migd accepting a client or opening a job's channels with "Too many open
files". A passed fd over the cap is closed and the command fails with a clear error.

Sets and getfd names belong to a uid (unlike QEMU, whose monitors are all one user's):
the methods take `uid`, the uid of a client other than root's and migd's (io/blocking.py
capped_uid), or None for root's, migd's and the daemon's own. Such a uid's clients see
and use only the sets its clients made (every session of the uid shares them, as
libvirt's connections do); another's set is answered as one that does not exist. A set's
id is still one namespace (/dev/fdset/N names one set for everyone), so add-fd into
another uid's set is refused, which alone says it exists. Root's and migd's clients see
and use every set, as in QEMU. getfd names are one namespace per uid (root's and migd's
share theirs): another uid's getfd of the same name makes its own rather than closing
root's (QEMU keeps them per monitor). Before, all were global: `nobody`, let on the
socket, listed root's sets, saved into or restored from the file of one, removed it,
joined it, and closed root's getfd names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import resource
import string
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ..errors import FdError
from .paths import ChannelOpener

FDSET_PREFIX = "/dev/fdset/"
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_O_SYNC = getattr(os, "O_SYNC", 0)
# strtol's grammar, as qemu_parse_fd accepts it: blanks, a sign, decimal digits.
_FD_NUMBER = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")
_INT_MAX = 2**31 - 1


# Fds kept free for accepting clients and for a job's fds (main fd, up to 255 multifd
# channels, backends): passed fds may use the open-file limit only up to this reserve.
FD_RESERVE = 512


def fd_reserve(limit: int) -> int:
    """The reserve under a soft limit of `limit`: FD_RESERVE, or half a small limit."""
    return min(FD_RESERVE, limit // 2)


def fd_budget(share: int) -> int | None:
    """1/`share` of the fds passed ones may use (the open-file limit minus the reserve);
    None under no limit."""
    limit, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limit == resource.RLIM_INFINITY:
        return None
    return (limit - fd_reserve(limit)) // share


def _open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # without the listing's own fd


def _fd_table_size() -> int | None:
    """The size of migd's fd table (FDSize in /proc/self/status): every open fd is below
    it, so no more fds than this are open. None where the kernel does not say."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"FDSize:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_room_for_passed_fds(capped: bool = False) -> None:
    """Refuse to keep more passed fds once migd's open fds reach its limit minus the reserve.

    Counts every open fd of the process (the passed fds just received included), so a
    client holding fds pending or a running job's channels count too. `capped`: they come
    from a uid other than root's and migd's (io/blocking.py capped_uid), which stops at
    half that (check_room_for_fds).
    """
    check_room_for_fds("passed ones", "close some with remove-fd or closefd", capped)


def check_room_for_fds(kept: str, remedy: str, capped: bool = False) -> None:
    """Refuse to keep more of what `kept` names (passed fds; a memory backend of a uid
    other than root's and migd's, api/memory.py) once migd's open fds reach its limit
    minus the reserve; `remedy` says how the client frees some.

    `capped` (for a uid other than root's and migd's): at half of that. At the same
    bound, such a uid's passed fds (one fd sent a thousand times costs it nothing) or
    backends filled it, and root's add-fd was refused, and with it every `migd vm save`;
    the other half is left to root's and migd's clients (the management)."""
    limit, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limit == resource.RLIM_INFINITY:
        return
    allowed = limit - fd_reserve(limit)
    if capped:
        allowed //= 2
    table = _fd_table_size()
    if table is not None and table <= allowed:
        # Fewer fds are open than the table holds: no need to count them. Listing
        # /proc/self/fd for every passed fd cost O(fds stored) each time, which slowed
        # the event loop for every client once thousands were stored (red-team, session 14).
        return
    open_now = _open_fd_count()
    if open_now > allowed:
        whose = " of uids other than root's and migd's" if capped else ""
        raise FdError(
            f"Too many file descriptors: migd has {open_now} open and keeps {kept}{whose} "
            f"under {allowed}, so that {limit - allowed} of its limit of {limit} stay free "
            f"for {'root' if capped else 'clients'} and migrations; {remedy}"
        )


@dataclass
class FdsetFd:
    fd: int
    opaque: str | None = None


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _close_unless_room(fd: int, capped: bool) -> None:
    """Keep fd only if there is room for it (check_room_for_passed_fds); else close it."""
    try:
        check_room_for_passed_fds(capped)
    except FdError:
        _close(fd)
        raise


def is_fdset_path(path: str) -> bool:
    return path.startswith(FDSET_PREFIX)


def file_name(path: str, fd: int) -> str:
    """How messages name the file `path` opened as `fd`: a passed fd (/dev/fdset/N) by
    the name the kernel knows its file by (/proc/self/fd), so that an error or a
    partial-restore mark names the file a person can find, not a set number that is gone
    once the client removes it; "/dev/fdset/N" itself where the fd has no path name
    (a pipe, an anonymous inode)."""
    if not is_fdset_path(path):
        return path
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return path
    return name if name.startswith("/") else path


# pwritev2's flag that writes at the offset even where the open file description has
# O_APPEND (Linux 6.9, uapi/linux/fs.h); the os module does not export it.
RWF_NOAPPEND = 0x20


class AppendingFd(FdError):
    """A positional write refused: the fd's description has O_APPEND."""


def pwrite_at(fd: int, data: memoryview, offset: int, *, vectored: bool = True) -> int:
    """One positional write of `data` at `offset` -> bytes written, even where the fd's
    open file description has O_APPEND, with which Linux's pwrite appends whatever the
    offset. A passed fd's description is shared with whoever passed it (the client, a VMM
    given the same memfd): migd clears O_APPEND when it takes a dup (dup_from_fdset), but
    any holder may set it again later, and a save then 'completed' with its pages appended
    past the layout, a restore with the memory unchanged (red-team, session 16).
    pwritev2(RWF_NOAPPEND) writes at the offset anyway; a kernel that refuses the flag, or
    `vectored=False` (metadata goes through plain pwrite, so that a trace tells it from
    page data), has O_APPEND refused instead: AppendingFd."""
    if vectored:
        try:
            return os.pwritev(fd, [data], offset, RWF_NOAPPEND)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
        raise AppendingFd(
            "it is open for appending (O_APPEND, set by another holder of its passed fd): "
            "a positional write would land at its end"
        )
    return os.pwritev(fd, [data], offset) if vectored else os.pwrite(fd, data, offset)


def parse_fdset_id(path: str) -> int:
    """The N of "/dev/fdset/N"; qemu_parse_fd's rules (decimal, 0..INT_MAX)."""
    text = path[len(FDSET_PREFIX) :]
    if _FD_NUMBER.fullmatch(text):
        value = int(text.strip(" \t\n\v\f\r"))
        if 0 <= value <= _INT_MAX:
            return value
    raise FdError(f"Could not parse fdset {path}")


class FdStore:
    """The daemon's passed fds, shared by every session of a uid as QEMU's fdsets are by
    monitors (a uid's: the module docstring; `uid` None is root's, migd's, the daemon's)."""

    def __init__(self, fallback: ChannelOpener) -> None:
        self._fallback = fallback
        self._lock = threading.Lock()
        self._named: dict[tuple[int | None, str], int] = {}  # (uid, name) -> fd
        self._sets: dict[int, list[FdsetFd]] = {}  # each list newest first, as QEMU's
        self._owners: dict[int, int | None] = {}  # set id -> the uid that made it
        self._dups: dict[int, int] = {}  # open dup fd -> the set it came from

    def _visible(self, fdset_id: int, uid: int | None) -> bool:
        """Set `fdset_id` exists for a client of `uid` (lock held): every set for root's
        and migd's (None), only its own uid's for another's."""
        return fdset_id in self._sets and (uid is None or self._owners.get(fdset_id) == uid)

    # -- getfd / closefd -------------------------------------------------------------

    def add_named(self, name: str, fd: int, uid: int | None = None) -> None:
        """Name fd (owned from now on, even on error) among `uid`'s names, replacing and
        closing a namesake of that uid's. `uid` not None: passed by a uid other than
        root's and migd's (capped: check_room_for_fds)."""
        if name and name[0] in string.digits:
            _close(fd)
            raise FdError("Parameter 'fdname' expects a name not starting with a digit")
        if (uid, name) not in self._named:  # replacing a namesake keeps the count
            _close_unless_room(fd, uid is not None)
        with self._lock:
            old = self._named.get((uid, name))
            self._named[(uid, name)] = fd
        if old is not None:
            _close(old)

    def close_named(self, name: str, uid: int | None = None) -> None:
        with self._lock:
            fd = self._named.pop((uid, name), None)
        if fd is None:
            raise FdError(f"File descriptor named '{name}' not found")
        _close(fd)

    # -- add-fd / remove-fd / query-fdsets -------------------------------------------

    def add_fd(
        self, fd: int, fdset_id: int | None, opaque: str | None, uid: int | None = None
    ) -> tuple[int, int]:
        """Put fd (owned from now on, even on error) in a set; -> (fdset id, fd). A set
        made here is `uid`'s; `uid` not None (a uid other than root's and migd's, capped:
        check_room_for_fds) adds only to its own."""
        _close_unless_room(fd, uid is not None)
        with self._lock:
            if fdset_id is None:
                fdset_id = 0
                while fdset_id in self._sets:  # the lowest free id, of every uid's
                    fdset_id += 1
            elif fdset_id < 0:
                _close(fd)
                raise FdError("Parameter 'fdset-id' expects a non-negative value")
            elif fdset_id in self._sets and not self._visible(fdset_id, uid):
                _close(fd)
                raise FdError(
                    f"Parameter 'fdset-id': fd set {fdset_id} is not one of uid {uid}'s: a "
                    "client of a uid other than root's and migd's adds fds only to its own "
                    "uid's sets (without 'fdset-id', a new set)"
                )
            if fdset_id not in self._sets:
                self._owners[fdset_id] = uid
            self._sets.setdefault(fdset_id, []).insert(0, FdsetFd(fd, opaque))
        return fdset_id, fd

    def entry(self, fdset_id: int, fd: int) -> FdsetFd | None:
        """The set's entry for fd, as add_fd just made it: what remove_entries takes."""
        with self._lock:
            return next((e for e in self._sets.get(fdset_id, []) if e.fd == fd), None)

    def remove_entries(self, fdset_id: int, entries: Collection[FdsetFd]) -> int:
        """Close those of `entries` (by identity: the client may have removed one and
        the kernel given its number to another's fd since) still in the set, as remove-fd
        does; -> how many were."""
        wanted = {id(e) for e in entries}
        return len(self._remove(fdset_id, lambda each: id(each) in wanted))

    def remove_fd(self, fdset_id: int, fd: int | None = None, uid: int | None = None) -> None:
        """Close one fd of a set `uid` sees, or all of them; an empty set disappears.
        Another uid's set is not found, as one that does not exist."""
        if not self._remove(fdset_id, lambda each: fd is None or each.fd == fd, uid):
            where = f"fdset-id:{fdset_id}" + ("" if fd is None else f", fd:{fd}")
            raise FdError(f"File descriptor named '{where}' not found")

    def _remove(
        self, fdset_id: int, goes: Callable[[FdsetFd], bool], uid: int | None = None
    ) -> list[FdsetFd]:
        """Take the entries `goes` picks out of the set, if `uid` sees it, and close their
        fds -> them."""
        with self._lock:
            gone: list[FdsetFd] = []
            kept: list[FdsetFd] = []
            visible = self._visible(fdset_id, uid)
            for each in self._sets.get(fdset_id, []) if visible else []:
                # One pass: `f not in gone` compared every fd with every other (dataclass
                # __eq__), and a set of 19,000 fds froze the daemon for 100 s (red-team,
                # session 14).
                (gone if goes(each) else kept).append(each)
            if gone:
                self._sets[fdset_id] = kept
                self._forget_if_unused(fdset_id)
        for f in gone:
            _close(f.fd)
        return gone

    def _forget_if_unused(self, fdset_id: int) -> None:
        """monitor_fdset_cleanup: a set with no fds and no open dups is gone (lock held)."""
        if not self._sets.get(fdset_id) and fdset_id not in self._dups.values():
            self._sets.pop(fdset_id, None)
            self._owners.pop(fdset_id, None)

    def close_dup(self, fd: int) -> None:
        """Close an fd that open_path or dup_from_fdset gave out (any other fd is just
        closed): the last dup of a removed set takes the set with it."""
        with self._lock:
            fdset_id = self._dups.pop(fd, None)
            if fdset_id is not None:
                self._forget_if_unused(fdset_id)
        _close(fd)

    def query(self, uid: int | None = None) -> list[tuple[int, list[FdsetFd]]]:
        """The sets `uid` sees, in QEMU's order: by descending id, each one's fds oldest
        first."""
        with self._lock:
            return [
                (fdset_id, list(reversed(self._sets[fdset_id])))
                for fdset_id in sorted(self._sets, reverse=True)
                if self._visible(fdset_id, uid)
            ]

    # -- opening ---------------------------------------------------------------------

    def open_path(self, path: str, flags: int, direct: bool, uid: int | None = None) -> int:
        """The migration engine's opener: /dev/fdset/N from the store (a set `uid` sees),
        anything else opened."""
        if is_fdset_path(path):
            return self.dup_from_fdset(path, flags | (_O_DIRECT if direct else 0), uid)
        return self._fallback(path, flags, direct)

    def dup_from_fdset(self, path: str, flags: int, uid: int | None = None) -> int:
        """monitor_fdset_dup_fd_add: a close-on-exec dup of the newest matching fd of the set,
        one `uid` sees (another uid's set is not found, as one that does not exist).

        Only the access mode and O_DIRECT decide; O_CREAT and the like are ignored. O_DIRECT
        belongs to the open file description, so a dup of the same fd never matches both
        a direct and a buffered open: such a set fails with the matching-flags error.
        """
        fdset_id = parse_fdset_id(path)
        wanted = (flags & os.O_ACCMODE) | (flags & _O_DIRECT)
        with self._lock:
            fds = self._sets.get(fdset_id) if self._visible(fdset_id, uid) else None
            if fds is None:
                raise FdError(f"Failed to find fdset /dev/fdset/{fdset_id}")
            chosen = None
            for entry in fds:
                try:
                    fd_flags = fcntl.fcntl(entry.fd, fcntl.F_GETFL)
                except OSError:
                    raise FdError(f"Failed to read file status flags for fd={entry.fd}") from None
                if fd_flags & (os.O_ACCMODE | _O_DIRECT) == wanted:
                    chosen = entry.fd
                    break
            if chosen is None:
                raise FdError(f"Failed to find file descriptor with matching flags=0x{flags:x}")
            try:
                dup = fcntl.fcntl(chosen, fcntl.F_DUPFD_CLOEXEC, 0)
            except OSError:
                raise FdError(f"Failed to dup() given file descriptor fd={chosen}") from None
            self._dups[dup] = fdset_id
        try:
            # As qemu_dup_flags: refuse a sync mismatch, and reset O_APPEND/O_NONBLOCK/...
            # on the description so positional writes land where the layout says.
            if (flags & _O_SYNC) != (fcntl.fcntl(dup, fcntl.F_GETFL) & _O_SYNC):
                raise OSError("O_SYNC differs")
            fcntl.fcntl(dup, fcntl.F_SETFL, flags)
        except OSError:
            self.close_dup(dup)
            raise FdError(f"Failed to dup() given file descriptor fd={chosen}") from None
        return dup

    # -- shutdown --------------------------------------------------------------------

    def close_all(self) -> None:
        """Close every named fd and every fd of every set (at daemon stop)."""
        with self._lock:
            named, self._named = list(self._named.values()), {}
            sets, self._sets = list(self._sets.values()), {}
            self._owners = {}
            self._dups = {}  # their holders close them (the job and the backends stop first)
        for fd in named:
            _close(fd)
        for fds in sets:
            for entry in fds:
                _close(entry.fd)
