"""Which files a client may make migd open: the allowed-directories policy, and the
rules every save file, restore file and mem-path must pass (`open_regular`).

Access to the socket is control of migd, and migd usually runs as root. With
`allowed-dirs` configured, save files and mem-paths must resolve (symlinks followed)
inside one of them, and the open itself cannot be redirected by a symlink swapped in
after the check: the parent directory is opened first and verified through its fd, and
the final component is opened relative to it with O_NOFOLLOW.

Whatever the policy, `open_regular` first walks the name (`resolve_trusted`): it follows
a symbolic link only if migd's uid or the client's owns it, and goes only through
directories no other local user can change (owned by one of those uids, and writable by
group or others only with the sticky bit, as /tmp and /dev/shm), so that no other user
can redirect the name, and what it names is known before it is opened: anything but a
regular file is refused unopened (a device's open() alone can act). It then opens the
resolved name with O_NOFOLLOW and without blocking (O_NONBLOCK: a FIFO swapped in would
block open() until its other end opens), refuses anything but a regular file, creates a
missing file with O_EXCL and mode 0600, and uses an existing one only if no other local
user could have planted it or could still change it: owned by migd's uid or the
client's, not writable by group or others, one link. fd-passed files (/dev/fdset/N)
never come here: the client already holds them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable, Collection, Sequence

from ..errors import MigdError
from .overlay import fs_type_at, layer_file

log = logging.getLogger(__name__)

MAX_SOCKET_PATH_BYTES = 107  # a UNIX socket's sun_path: 108 bytes, the last one its NUL

FileOpener = Callable[[str, int, int], int]
"""open(path, flags, mode) -> fd, raising OSError like os.open."""

ChannelOpener = Callable[[str, int, bool], int]
"""open(path, flags, direct) -> fd; raises a MigdError whose text names the file
(migd.io.target.open_channel_fd is the one the daemon uses)."""


class PathNotAllowed(MigdError):
    """A path lies outside the configured allowed directories."""


class FileRefused(MigdError):
    """A file migd was asked to use breaks a rule of `open_regular`."""


def plain_open(path: str, flags: int, mode: int = 0o600) -> int:
    return os.open(path, flags | os.O_CLOEXEC, mode)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


class PathPolicy:
    def __init__(self, allowed_dirs: Sequence[str] = ()) -> None:
        # Resolved once: an allowed directory that is itself a symlink means its target.
        self.allowed = [os.path.realpath(d) for d in allowed_dirs]

    @property
    def restricted(self) -> bool:
        return bool(self.allowed)

    def _refuse(self, path: str) -> PathNotAllowed:
        return PathNotAllowed(
            f"'{path}' is outside the allowed directories ({', '.join(self.allowed)})"
        )

    def _allowed(self, real: str) -> bool:
        return any(_inside(real, d) for d in self.allowed)

    def check(self, path: str) -> None:
        """Refuse a path whose resolved location is outside every allowed directory."""
        if self.restricted and not self._allowed(os.path.realpath(path)):
            raise self._refuse(path)

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        """os.open, confined to the allowed directories when there are any."""
        if not self.restricted:
            return plain_open(path, flags, mode)
        parent, name = os.path.split(os.path.abspath(path))
        if name in ("", ".", ".."):
            raise self._refuse(path)
        real_parent = os.path.realpath(parent)
        if not self._allowed(os.path.join(real_parent, name)):
            raise self._refuse(path)
        dir_fd = os.open(real_parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # The directory we hold must still be inside: a component swapped for a
            # symlink between realpath() and open() shows up here.
            held = os.readlink(f"/proc/self/fd/{dir_fd}")
            if not self._allowed(os.path.join(held, name)):
                raise self._refuse(path)
            try:
                return os.open(name, flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise PathNotAllowed(
                        f"'{path}' is a symbolic link: with allowed-dirs set, migd opens "
                        "only real files"
                    ) from None
                raise
        finally:
            os.close(dir_fd)


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


def trusted_owners(peer_uid: int | None = None) -> frozenset[int]:
    """The uids that may own an existing file migd uses for a client.

    For root, migd's own uid or no client (the configuration): migd's uid and the
    client's. For a client of any other uid: that uid alone. Files of migd's own uid are
    every instance's (every migd runs as root): a client another VM's instance let in
    could name that VM's memory file in /dev/shm and save its guest RAM into a file of
    its own (red-team, session 14). So the files migd creates for such a client are
    given to it (open_regular), and are its own to use again.
    """
    own = os.geteuid()
    if peer_uid is None or is_root_or_migd(peer_uid):
        return frozenset({own} | ({peer_uid} if peer_uid is not None else set()))
    return frozenset({peer_uid})


def is_root_or_migd(uid: int | None) -> bool:
    """A uid that is root's or migd's own: its clients are the management's (the QMP
    server keeps reserves for them), its files every instance's (trusted_owners)."""
    return uid in (0, os.geteuid())


