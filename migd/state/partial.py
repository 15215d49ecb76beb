"""Marks on memory files that a restore into them has not finished.

A restore writes a backend's memory file page by page. If migd is killed (or the restore
fails or is cancelled) half-way, the file holds a mix of old and restored pages, and
nothing in its bytes says so. So before the first page changes, each shared file-backed
backend's file gets a mark, made durable, and the mark is removed only once the restore
has completed. `object-add` of a file that carries a mark is refused unless the client
passes `x-accept-partial: true`; the mark then stays until a restore into the file
completes (or someone removes it by hand: `setfattr -x user.migd.partial FILE`).

The mark is the extended attribute `user.migd.partial` (value: what was being restored,
from where and when). Where the filesystem has no user xattrs (ramfs, hugetlbfs),
it is a sidecar file in one directory every migd process on the machine shares,
`/run/migd/partial-restores` (MIGD_MARKS_DIR overrides it), whatever its socket's
directory: before, each daemon kept its sidecars next to its own socket, and a daemon
whose socket was elsewhere saved another's half-restored ramfs memory as `completed`
(red-team, session 18). A sidecar is named `DEV-INO.UID`: the memory file's device and
inode, and the uid of the migd that wrote it, which must own it. Root makes the directory
sticky and world-writable (as /tmp), so a non-root migd can mark there too and nobody
can remove or replace another uid's mark; a reader trusts only the marks of root, of its
own uid and of the memory file's owner (anyone else's would only let a stranger refuse
that file). A non-root migd that finds no usable shared directory (absent: only root can
make it) keeps its marks next to its socket as before, seen by daemons sharing that
directory only; every daemon still reads the marks there. Anonymous memory and
`share=false` backends need no mark: a restore never changes a file there.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator

from ..errors import BackendError, MigrationError
from .memory import MemoryBackend
from .paths import sync_directory_of

log = logging.getLogger(__name__)

XATTR = "user.migd.partial"
SIDECAR_DIR = "partial-restores"
SHARED_DIR = "/run/migd/partial-restores"
SHARED_DIR_ENV = "MIGD_MARKS_DIR"
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP)
_MAX_MARK = 4096


def describe(save_path: str) -> str:
    """The mark's value: which restore left the file partial, and when it started. To the
    microsecond: an acceptance (x-accept-partial) holds for one mark, and two restores of
    one save by one daemon must not leave the same one."""
    now = time.time()
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    micros = int(now * 1_000_000) % 1_000_000
    return f"restore of '{save_path}' started {started}.{micros:06d}Z by migd pid {os.getpid()}"


def shared_dir() -> str:
    return os.environ.get(SHARED_DIR_ENV) or SHARED_DIR


def _shared_dir_problem(st: os.stat_result, euid: int) -> str | None:
    """Why `st` (lstat of the shared directory or its parent) cannot be trusted: it must
    be a real directory of root's or this migd's uid, and writable by others only if
    sticky (nobody then removes or renames another's entry)."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in (0, euid):
        return f"is owned by uid {st.st_uid}, not root or migd's ({euid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        mode = stat.S_IMODE(st.st_mode)
        return f"is writable by group or others and not sticky (mode {mode:04o})"
    return None


class PartialMarks:
    """Sets, reads and clears the marks; `sidecar_dir` is this daemon's own directory
    (next to its socket): read always, written only where the shared one is unusable."""

    def __init__(self, sidecar_dir: str | None = None, shared: str | None = None) -> None:
        self.sidecar_dir = sidecar_dir
        self.shared = shared

    @staticmethod
    def needs_mark(backend: MemoryBackend) -> bool:
        return backend.fd is not None and backend.share

    def _sidecar(self, fd: int) -> str | None:
        if self.sidecar_dir is None:
            return None
        self._check_dir(self.sidecar_dir)
        st = os.fstat(fd)
        return os.path.join(self.sidecar_dir, f"{st.st_dev}-{st.st_ino}")

    @staticmethod
    def _check_dir(directory: str) -> None:
        """The marks' directory, where it exists, must be migd's own and writable by no
        one else: another user who could write there could forge or delete marks, or
        plant a link where migd writes one (root would write through it)."""
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            return
        problem = None
        if not stat.S_ISDIR(st.st_mode):
            problem = "is not a directory"
        elif st.st_uid != os.geteuid():
            problem = f"is owned by uid {st.st_uid}, not migd's ({os.geteuid()})"
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            # Sticky (the shared directory, when the socket is beside it): nobody else
            # removes or replaces migd's entries; others' are not read (_read_owned).
            problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        if problem is not None:
            raise MigrationError(
                f"The partial-restore marks' directory '{directory}' {problem}: migd keeps "
                "marks only in a directory of its own"
            )

    def _check_shared(self, make: bool) -> bool:
        """Whether the shared directory is there (made if `make` and root) and trusted;
        raises if it is there but another user could have planted or changed it."""
        if self.shared is None:
            return False
        euid = os.geteuid()
        parent = os.path.dirname(self.shared)
        for path, mode in ((parent, 0o755), (self.shared, 0o1777)):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not make or euid != 0:
                    return False
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path, 0o700)
                    os.chmod(path, mode)  # mkdir's mode is masked by the umask
                st = os.lstat(path)
            problem = _shared_dir_problem(st, euid)
            if problem is not None:
                raise MigrationError(
                    f"The partial-restore marks' directory '{path}' {problem}: migd keeps "
                    "marks only in a directory no other user can change"
                )
        if make and euid == 0 == st.st_uid and stat.S_IMODE(st.st_mode) != 0o1777:
            # Made 0700 by an older migd whose socket was beside it: open it to the
            # non-root ones (sticky: nobody removes another's marks).
            os.chmod(self.shared, 0o1777)
        # A non-root migd that may not use it (an older root's 0700) keeps its own.
        return os.access(self.shared, os.W_OK | os.X_OK if make else os.X_OK)

    def _shared_names(self, fd: int) -> Iterator[tuple[str, int]]:
        """The shared directory's sidecars this daemon trusts for `fd`'s file, each with
        the uid that must own it: root's, its own and the file owner's."""
        st = os.fstat(fd)
        key = f"{st.st_dev}-{st.st_ino}"
        assert self.shared is not None
        for uid in dict.fromkeys((0, os.geteuid(), st.st_uid)):
            yield os.path.join(self.shared, f"{key}.{uid}"), uid

    @staticmethod
    def _read_owned(path: str, uid: int) -> str | None:
        """The mark in `path` if it is a regular file of `uid`'s; an entry of another
        uid under that name is not one (its uid could not have written it)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or exc.errno == errno.ELOOP:
                return None
            if exc.errno != errno.EACCES:
                raise
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_uid == uid:
                # A mark of an older migd (0600), read without CAP_DAC_OVERRIDE: a mark.
                return f"restore whose mark '{path}' of uid {uid} cannot be read"
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                log.warning("ignoring '%s': not a regular file of uid %d", path, uid)
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.readline(_MAX_MARK).decode(errors="replace").rstrip("\n")
        finally:
            os.close(fd)

    def _read_shared(self, fd: int) -> str | None:
        if not self._check_shared(make=False):
            return None
        for path, uid in self._shared_names(fd):
            mark = self._read_owned(path, uid)
            if mark is not None:
                return mark
        return None

    def _write_shared(self, fd: int, value: bytes, backend: MemoryBackend) -> bool:
        """Write the mark as `DEV-INO.EUID` in the shared directory; False if unusable."""
        if not self._check_shared(make=True):
            return False
        st = os.fstat(fd)
        path = os.path.join(self.shared or "", f"{st.st_dev}-{st.st_ino}.{os.geteuid()}")
        # mkstemp: O_EXCL|O_NOFOLLOW under a fresh name, nothing another user can plant.
        out, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.shared)
        try:
            os.fchmod(out, 0o644)  # readable by every migd (root's has no DAC override)
            os.write(out, value + b"\n" + (backend.file_name or "").encode() + b"\n")
            os.fsync(out)
            os.rename(tmp, path)  # sticky: fails over another uid's entry of that name
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(out)
        sync_directory_of(path)
        return True

    def _clear_shared(self, fd: int) -> None:
        if not self._check_shared(make=False):
            return
        for path, uid in self._shared_names(fd):
            if self._read_owned(path, uid) is None:
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except PermissionError:
                # Root's mark, and this migd is not root: it stays (a refusal, not a
                # loss); root's migd or an admin removes it.
                log.warning("cannot remove the partial mark '%s' of uid %d", path, uid)

    def _write_sidecar(self, fd: int, value: bytes, backend: MemoryBackend) -> None:
        if self._write_shared(fd, value, backend):
            return
        path = self._sidecar(fd)
        if path is None:
            # Without a state directory (migd used as a library) there is nowhere to
            # keep the mark: the restore goes on, as it did before marks existed.
            log.warning("no partial mark on '%s': no xattrs and no state dir", backend.file_name)
            return
        os.makedirs(self.sidecar_dir or "", mode=0o700, exist_ok=True)
        self._check_dir(self.sidecar_dir or "")  # as it is now, made or found
        tmp = f"{path}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by a crash: O_EXCL below opens only a new file
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.open(tmp, flags, 0o600)
        try:
            os.write(out, value + b"\n" + (backend.file_name or "").encode() + b"\n")
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(tmp, path)
        sync_directory_of(path)

    def set(self, backend: MemoryBackend, value: str) -> None:
        """Mark `backend`'s file, durably, before a restore changes it."""
        fd = backend.fd
        if fd is None:
            return
        raw = value.encode(errors="backslashreplace")[:_MAX_MARK]
        backend.partial_accepted = None  # a new mix of pages: nobody accepted this one
        try:
            try:
                os.setxattr(fd, XATTR, raw)
            except OSError as exc:
                if exc.errno not in _NO_XATTRS:
                    raise
                self._write_sidecar(fd, raw, backend)
            else:
                os.fsync(fd)  # an xattr is inode metadata: fdatasync need not write it
        except OSError as exc:
            raise MigrationError(
                f"Could not mark memory backend '{backend.id}' file '{backend.file_name}' "
                f"as being restored: {exc.strerror}"
            ) from None

    def read(self, backend: MemoryBackend) -> str | None:
        """The mark of `backend`'s file, or None."""
        fd = backend.fd
        if fd is None:
            return None
        try:
            return os.getxattr(fd, XATTR).decode(errors="replace")
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, *_NO_XATTRS):
                raise
        mark = self._read_shared(fd)
        if mark is not None:
            return mark
        path = self._sidecar(fd)
        return None if path is None else self._read_owned(path, os.geteuid())

    def clear(self, backend: MemoryBackend) -> None:
        """Remove the mark of `backend`'s file (a restore into it completed)."""
        fd = backend.fd
        if fd is None:
            return
        try:
            os.removexattr(fd, XATTR)
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, *_NO_XATTRS):
                raise
        self._clear_shared(fd)
        path = self._sidecar(fd)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def set_all(self, backends: Iterable[MemoryBackend], save_path: str) -> None:
        value = describe(save_path)
        for backend in backends:
            backend.partial_restore = value
            backend.restored_whole = False
            if self.needs_mark(backend):
                self.set(backend, value)

    def clear_all(self, backends: Iterable[MemoryBackend]) -> None:
        for backend in backends:
            if self.needs_mark(backend):
                self.clear(backend)
            backend.partial_restore = None
            backend.restored_whole = True

    def check_save(self, backends: Iterable[MemoryBackend]) -> None:
        """A save: refuse a backend whose file a restore left partial (cancelled, failed,
        killed), unless the client accepted that file as it is when adding it. Saved, the
        mix of old and restored pages would be a whole, verified save of it (red-team,
        session 15: a cancelled restore's backend saved `completed`, verify passed).

        The acceptance is of the mark the file carried then, not of the file for good:
        another migd process's backend on that file may restore into it again, and a
        restore cancelled there leaves a new mix, with a new mark, that nobody accepted
        (red-team, round 10b: it was saved `completed`; only the restoring daemon's own
        backend lost its acceptance)."""
        for backend in backends:
            # Memory with no file of its own to mark (memory-backend-ram, share=false)
            # carries its mark in the daemon only: it does not outlive the daemon anyway.
            marked = self.needs_mark(backend)
            try:
                mark = self.read(backend) if marked else backend.partial_restore
                if mark is None and self._shows_its_file(backend):
                    mark = self.read(backend)
            except OSError as exc:
                if backend.fd is None:
                    continue  # closed meanwhile: below
                raise MigrationError(
                    f"Could not read the partial-restore mark of memory backend "
                    f"'{backend.id}' file '{backend.file_name}': {exc.strerror}"
                ) from None
            if marked and backend.fd is None:
                # Deleted by another client while this ran in a worker thread (object-del
                # on the event loop): the fd read may have been closed, or reused for
                # another file. The save's start finds the backend gone and refuses,
                # naming that (engine._refuse_changed_backends); before, "Internal
                # error: OSError: Bad file descriptor" (red-team, session 16).
                continue
            if mark is not None and mark != backend.partial_accepted:
                where = f": its file '{backend.file_name}' was left so by" if marked else ", from"
                raise MigrationError(
                    f"Memory backend '{backend.id}' holds partial data{where} an interrupted "
                    f"{mark}. A save would keep that mix of old and restored pages as if it "
                    "were whole; restore into it again first"
                )

    @staticmethod
    def _shows_its_file(backend: MemoryBackend) -> bool:
        """A private mapping of a file (share=false) shows the file's pages wherever it
        has not written its own: a restore another migd process left partial in the file
        (its backend shares it) is in this memory too, its mark on the file alone (a
        restore into private memory marks none). Not once a restore into this memory
        completed: every page is its own copy then (red-team, round 10b: saved as whole)."""
        return backend.fd is not None and not backend.share and not backend.restored_whole

    def check_add(self, backend: MemoryBackend, accept: bool) -> None:
        """object-add: refuse a file an interrupted restore left partial, unless accepted."""
        mark = self.read(backend)
        if mark is None:
            return
        if accept:
            log.warning(
                "memory file '%s' accepted with a partial restore: %s", backend.file_name, mark
            )
            backend.partial_accepted = mark
            return
        raise BackendError(
            f"Memory file '{backend.file_name}' was left partial by an interrupted {mark}: it "
            "holds a mix of old and restored pages. Restore into it again with "
            "'x-accept-partial': true, or pass that to use it as it is"
        )
