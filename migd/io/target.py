"""The target seam: where a job's stream goes or comes from, and the fds it opens there.

A `Target` is parsed from the job's address (TARGETS maps a URI scheme to its parser;
QAPI `channels` are resolved by the api layer) and then opens, for one job, its main fd
and one fd per multifd channel, closes what it opened, and on a start that fails after
all removes a file it created. The daemon's policies for opening reach it as `Openers`.

`FileTarget` is the one target: `file:PATH[,offset=N]`, a named file (under the
allowed-dirs policy and paths.open_regular's rules) or a passed fdset (/dev/fdset/N).
The other transports QEMU knows cannot carry a mapped-ram stream (NotSeekable); a new
target (a socket, say) is its module plus one TARGETS entry.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import ChannelError, MigrationError
from ..state.fdsets import file_name, is_fdset_path
from ..state.overlay import on_overlayfs
from ..state.paths import (
    ChannelOpener,
    FileOpener,
    hold_for_job,
    not_regular,
    open_regular,
    plain_open,
    remove_created,
    reopen,
    reopen_for_locks,
    settle_claim,
    sync_directory_of,
    trusted_owners,
)

_OTHER_TRANSPORTS = ("unix", "tcp", "fd", "exec", "rdma", "vsock")
# qemu_strtosz's syntax: decimal, optionally with a fraction, then a binary suffix; or hex.
_DECIMAL_SIZE = re.compile(r"\s*\+?(?P<int>[0-9]*)(?P<frac>\.[0-9]*)?(?P<suffix>[bkmgtpe]?)", re.I)
_HEX_SIZE = re.compile(r"\s*\+?0[xX](?P<hex>[0-9a-fA-F]+)")
_SIZE_SUFFIXES = "bkmgtpe"
# QEMU's file URI option: the first ",offset=" (strstr); every other comma is in the name.
_OFFSET_OPTION = ",offset="


def _open_error(path: str, exc: OSError, verb: str = "open") -> ChannelError:
    """QEMU's texts: qemu_create's "Could not create" for a save's file (O_CREAT),
    qemu_open's "Could not open" for a restore's and for a channel's second open."""
    return ChannelError(f"Could not {verb} '{path}': {os.strerror(exc.errno or errno.EIO)}")


def open_channel_fd(path: str, flags: int, direct: bool, open_file: FileOpener = plain_open) -> int:
    """Open one channel's own fd; EINVAL with O_DIRECT means the filesystem refuses it."""
    try:
        return open_file(path, flags | (os.O_DIRECT if direct else 0), 0o600)
    except OSError as exc:
        if direct and exc.errno == errno.EINVAL:
            raise ChannelError(
                f"Could not open '{path}': filesystem does not support O_DIRECT"
            ) from None
        raise _open_error(path, exc) from None


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


@dataclass(frozen=True)
class Openers:
    """The daemon's policies for the fds a target opens (the defaults: no policy)."""

    fdset: ChannelOpener = open_channel_fd  # /dev/fdset/N: dups from the set, matched by flags
    named: FileOpener = plain_open  # named files (the allowed-dirs policy's open)
    close: Callable[[int], None] = close_quietly  # closes what these opened (fdset dups tracked)


class Target(Protocol):
    """One job's end of the stream. Its open and close methods block: call them off the
    event loop. A target serves one job: open_main first, close (or discard) last."""

    path: str  # the address the client gave (query-migrate, the job's x-file)
    offset: int  # where the stream starts in it

    @property
    def name(self) -> str:
        """The file as every error text, log line and partial-restore mark names it."""
        ...

    def open_main(self, openers: Openers, direction: str, peer_uid: int | None) -> int:
        """The main fd: "save" opens for writing (creating what is missing), "live" for
        reading and writing (creating), "update" an existing file for reading and
        writing, "restore" for reading. `peer_uid` is
        the client's uid (an existing file it owns is trusted)."""
        ...

    def open_channels(self, count: int, direct: bool) -> list[int]:
        """`count` more fds on the main fd's stream, O_DIRECT if `direct`; all or none."""
        ...

    def close_channels(self) -> None:
        """Close the channel fds (the main fd stays open)."""
        ...

    def refuse_shared(self) -> None:
        """Before a save starts: refuse an existing named file that group or others may
        read or write (guest RAM would go into it)."""
        ...

    def hold(self, writes: bool) -> bool | None:
        """Hold the file for the job until close (state/paths.hold_for_job) -> True, False
        if another job (of any process) holds it in conflict, None if nothing is known."""
        ...

    def close(self) -> None:
        """Close every fd this target opened."""
        ...

    def discard(self) -> None:
        """A start refused after the main fd opened: remove what open_main created, close."""
        ...

    def settle(self) -> None:
        """The job launched: a file open_main created is no longer one it may remove
        (state/paths.settle_claim), and other requests may open it."""
        ...

    def sync_name(self) -> None:
        """A file open_main created: make its name durable (its directory synced)."""
        ...