def sync_directory_of(path: str) -> None:
    """fsync the directory that holds `path`: a new or renamed name is durable only once
    its directory is (fdatasync of the file keeps its data, not its name)."""
    parent = os.path.dirname(os.path.abspath(path))
    dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def refuse_directory_name(path: str) -> None:
    """`DIR/new/` names a directory: opening it with O_CREAT (or after abspath) would make
    a file `new`, which is not what the name says."""
    if path.endswith("/"):
        raise FileRefused(f"'{path}' ends with '/': it names a directory, not a file")


def kind_of(mode: int) -> str | None:
    """What a file that is not regular is, for an error: "a FIFO", "a directory", ..."""
    return _KINDS.get(stat.S_IFMT(mode))


def not_regular(path: str, mode: int | None = None) -> FileRefused:
    kind = kind_of(mode) if mode is not None else None
    return FileRefused(f"'{path}' is not a regular file" + (f" (it is {kind})" if kind else ""))


def check_regular(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, st.st_mode)


def check_trusted(path: str, st: os.stat_result, owners: Collection[int]) -> None:
    """Refuse an existing file another local user could have planted or can change.

    Such a user could read the guest RAM a save writes into it, or write into a backend
    through a mapped file or a file a restore reads; a hard link would let them reach,
    through an allowed directory, a file of someone else's outside it.
    """
    if st.st_uid not in owners:
        if os.geteuid() in owners:
            who = " or ".join(str(uid) for uid in sorted(owners))
            rule = f"belongs to migd's or the client's uid ({who})"
        else:
            (uid,) = owners
            rule = (
                f"belongs to the client's uid ({uid}); files of migd's uid serve only its "
                "own and root's clients (they may be another VM's)"
            )
        raise FileRefused(
            f"'{path}' is owned by uid {st.st_uid}: migd uses an existing file only if it "
            + rule
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise FileRefused(
            f"'{path}' is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
            "migd uses an existing file only if no other user can write it"
        )
    if st.st_nlink != 1:
        raise FileRefused(
            f"'{path}' has {st.st_nlink} hard links: migd uses an existing file only if it "
            "has exactly one"
        )


# Kernel interfaces that look like regular files (f_type of statfs): writing guest RAM
# into /proc/sys/... or /sys/... as root would change the kernel's settings.
_PSEUDO_FILESYSTEMS = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0xDE5E81E4: "efivarfs",
    0x6E736673: "nsfs",
}


def refuse_pseudo_filesystem(path: str, real: str) -> None:
    """Refuse a file of a kernel pseudo-filesystem (proc, sysfs, ...): a regular file to
    stat(), a kernel setting or interface to write."""
    f_type = fs_type_at(real)
    if f_type is None:
        return  # the open reports what is wrong with the name
    name = _PSEUDO_FILESYSTEMS.get(f_type)
    if name is not None:
        raise FileRefused(
            f"'{path}' is on {name}, a kernel pseudo-filesystem: not a file migd saves to, "
            "restores from or maps"
        )


MAX_LINKS = 40  # symbolic links followed in one name, as the kernel's ELOOP limit


def _who(owners: Collection[int]) -> str:
    return " or ".join(str(uid) for uid in sorted(owners))


