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
it is a sidecar file in migd's state directory (`partial-restores/` next to the QMP
socket), named after the memory file's device and inode. Anonymous memory and
`share=false` backends need no mark: a restore never changes a file there.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Iterable

from ..errors import BackendError, MigrationError
from .memory import MemoryBackend
from .paths import sync_directory_of

log = logging.getLogger(__name__)

XATTR = "user.migd.partial"
SIDECAR_DIR = "partial-restores"
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP)
_MAX_MARK = 4096


def describe(save_path: str) -> str:
    """The mark's value: which restore left the file partial, and when it started."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return f"restore of '{save_path}' started {started} by migd pid {os.getpid()}"


class PartialMarks:
    """Sets, reads and clears the marks; `sidecar_dir` is the fallback's directory."""

    def __init__(self, sidecar_dir: str | None = None) -> None:
        self.sidecar_dir = sidecar_dir

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
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        if problem is not None:
            raise MigrationError(
                f"The partial-restore marks' directory '{directory}' {problem}: migd keeps "
                "marks only in a directory of its own"
            )

    def _write_sidecar(self, fd: int, value: bytes, backend: MemoryBackend) -> None:
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
        backend.partial_accepted = False  # a new mix of pages: nobody accepted this one
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
        path = self._sidecar(fd)
        try:
            with open(path or "", "rb") as f:
                return f.readline(_MAX_MARK).decode(errors="replace").rstrip("\n")
        except FileNotFoundError:
            return None

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
        path = self._sidecar(fd)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def set_all(self, backends: Iterable[MemoryBackend], save_path: str) -> None:
        value = describe(save_path)
        for backend in backends:
            backend.partial_restore = value
            if self.needs_mark(backend):
                self.set(backend, value)

    def clear_all(self, backends: Iterable[MemoryBackend]) -> None:
        for backend in backends:
            if self.needs_mark(backend):
                self.clear(backend)
            backend.partial_restore = None

    def check_save(self, backends: Iterable[MemoryBackend]) -> None:
        """A save: refuse a backend whose file a restore left partial (cancelled, failed,
        killed), unless the client accepted that file as it is when adding it. Saved, the
        mix of old and restored pages would be a whole, verified save of it (red-team,
        session 15: a cancelled restore's backend saved `completed`, verify passed)."""
        for backend in backends:
            if backend.partial_accepted:
                continue
            # Memory with no file of its own to mark (memory-backend-ram, share=false)
            # carries its mark in the daemon only: it does not outlive the daemon anyway.
            marked = self.needs_mark(backend)
            try:
                mark = self.read(backend) if marked else backend.partial_restore
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
            if mark is not None:
                where = f": its file '{backend.file_name}' was left so by" if marked else ", from"
                raise MigrationError(
                    f"Memory backend '{backend.id}' holds partial data{where} an interrupted "
                    f"{mark}. A save would keep that mix of old and restored pages as if it "
                    "were whole; restore into it again first"
                )

    def check_add(self, backend: MemoryBackend, accept: bool) -> None:
        """object-add: refuse a file an interrupted restore left partial, unless accepted."""
        mark = self.read(backend)
        if mark is None:
            return
        if accept:
            log.warning(
                "memory file '%s' accepted with a partial restore: %s", backend.file_name, mark
            )
            backend.partial_accepted = True
            return
        raise BackendError(
            f"Memory file '{backend.file_name}' was left partial by an interrupted {mark}: it "
            "holds a mix of old and restored pages. Restore into it again with "
            "'x-accept-partial': true, or pass that to use it as it is"
        )