def _refuse_stream(path: str, fd: int, openers: Openers) -> None:
    """A passed pipe or socket has no offsets: a mapped-ram file puts every page at its
    own. Refused at once, naming it (a save through a pipe failed only later, with "Could
    not truncate ... Invalid argument"; red-team, session 16)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        openers.close(fd)
        raise not_regular(path, mode)


def _reopener(main_fd: int) -> FileOpener:
    """An open_file that reopens the main fd's file, whatever its name is now."""

    def reopen_main(_path: str, flags: int, mode: int) -> int:
        return reopen(main_fd, flags)

    return reopen_main


@dataclass
class FileTarget:
    """A save or restore file: a path (or /dev/fdset/N) and the stream's offset in it."""

    path: str
    offset: int = 0
    # What this target opened, for its job (none of it is part of the address).
    _openers: Openers = field(default_factory=Openers, init=False, repr=False, compare=False)
    _flags: int = field(default=0, init=False, repr=False, compare=False)
    _main_fd: int | None = field(default=None, init=False, repr=False, compare=False)
    _created: bool = field(default=False, init=False, repr=False, compare=False)
    _name: str | None = field(default=None, init=False, repr=False, compare=False)
    _channel_fds: list[int] = field(default_factory=list, init=False, repr=False, compare=False)
    _hold_fd: int | None = field(default=None, init=False, repr=False, compare=False)

    def __str__(self) -> str:
        return f"file:{self.path},offset={self.offset}" if self.offset else f"file:{self.path}"

    @property
    def name(self) -> str:
        """The file as messages and partial-restore marks name it: the path, or for a
        passed fd (/dev/fdset/N) the name of the file it is (state/fdsets.file_name)."""
        return self._name or self.path

    @classmethod
    def parse(cls, rest: str) -> FileTarget:
        """What follows `file:` in `file:PATH[,offset=N]`, split as QEMU's
        file_parse_offset splits it: a path may hold commas ("file:/vms/a,b.sav")."""
        path, option, value = rest.partition(_OFFSET_OPTION)
        offset = parse_offset(value) if option else 0
        if not path:
            raise MigrationError("file URI has no path")
        return cls(path, offset)

    def open_main(self, openers: Openers, direction: str, peer_uid: int | None) -> int:
        """A passed fd (/dev/fdset/N) is a dup from its set; a named file must pass
        paths.open_regular's rules (a save creates a missing file)."""
        # A live save reads its pages back, an update reads the save it updates first.
        create = direction in ("save", "live")
        flags = {"save": os.O_WRONLY, "live": os.O_RDWR, "update": os.O_RDWR}.get(
            direction, os.O_RDONLY
        )
        if is_fdset_path(self.path):
            # O_CREAT only for QEMU's matching-flags text: a set's fds are never created.
            fd = openers.fdset(self.path, flags | (os.O_CREAT if create else 0), False)
            created = False
            _refuse_stream(self.path, fd, openers)
        else:
            try:
                fd, created = open_regular(
                    self.path,
                    # Read-write even for a save: the claim on the file that tells other
                    # requests it is in use (paths.open_regular) is a read lock, which
                    # needs an fd open for reading. The channels still open write-only.
                    os.O_RDWR if flags == os.O_WRONLY else flags,
                    create=create,
                    owners=trusted_owners(peer_uid),
                    open_file=openers.named,
                )
            except OSError as exc:
                raise _open_error(self.path, exc, "create" if create else "open") from None
        self._openers, self._flags, self._main_fd, self._created = openers, flags, fd, created
        self._name = file_name(self.path, fd)
        return fd

    def open_channels(self, count: int, direct: bool) -> list[int]:
        """Every channel fd is the main fd's file: a named file is reopened through
        /proc/self/fd/N of the main fd, never by its name again (a name replaced
        meanwhile would mix pages of two files). A passed fdset gives dups matched by
        flags, as QEMU's; they must be the main fd's file too.
        """
        main_fd, path = self._main_fd, self.path
        assert main_fd is not None, "open_main first"
        if is_fdset_path(path):
            opener = self._openers.fdset
        else:
            opener = functools.partial(open_channel_fd, open_file=_reopener(main_fd))
        main = os.fstat(main_fd)
        fds: list[int] = []
        try:
            for _ in range(count):
                fd = opener(path, self._flags, direct)
                fds.append(fd)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (main.st_dev, main.st_ino):
                    raise ChannelError(
                        f"'{self.name}': a channel's fd is not the file the migration opened "
                        "(the fdset holds fds of different files)"
                    )
        except BaseException:
            for fd in fds:
                self._openers.close(fd)
            raise
        self._channel_fds = fds
        return list(fds)

    def refuse_shared(self) -> None:
        """An existing file the client named that others may read (it may be its own,
        0644) would hand them the guest RAM saved into it. Making it 0600 first is not
        enough: an fd opened before the chmod keeps reading (red-team, session 13: a
        `nobody` holding the old file open read the whole save). So it is refused, and
        the client removes it (migd then creates the file 0600, O_EXCL) or passes an fd.
        A passed fd is the client's to protect."""
        fd = self._main_fd
        if fd is None or self._created or is_fdset_path(self.path):
            return
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            raise MigrationError(
                f"'{self.path}' may be read or written by group or others (mode {mode:04o}): "
                "a save would put guest RAM where they can read it, and a chmod would not "
                "stop a reader that opened it before; remove the file (migd creates it "
                "0600) or save to another name"
            )

    def hold(self, writes: bool) -> bool | None:
        """Through the main fd where this target opened the file itself (the lock goes
        with it); a passed fd's file through an open of its own, closed with the target:
        the dup of a passed fd shares its open file description with the fd the fdset
        keeps after the job, and a lock taken through it outlived the job (and refused
        the next job on the file)."""
        main_fd = self._main_fd
        assert main_fd is not None, "open_main first"
        # On overlayfs, through its layer's file: a lock on the overlay's inode never
        # meets one another process's job takes by the layer's name (paths.reopen_for_locks).
        if not is_fdset_path(self.path) and not on_overlayfs(main_fd):
            return hold_for_job(main_fd, writes)
        try:
            self._hold_fd = reopen_for_locks(main_fd, os.O_WRONLY if writes else os.O_RDONLY)
        except OSError:
            return None  # nothing known, as where the filesystem has no such locks
        return hold_for_job(self._hold_fd, writes)

    def close_channels(self) -> None:
        channel_fds, self._channel_fds = self._channel_fds, []
        for channel_fd in channel_fds:
            self._openers.close(channel_fd)

    def close(self) -> None:
        self.close_channels()
        if self._hold_fd is not None:
            hold_fd, self._hold_fd = self._hold_fd, None
            close_quietly(hold_fd)
        if self._main_fd is not None:
            main_fd, self._main_fd = self._main_fd, None
            self._openers.close(main_fd)

    def discard(self) -> None:
        if self._created and self._main_fd is not None:
            remove_created(self.path, self._main_fd)
        self.close()

    def settle(self) -> None:
        if self._created and self._main_fd is not None:
            settle_claim(self._main_fd)

    def sync_name(self) -> None:
        """fdatasync makes a file's data durable, not the directory entry that names it
        (POSIX: fsync the directory). A save that created its file syncs its directory
        before it says `completed`, or a power cut could lose the whole save, name and
        all (red-team, session 16). A passed fd's file, or one that existed, is named
        already."""
        if not self._created or is_fdset_path(self.path):
            return
        try:
            sync_directory_of(self.path)
        except OSError as exc:
            raise ChannelError(
                f"Could not sync the directory of '{self.path}': "
                f"{os.strerror(exc.errno or errno.EIO)}"
            ) from None