def _check_directory(
    path: str, directory: str, st: os.stat_result, owners: Collection[int]
) -> None:
    """A directory on the way to a file: no other local user may be able to change its
    entries (swap the file for a link, between migd's checks and its open)."""
    if st.st_uid not in owners:
        raise FileRefused(
            f"'{path}' lies in '{directory}', owned by uid {st.st_uid}: migd opens files only "
            f"through directories of migd's or the client's uid ({_who(owners)})"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise FileRefused(
            f"'{path}' lies in '{directory}', writable by group or others without the sticky "
            f"bit (mode {stat.S_IMODE(st.st_mode):04o}): another user could swap the file"
        )


_PROC_MAGIC = 0x9FA0


def _refuse_magic_link(path: str, there: str, here: str, target: str) -> None:
    """A link of /proc whose text is a file's name (/proc/PID/root, cwd, exe, fd/N,
    map_files/...): the kernel follows it into that process's own view of the files (its
    mount namespace, a removed file, an fd), which the text does not name. Followed by
    its text, a backend on /proc/PID/root/dev/shm/ram (a containerized VM's RAM) mapped
    migd's own /dev/shm/ram, and its save `completed` with other memory (red-team, round
    10b). Ordinary links of /proc (self, thread-self, mounts: a name inside /proc, no
    '/' first and no ':') are followed."""
    if not target.startswith("/") and ":" not in target:
        return
    if fs_type_at(here) != _PROC_MAGIC:
        return
    where = "is" if there == os.path.abspath(path) else f"goes through '{there}',"
    raise FileRefused(
        f"'{path}' {where} a magic link of /proc: the kernel follows it into a process's "
        "own view of the files, which its text does not name; name the file itself, or "
        "pass it as an fd (add-fd)"
    )


def resolve_trusted(path: str, owners: Collection[int]) -> tuple[str, os.stat_result | None]:
    """The name `path` resolves to, with no symbolic link left in it, and what is there
    (lstat; None: nothing, or a directory on the way is missing: the open says which).

    Every symbolic link on the way must belong to migd's or the client's uid: another
    user's link would make root write guest RAM into (or map as RAM) a file of root's
    that user cannot touch himself. Every directory on the way must be one no other user
    can change (_check_directory), so that the name still resolves the same when it is
    opened; a link swapped in at the last component meanwhile fails the O_NOFOLLOW open.
    """
    # Links and directories of root's or migd's own may lead the way for any client (root
    # could change anything anyway); only the file itself must be the client's
    # (trusted_owners: a file of migd's uid may be another VM's memory).
    owners = frozenset(owners) | {0, os.geteuid()}
    parts = [p for p in path.split("/") if p not in ("", ".")]
    parts.reverse()  # a stack: the next component last
    here = "/" if path.startswith("/") else os.getcwd()
    links = 0
    while parts:
        name = parts.pop()
        if name == "..":
            here = os.path.dirname(here) or "/"
            continue
        there = os.path.join(here, name)
        try:
            st = os.lstat(there)
        except OSError:
            # Missing (a new file, or a directory on the way: the open reports it).
            return os.path.join(there, *reversed(parts)), None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise FileRefused(f"'{path}': too many levels of symbolic links")
            if st.st_uid not in owners:
                where = "is" if there == os.path.abspath(path) else f"goes through '{there}',"
                raise FileRefused(
                    f"'{path}' {where} a symbolic link owned by uid {st.st_uid}: migd "
                    f"follows only links of migd's or the client's uid ({_who(owners)})"
                )
            target = os.readlink(there)
            _refuse_magic_link(path, there, here, target)
            if target.startswith("/"):
                here = "/"
            parts.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
            continue
        if parts:
            if not stat.S_ISDIR(st.st_mode):
                return os.path.join(there, *reversed(parts)), None  # ENOTDIR at the open
            _check_directory(path, there, st, owners)
        elif stat.S_ISDIR(st.st_mode):
            return there, st
        else:
            _check_directory(path, here, os.stat(here), owners)
            return there, st
        here = there
    return here, os.stat(here)


# Which request may remove a file it created, when it is refused after all. Two
# requests naming one new file: A creates it, B opens it (it exists now) and starts, A is
# refused and removes "its" file: B then completed into a file with no name (red-team,
# session 15). So each request takes an open-file-description lock on one byte far past
# any data, which no other program locks: the creator a write lock, held until its job or
# backend is in place (then `settle_claim` makes it a read lock) or it removed the file;
# every request that opens an existing file a read lock, held while it has the file open.
# B cannot get its lock while A may still remove the file, and is refused; A cannot get
# its lock if B already has one, and then leaves the file to B. The kernel drops a lock
# with the last fd of its open: nothing to clean up, and nothing to wait for or scan.
_CLAIM_BYTE = 1 << 62
EXTEND_BYTE = _CLAIM_BYTE + 1  # state/memory.py's lock for sizing a memory file
VM_BYTE = _CLAIM_BYTE + 2  # tools/vm.py's: one `migd vm` save or restore of a VM at once
# A running job's hold on its file (migration/engine.py), from its open to its end: a
# save's a write lock, a restore's a read lock. The engine refuses a second job on one
# file by device and inode, but it knows only its own jobs: two migd processes (the shared
# daemon and an instance, two instances) saving into one file both `completed`, and the
# buffered one, whose checksums are read back from its file, recorded the other's pages
# as its own: a file that `migd verify` passed and that restored the other VM's memory
# (red-team, session 17). Memory backends' files are held the same way while a job uses
# them (a restore writes them, a save reads them): two migd processes restoring into one
# memory file both `completed` with the memory a mix of the two saves.
JOB_BYTE = _CLAIM_BYTE + 3
# A memory backend's read lock for as long as it maps its file (state/memory.py): a save
# of another migd process into that file is refused, as the engine refuses one into a
# backend's file of its own. Before, it truncated and overwrote the other daemon's guest
# RAM, which that daemon then saved as `completed` (red-team, session 17).
MAPPED_BYTE = _CLAIM_BYTE + 4
_FLOCK = "hhqqi4x"  # struct flock: type, whence, start, len, pid (x86-64 and aarch64)


def ofd_lock(fd: int, kind: int, byte: int) -> bool | None:
    """Take, change or drop (fcntl.F_WRLCK / F_RDLCK / F_UNLCK) an open-file-description
    lock on one `byte` of fd's file, never waiting -> True, False if another open file
    description holds a conflicting one (another request of this process too: OFD locks,
    unlike POSIX ones, are not shared by a process's fds), None where the filesystem has
    no such locks."""
    request = struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None
    return True


def reopen_for_locks(fd: int, flags: int) -> int:
    """fd's file opened again (reopen) for a job's hold: an OFD lock, which another migd
    process's job must see. Through overlayfs a lock is the overlay inode's, and another
    process's job on the file by its layer's name locks the layer's inode: the two never
    met (red-team, round 10b: two daemons' restore and save of one memory file both ran).
    So a file on overlayfs is opened through its layer's name, if that is still the same
    file (pinned O_PATH, no link followed, checked by device and inode); else as reopen."""
    opened = layer_file(fd, flags)
    return opened if opened is not None else reopen(fd, flags)


def _conflicts_through_layer(fd: int, kind: int, byte: int) -> bool:
    """_conflicts for fd's layer's file, on overlayfs (another process's lock by the
    layer's name is on the layer's inode, not the overlay's)."""
    layer = layer_file(fd, os.O_RDONLY)
    if layer is None:
        return False
    try:
        return _conflicts(layer, kind, byte)
    finally:
        os.close(layer)


def reopen(fd: int, flags: int) -> int:
    """fd's file opened again through its /proc/self/fd magic link: the very file,
    whatever its name is now, in a new open file description of its own (OFD locks taken
    through it are its own: not shared with fd's, nor dropped by another close of fd's)."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def hold_for_job(fd: int, writes: bool) -> bool | None:
    """A job's hold on its file (JOB_BYTE): a writer's excludes every other job's, a
    reader's only a writer's -> True, False if another open file description (another
    process's job, or a job of this process) holds a conflicting one, None where the
    filesystem has no such locks. The kernel drops it with the job's last fd."""
    return ofd_lock(fd, fcntl.F_WRLCK if writes else fcntl.F_RDLCK, JOB_BYTE)


def written_by_a_job(fd: int) -> bool:
    """Does a job (of any migd process) hold fd's file for writing now (a save, an
    update)? Asked without taking anything (F_OFD_GETLK), so that a reader such as
    `migd verify` never keeps a save out."""
    return _conflicts(fd, fcntl.F_RDLCK, JOB_BYTE) or _conflicts_through_layer(
        fd, fcntl.F_RDLCK, JOB_BYTE
    )


def _conflicts(fd: int, kind: int, byte: int) -> bool:
    """Would a lock `kind` on `byte` conflict with another open file description's?
    Asked without taking anything (F_OFD_GETLK); False where there are no such locks."""
    request = struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, request)
    except OSError:
        return False
    return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK


def hold_as_memory(fd: int, held: bool = True) -> None:
    """A memory backend's mark on its file while it maps it (MAPPED_BYTE), or its end."""
    ofd_lock(fd, fcntl.F_RDLCK if held else fcntl.F_UNLCK, MAPPED_BYTE)


def mapped_as_memory(fd: int) -> bool:
    """Does another open of fd's file (another migd's memory backend) map it as memory?"""
    return _conflicts(fd, fcntl.F_WRLCK, MAPPED_BYTE) or _conflicts_through_layer(
        fd, fcntl.F_WRLCK, MAPPED_BYTE
    )


def _claim(fd: int, kind: int) -> bool | None:
    """Take (or change to) the claim lock `kind` (fcntl.F_WRLCK / F_RDLCK) on `fd` ->
    True, False if another request holds a conflicting one, None where the filesystem
    has no such locks (then nothing is known, and a created file is never removed)."""
    return ofd_lock(fd, kind, _CLAIM_BYTE)


def settle_claim(fd: int) -> None:
    """A created file's request is in place (its job launched, its backend added): other
    requests may open the file from now on (the engine's checks then apply)."""
    _claim(fd, fcntl.F_RDLCK)


def _unlink_if_same(path: str, st: os.stat_result) -> None:
    """Remove a file we created, unless the name meanwhile points elsewhere."""
    with contextlib.suppress(OSError):
        now = os.stat(path, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)


def _check_claimable(path: str, fd: int) -> None:
    """An existing file just opened: refused while the request that created it may still
    remove it, or once it has (no link left)."""
    if _claim(fd, fcntl.F_RDLCK) is False:
        raise FileRefused(
            f"'{path}' is being created by another request of migd's, which may still "
            "remove it: try again"
        )
    if os.fstat(fd).st_nlink == 0:
        raise FileRefused(
            f"'{path}' was removed while migd opened it (another request that created it "
            "was refused): try again"
        )


def open_regular(
    path: str,
    flags: int,
    *,
    create: bool,
    owners: Collection[int],
    open_file: FileOpener = plain_open,
) -> tuple[int, bool]:
    """Open a regular file by name for a job or a backend -> (fd, created by this call).

    Never blocks on a FIFO (O_NONBLOCK, cleared again on the fd before it is returned),
    so it is safe in a worker thread that shutdown waits for. OSError of the open itself
    is the caller's to word; rule violations raise FileRefused naming the file.
    """
    refuse_directory_name(path)
    real, found = resolve_trusted(path, owners)
    if found is not None and not (stat.S_ISREG(found.st_mode) or stat.S_ISDIR(found.st_mode)):
        # Refused unopened: a device's open() alone can act (a directory's open fails
        # with EISDIR, which the callers word as QEMU does).
        raise not_regular(path, found.st_mode)
    if found is not None:
        refuse_pseudo_filesystem(path, real)
    policy = getattr(open_file, "__self__", None)
    if isinstance(policy, PathPolicy) and policy.restricted:
        real = path  # allowed-dirs opens no link at all: PathPolicy.open refuses it there
    fd, created = None, False
    if create:
        # O_EXCL never opens what exists (a FIFO, a file planted by someone else): if it
        # succeeds, the file is new and ours, created with mode 0600.
        with contextlib.suppress(FileExistsError):
            fd = open_file(real, flags | os.O_CREAT | os.O_EXCL | os.O_NONBLOCK, 0o600)
            created = True
    if fd is None:
        try:
            fd = open_file(real, flags | os.O_NONBLOCK | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a FIFO with no reader, a socket, a device
                raise not_regular(path, _mode_of(real)) from None
            if exc.errno == errno.ELOOP:  # a link put there since resolve_trusted
                raise FileRefused(
                    f"'{path}' changed into a symbolic link while migd opened it"
                ) from None
            raise
    try:
        if created:
            # Fails only if another request opened the new file before this lock: then
            # it is not this request's alone to remove (remove_created asks again).
            _claim(fd, fcntl.F_WRLCK)
        st = os.fstat(fd)
        check_regular(path, st)
        if created:
            _give_to_client(path, fd, owners)
        else:
            check_trusted(path, st, owners)
            _check_claimable(path, fd)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        if created:
            remove_created(real, fd)
        os.close(fd)
        raise
    return fd, created


def _give_to_client(path: str, fd: int, owners: Collection[int]) -> None:
    """A new file made for a client of another uid is that client's (trusted_owners):
    theirs to use again, and never taken for a file of migd's own."""
    if len(owners) != 1 or os.geteuid() in owners:
        return
    (uid,) = owners
    try:
        os.fchown(fd, uid, -1)
    except OSError as exc:
        # Left migd's, the file was one this client may never use again (nor, in a
        # sticky /dev/shm, remove): its next object-add or restore of it was refused
        # "owned by uid 0". That was every file of such a client under the shipped unit,
        # which gives migd no capabilities (red-team, round 10c). So the request fails
        # and the caller removes the new file.
        raise FileRefused(
            f"cannot give the new file '{path}' to uid {uid}, the client's: "
            f"{exc.strerror}; left migd's, the client could not use it again. migd needs "
            "CAP_CHOWN for clients of other uids (CapabilityBoundingSet=CAP_CHOWN "
            "CAP_DAC_OVERRIDE in a drop-in of its unit); the file was not kept"
        ) from None


def _mode_of(path: str) -> int | None:
    """For an error message only: what the name points at now."""
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


def remove_created(path: str, fd: int) -> None:
    """Undo the creation of a file by open_regular when the job or backend is refused
    after all: only while `fd` holds (or can take) the claim's write lock, i.e. no other
    request has the file open (it is that request's file then, and stays)."""
    if not _claim(fd, fcntl.F_WRLCK):
        log.info("'%s' is left in place: another request of migd's uses it", path)
        return
    with contextlib.suppress(OSError):
        _unlink_if_same(path, os.fstat(fd))