class NotSeekable(MigrationError):
    """A transport other than file: was asked for a mapped-ram migration."""


def parse_offset(text: str) -> int:
    """A size as QEMU's qemu_strtosz reads a file URI's offset ("4096", "0x1000", "4k",
    "1.5M"), with its errors: EINVAL for what it cannot read, ERANGE for a negative
    number or one of 2^64 or more."""
    value = _strtosz(text)
    if value is None or not 0 <= value < 1 << 64:
        reason = "Numerical result out of range" if value is not None else "Invalid argument"
        raise MigrationError(f"file URI has bad offset {text}: {reason}")
    return value


def _strtosz(text: str) -> int | None:
    """The value (possibly >= 2^64, or -1 for a negative number) or None if unreadable."""
    if text.lstrip().startswith("-"):
        return -1 if _strtosz(text.lstrip()[1:]) is not None else None
    hexa = _HEX_SIZE.fullmatch(text)
    if hexa:  # QEMU: hex takes no fraction and no suffix
        return int(hexa["hex"], 16)
    dec = _DECIMAL_SIZE.fullmatch(text)
    if not dec or not (dec["int"] or (dec["frac"] or "")[1:]):
        return None
    mul = 1 << 10 * _SIZE_SUFFIXES.index(dec["suffix"].lower()) if dec["suffix"] else 1
    if dec["frac"] and dec["frac"] != "." and mul == 1:
        return None  # "a fraction needs a scale"
    whole = int(dec["int"] or "0") * mul
    frac = dec["frac"][1:] if dec["frac"] else ""
    if not frac:
        return whole
    scaled = int(frac) * mul
    # QEMU rounds the fraction's bytes half up.
    return whole + (2 * scaled + 10 ** len(frac)) // (2 * 10 ** len(frac))


# URI scheme -> the target's parser, given what follows "scheme:".
TARGETS: dict[str, Callable[[str], Target]] = {
    "file": FileTarget.parse,
}


def parse_uri(uri: str) -> Target:
    """Split a migration URI; only a scheme in TARGETS can carry a mapped-ram stream."""
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise MigrationError(f"unknown migration protocol: {uri}")
    parse = TARGETS.get(scheme)
    if parse is not None:
        return parse(rest)
    if scheme in _OTHER_TRANSPORTS:
        # QEMU parses the address before it asks whether the transport can seek.
        _check_address(scheme, rest)
        raise NotSeekable("Migration requires seekable transport (e.g. file)")
    raise MigrationError(f"unknown migration protocol: {uri}")


# QEMU's sscanf patterns of util/qemu-sockets.c: inet_parse's three address forms (no
# host, [IPv6], host or IPv4) and vsock_parse's cid:port, each matched as a prefix.
_INET_PORT_ONLY = re.compile(r":[^,]{1,32}")
_INET_IPV6 = re.compile(r"\[[^\]]{1,64}\]:[^,]{1,32}")
_INET_HOST = re.compile(r"[^:]{1,64}:[^,]{1,32}")
_INET_TO = re.compile(r"\s*[+-]?[0-9]+")
_VSOCK = re.compile(r"[^:]{1,32}:[^,]{1,32}")


def _check_address(scheme: str, address: str) -> None:
    """QEMU's socket_parse and inet_parse errors for the address of a transport migd does
    not carry, so that a malformed URI is named as QEMU names it."""
    if scheme == "unix" and not address:
        raise MigrationError("invalid Unix socket address")
    if scheme == "fd" and not address:
        raise MigrationError("invalid file descriptor address")
    if scheme == "vsock":
        match = _VSOCK.match(address)
        if match is None:
            raise MigrationError(f"error parsing address '{address}'")
        if match.end() != len(address):
            raise MigrationError(f"trailing characters in address '{address}'")
    if scheme in ("tcp", "rdma"):
        _check_inet(address)


def _check_inet(address: str) -> None:
    if address.startswith(":"):
        form, what = _INET_PORT_ONLY, "port in address"
    elif address.startswith("["):
        form, what = _INET_IPV6, "IPv6 address"
    else:
        form, what = _INET_HOST, "address"
    match = form.match(address)
    if match is None:
        raise MigrationError(f"error parsing {what} '{address}'")
    options = address[match.end() :]
    _, to, value = options.partition(",to=")
    if to:
        number = _INET_TO.match(value)
        if number is None or value[number.end() : number.end() + 1] not in ("", ","):
            raise MigrationError("error parsing to= argument")
    for flag in _INET_FLAGS:
        _, found, value = options.partition(f",{flag}")
        if found:
            _check_flag(flag, value)


_INET_FLAGS = ("ipv4", "ipv6", "keep-alive", "mptcp")


def _check_flag(flag: str, value: str) -> None:
    """inet_parse_flag: what follows the first ',FLAG' up to a comma is '', '=on' or '=off'
    (and ',,' after it is refused)."""
    own, comma, rest = value.partition(",")
    if (comma and rest.startswith(",")) or own not in ("", "=on", "=off"):
        raise MigrationError(f"error parsing '{flag}' flag '{value}'")
