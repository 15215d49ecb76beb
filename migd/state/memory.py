"""Memory backends: mmap'd file or anonymous regions that migd saves and restores."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import re
import stat
from collections.abc import Callable, Collection, Iterator

from ..errors import BackendError
from ..fallocate import KEEP_SIZE, PUNCH_HOLE, fallocate
from ..pages import PAGE_SIZE
from .fdsets import AppendingFd, file_name, pwrite_at
from .overlay import file_identity, fs_type, layer_file
from .paths import (
    EXTEND_BYTE,
    FileOpener,
    hold_as_memory,
    ofd_lock,
    open_regular,
    plain_open,
    remove_created,
    settle_claim,
    trusted_owners,
    written_by_a_job,
)

MAX_SIZE = (1 << 62) - PAGE_SIZE  # leaves room in a 64-bit file for the save's metadata

_MADV_POPULATE_READ = 22  # Linux 5.14; neither is exported by the 3.11 mmap module
_MADV_POPULATE_WRITE = 23
_HUGETLBFS_MAGIC = 0x958458F6
_ZERO_STEP = 4 << 20  # bytes of zeros per read of /dev/zero
ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")  # QEMU's id_wellformed()
# Backends of uids other than root's and migd's (io/blocking.py capped_uid): each holds a
# mapping and, for a file, two fds for as long as it is listed. Unbounded, one such uid
# (or many, a socket open to all) took every fd of migd's limit, or every mapping of
# vm.max_map_count, and root's object-add and saves then failed with "Too many open
# files". 256 per uid: the memory slots of a QEMU machine (ACPI's 256 DIMMs); 4096 for all
# of them together: 8192 fds and 4096 of the 65,530 mappings Linux allows by default.
# Root's and migd's own backends (the management's) are not counted.
UID_MAX_BACKENDS = 256
OTHER_UIDS_MAX_BACKENDS = 4096

_libc = ctypes.CDLL(None, use_errno=True)
# mmap.madvise holds the GIL for the whole call, and MADV_POPULATE_WRITE of a large range
# takes long enough to stall every channel thread; a ctypes call releases the GIL.
_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int
# What a failed allocation looks like: tmpfs full (ENOSPC from fallocate, SIGBUS turned
# into EFAULT by MADV_POPULATE_WRITE) or no memory (ENOMEM). Anything else (EINVAL from a
# kernel without MADV_POPULATE_WRITE, EOPNOTSUPP) only means the optimisation is missing.
_ALLOCATION_ERRNOS = frozenset({errno.ENOSPC, errno.ENOMEM, errno.EFAULT})


def _is_hugetlbfs(fd: int) -> bool:
    return fs_type(fd) == _HUGETLBFS_MAGIC


_TMPFS_MAGIC = 0x01021994
_SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


def _tmpfs_huge_option(dev: int) -> str | None:
    """The huge= option of the tmpfs mount with device `dev` ("never" if it has none), or
    None if no mount of this process has it (a memfd's internal mount)."""
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[2] == wanted and " - " in line:
                    options = line.split(" - ", 1)[1].split()[-1].split(",")
                    huge = [o.partition("=")[2] for o in options if o.startswith("huge=")]
                    return huge[0] if huge else "never"
    except OSError:
        pass
    return None


def _system_shmem_huge() -> str:
    """The bracketed word of shmem_enabled: THP for memfds and internal shmem."""
    try:
        with open(_SHMEM_ENABLED) as f:
            words = f.read().split()
    except OSError:
        return "never"
    return next((w.strip("[]") for w in words if w.startswith("[")), "never")


def pages_are_huge(fd: int) -> bool:
    """Whether a memory file's pages are huge ones: on hugetlbfs, or on a tmpfs that makes
    transparent huge pages (its huge=always or within_size; for a memfd, the system's
    shmem_enabled; 'force' anywhere). Then saving straight from the mapping costs less
    CPU than through staging buffers (pinning a huge page is one entry, not 512), and
    the save does so (io/threads.py Staging, docs/bench/fast-disk). A guess from
    settings: 'advise' depends on who faulted the pages in, and is taken as 4 KiB."""
    magic = fs_type(fd)
    if magic == _HUGETLBFS_MAGIC:
        return True
    if magic != _TMPFS_MAGIC:
        return False
    system = _system_shmem_huge()
    if system == "force":
        return True
    if system == "deny":
        return False
    option = _tmpfs_huge_option(os.fstat(fd).st_dev)
    return (option if option is not None else system) in ("always", "within_size")


class MemoryBackend:
    """One RAM block: a page-aligned mapping plus, for file backends, its fd."""

    # What query-memdev reports in QEMU's MemdevInfo members, true of a mapping made here
    # unless object-add asked otherwise (advise_mergeable, advise_dontdump, preallocate
    # set them on the instance): no MADV_MERGEABLE (KSM), no MADV_DONTDUMP, nothing
    # touched at creation (pages are populated only by a save or restore); always: no
    # MAP_NORESERVE, no NUMA binding.
    mergeable = False
    dumpable = True
    preallocated = False
    reserves_swap = True

    def __init__(
        self,
        id: str,
        size: int,
        qom_type: str,
        mm: mmap.mmap,
        fd: int | None,
        mem_path: str | None,
        share: bool,
        block_name: str,
        close_fd: Callable[[int], None] = os.close,
    ) -> None:
        self.id = id
        self.block_name = block_name
        self.size = size
        self.qom_type = qom_type
        self.mem_path = mem_path  # as the client gave it (query-memdev, qom-get answer it)
        # What messages and partial-restore marks call the file (fdsets: its real name).
        self.file_name = file_name(mem_path, fd) if mem_path and fd is not None else mem_path
        self.share = share
        self.in_use = 0
        # The partial-restore mark of its file the client accepted (x-accept-partial):
        # saves of it are allowed while its file carries that very mark (state/partial.py).
        self.partial_accepted: str | None = None
        self.restores_begun = 0  # restore jobs launched into it: a save's checks see one
        # A restore into it completed since it was added: for a private mapping of a file,
        # every page is its own copy, whatever the file holds (state/partial.py).
        self.restored_whole = False
        # What a restore that has not completed left in it (state/partial.py), for memory
        # with no file of its own to carry the mark.
        self.partial_restore: str | None = None
        # Its file was created for it (object-add): the claim of paths.open_regular is
        # settled once the backend is registered.
        self.created_file = False
        # Its file on overlayfs opened by its layer's name, holding its mark there too.
        self.layer_fd: int | None = None
        self._mm: mmap.mmap | None = mm
        self._mv: memoryview | None = memoryview(mm)
        self._fd = fd
        # Read once: an fd's file never changes, and object-add compares it from a worker
        # thread, where an fstat of a backend another client deletes meanwhile could hit
        # a closed fd (or its number reused for another file).
        self._identity = _identity_of(fd)
        self._close_fd = close_fd  # a dup of a passed fdset is closed through the FdStore
        self._huge_pages: bool | None = None  # huge_pages, found out at first use
        anchor = ctypes.c_char.from_buffer(mm)
        self._base = ctypes.addressof(anchor)  # for ctypes madvise; valid while mapped
        del anchor  # a live export would make mm.close() fail

    def __repr__(self) -> str:
        return f"<MemoryBackend {self.id!r} {self.qom_type} size={self.size}>"

    def file_identity(self) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the mapped file; None for anonymous memory or once closed."""
        return None if self._fd is None else self._identity

    @property
    def fd(self) -> int | None:
        """The memory file's fd (None for anonymous memory), e.g. for partial.py's marks."""
        return self._fd

    @property
    def huge_pages(self) -> bool:
        """The memory file's pages are huge ones (pages_are_huge); False for anonymous
        memory."""
        if self._fd is None:
            return False
        if self._huge_pages is None:
            self._huge_pages = pages_are_huge(self._fd)
        return self._huge_pages

    @property
    def shared_fd(self) -> int | None:
        """The memory file's fd when the mapping shares its page cache (share=on): reading
        the file gives the mapping's bytes. None for anonymous or private memory."""
        return self._fd if self.share else None

    def write_at(self, data: memoryview, offset: int) -> None:
        """Write restored bytes into the shared memory file at `offset` (pwrite): a staged
        restore's way in (io/threads.py Staging), which maps and pins nothing.

        Never grows the file: a file another process cut short is refused here (its size
        is checked before each call; what a truncate between the check and the write
        still costs, io/engine.py's check_stored finds as holes). Running out of room or
        memory is the backend's allocation error."""
        self._check(offset, len(data))
        fd = self.shared_fd
        assert fd is not None
        if os.fstat(fd).st_size < offset + len(data):
            raise self.shrink_error("restore") or BackendError(
                f"Memory backend '{self.id}' file '{self.file_name}' is shorter than "
                f"{offset + len(data)} bytes"
            )
        while data:
            try:
                # At the offset even if a holder of a passed fd set O_APPEND (a restore
                # 'completed' with its bytes appended and the memory unchanged).
                done = pwrite_at(fd, data, offset)
            except InterruptedError:
                continue
            except AppendingFd as exc:
                raise BackendError(
                    f"Memory backend '{self.id}' file '{self.file_name}': {exc.desc}"
                ) from None
            except OSError as exc:
                if exc.errno in _ALLOCATION_ERRNOS:
                    raise self._allocation_error(exc.errno) from None
                raise BackendError(
                    f"Could not write memory backend '{self.id}' file '{self.file_name}': "
                    f"{exc.strerror}"
                ) from None
            data, offset = data[done:], offset + done

    def _check(self, offset: int, length: int) -> memoryview:
        if self._mv is None:
            raise BackendError(f"Memory backend '{self.id}' is closed")
        if (offset | length) % PAGE_SIZE or offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} is not page aligned within {self.size}")
        return self._mv

    def view(self, offset: int, length: int) -> memoryview:
        """Zero-copy writable slice of the mapping, page aligned (O_DIRECT-safe)."""
        return self._check(offset, length)[offset : offset + length]

    def _advise(self, advice: int, offset: int, length: int) -> None:
        """madvise a checked range of the mapping without holding the GIL."""
        if _madvise(self._base + offset, length, advice) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def _allocation_error(self, code: int) -> BackendError:
        where = f" in '{self.file_name}'" if self.file_name else ""
        return BackendError(
            f"Could not allocate memory for memory backend '{self.id}'{where}: "
            f"{os.strerror(errno.ENOSPC if code == errno.EFAULT else code)}"
        )

    def shrink_error(self, during: str) -> BackendError | None:
        """The error to report if another process cut the file short under the mapping:
        its pages past the new end can no longer be read or written (EFAULT, or SIGBUS
        from user space)."""
        if self._fd is None:
            return None
        try:
            now = os.fstat(self._fd).st_size
        except OSError:
            return None
        if now >= self.size:
            return None
        return BackendError(
            f"Memory backend '{self.id}' file '{self.file_name}' shrank from {self.size} "
            f"to {now} bytes during the {during}"
        )

    def fault_error(self, during: str) -> BackendError | None:
        """Why the kernel could not reach a page of the mapping (EFAULT) during a save or a
        restore: the file shrank, or (restoring into a shared file) its filesystem had no
        room left for the page. Asked whichever thread met the fault, so that the job's
        error does not depend on which came first. None where neither explains it."""
        shrunk = self.shrink_error(during)
        if shrunk is not None:
            return shrunk
        if during == "restore" and self._fd is not None and self.share:
            return self._allocation_error(errno.ENOSPC)
        return None

    def zero_range(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros, freeing memory where possible."""
        mv = self._check(offset, length)
        if length == 0:
            return
        assert self._mm is not None
        if self._fd is None:
            # Private anonymous pages dropped by DONTNEED come back as fresh zero pages.
            try:
                self._advise(mmap.MADV_DONTNEED, offset, length)
                return
            except OSError:
                pass
        elif self.share:
            # Punching the file also unmaps the pages, so the view reads zeros at once.
            if fallocate(self._fd, PUNCH_HOLE | KEEP_SIZE, offset, length) == 0:
                return
            try:
                self._advise(mmap.MADV_REMOVE, offset, length)
                return
            except OSError:
                pass
        # Private file mappings land here too: DONTNEED would bring back the file's data.
        self._read_zeros(mv[offset : offset + length])

    def _read_zeros(self, view: memoryview) -> None:
        """Fill part of the mapping with zeros read from /dev/zero: the kernel writes them,
        so a page past the end of a file cut short is EFAULT here, where a store from
        user space would kill the daemon with SIGBUS."""
        fd = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
        try:
            while view:
                try:
                    done = os.readv(fd, [view[:_ZERO_STEP]])
                except InterruptedError:
                    continue
                except OSError as exc:
                    error = self.fault_error("restore") if exc.errno == errno.EFAULT else None
                    raise error or BackendError(
                        f"Could not zero memory of memory backend '{self.id}': {exc.strerror}"
                    ) from None
                view = view[done:]
        finally:
            os.close(fd)

    def allocate(self, offset: int, length: int) -> None:
        """Allocate the shared memory file's pages over the range, mapping nothing, before
        a staged restore writes them (write_at); nothing for other memory.

        fallocate allocates and zeroes a file's pages several times faster than faulting
        them in one by one, and a write into pages that exist only copies, where a write
        into a hole allocates under the file's inode lock, one writer at a time
        (FALLOC_FL_KEEP_SIZE: a file another process cut short is never grown back over
        the pages it lost). Running out of memory or of room in the file's filesystem
        raises BackendError, as the write would; a file cut short raises the shrink
        error. Other failures (a filesystem without fallocate) only cost speed.

        A file without holes (fully_allocated: one fstat) is left alone: fallocate walked
        every page of the range there, under the inode lock the staged writes need too.
        Restores of 1.5 GiB into used memory on the fast disk ran 1.16x (1.09-1.32) at
        0.18 against 0.23 CPU s/GiB without that walk (docs/bench/fast-disk/README.md,
        "Session 23").
        """
        self._check(offset, length)
        if length == 0 or self._fd is None or not self.share or self.fully_allocated():
            return
        code = fallocate(self._fd, KEEP_SIZE, offset, length)
        if code in _ALLOCATION_ERRNOS:
            raise self.shrink_error("restore") or self._allocation_error(code)

    def populate(self, offset: int, length: int) -> None:
        """Allocate and map the range in bulk before it is read into; faults make restores slow.

        A shared file's pages are allocated first (allocate); then MADV_POPULATE_WRITE
        maps them (or, for anonymous and private memory, allocates them too), so the
        O_DIRECT read that follows pins pages without faulting. Running out of memory or
        of room in the file's filesystem raises BackendError: the read would fail anyway,
        with a less helpful EFAULT; a file cut short under the mapping raises the shrink
        error. Other failures only cost speed and are ignored.
        """
        self.allocate(offset, length)
        if length == 0:
            return
        try:
            self._advise(_MADV_POPULATE_WRITE, offset, length)
        except OSError as exc:
            if exc.errno in _ALLOCATION_ERRNOS:
                raise self.shrink_error("restore") or self._allocation_error(exc.errno) from None

    def preallocate(self) -> None:
        """object-add's prealloc: every page allocated and mapped now, as QEMU's prealloc
        does; no room raises BackendError, and query-memdev then says prealloc true."""
        self.populate(0, self.size)
        self.preallocated = True

    def advise_mergeable(self) -> None:
        """object-add's merge: KSM may merge the pages (MADV_MERGEABLE). A kernel without
        KSM refuses the advice and QEMU then goes on; so does migd, and query-memdev says
        merge false."""
        with contextlib.suppress(OSError):
            self._advise(mmap.MADV_MERGEABLE, 0, self.size)
            self.mergeable = True

    def advise_dontdump(self) -> None:
        """object-add's dump false: the pages are left out of migd's core dumps."""
        with contextlib.suppress(OSError):
            self._advise(mmap.MADV_DONTDUMP, 0, self.size)
            self.dumpable = False

    def prefault(self, offset: int, length: int) -> None:
        """Map the range for reading before a save writes it out (MADV_POPULATE_READ).

        In bulk, in the kernel, rather than by the faults of the zero scan or of the
        O_DIRECT write that pins the pages. Only an optimisation: a failure here (an old
        kernel, a file cut short under the mapping) is left for the write to report.
        """
        self._check(offset, length)
        if length:
            with contextlib.suppress(OSError):
                self._advise(_MADV_POPULATE_READ, offset, length)

    def room(self) -> tuple[int, int, int] | None:
        """(st_dev, free bytes of the filesystem, bytes this file has allocated) for a
        shared file on a filesystem with a size limit; None where that cannot be known
        (anonymous or private memory, an unlimited tmpfs reports no size at all).

        Free counts the root-reserved blocks too: the check built on it must never refuse
        a restore that could fit."""
        if self._fd is None or not self.share:
            return None
        st = os.fstat(self._fd)
        vfs = os.fstatvfs(self._fd)
        if vfs.f_blocks == 0:
            return None
        return st.st_dev, vfs.f_bfree * vfs.f_frsize, st.st_blocks * 512

    def fully_allocated(self) -> bool:
        """A shared file as long as its mapping, with as many blocks as bytes: it has no
        holes (pages allocated by fallocate and not written yet count as allocated). A
        file of another length: not known, False. Exact on tmpfs; where a filesystem
        counts its own metadata blocks too (ext4's extent blocks), a file with a few
        holes may pass, which its callers only pay for in speed."""
        if self._fd is None or not self.share:
            return False
        st = os.fstat(self._fd)
        return st.st_size == self.size and st.st_blocks * 512 >= self.size

    def holds_every_page(self) -> bool:
        """Whether the shared memory file surely has no hole now (an fstatfs and an
        fstat, where walking its pages with SEEK_HOLE takes 8 ms per GiB): on tmpfs, a
        file of the mapping's length with exactly as many blocks as bytes, since tmpfs
        counts exactly the pages it holds (and their swapped-out copies). A file cut short
        and grown back by a later write keeps holes where it lost pages, so it never
        passes. False elsewhere, where a filesystem counts its own metadata blocks too.

        Blind, as the SEEK_HOLE walk is not, to pages cut off and then allocated again by
        another process's fallocate (they read as zeros): that process might as well have
        written zeros into the memory, which no check after the fact could tell."""
        if self._fd is None or not self.share or fs_type(self._fd) != _TMPFS_MAGIC:
            return False
        st = os.fstat(self._fd)
        return st.st_size == self.size and st.st_blocks * 512 == self.size

    def data_ranges(self) -> list[tuple[int, int]] | None:
        """Page-rounded (offset, length) ranges that may hold data; None if unknown."""
        if self._fd is None or not self.share or self._mv is None:
            return None  # anonymous or private pages are invisible to the file
        # One fstat instead of the SEEK_HOLE walk over every page of a file without holes.
        # For a restore into used memory that walk was 2% of the daemon's CPU on the fast
        # disk (docs/bench/fast-disk).
        if self.fully_allocated():
            return [(0, self.size)]
        ranges: list[tuple[int, int]] = []
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
                end = min(os.lseek(self._fd, start, os.SEEK_HOLE), self.size)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break  # no data at or after pos
                return None
            if start >= self.size:
                break
            start -= start % PAGE_SIZE
            end = min(-(-end // PAGE_SIZE) * PAGE_SIZE, self.size)
            if ranges and ranges[-1][0] + ranges[-1][1] >= start:
                prev = ranges.pop()
                start = prev[0]
            ranges.append((start, end - start))
            pos = end
        return ranges

    def close(self) -> None:
        """Unmap and close the fd; safe to call twice."""
        if self._mv is not None:
            with contextlib.suppress(BufferError):
                self._mv.release()
            self._mv = None
        if self._mm is not None:
            # A caller may still hold a view: munmap then happens when the last one goes.
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
        if self._fd is not None:
            # Forgotten before it is closed: a worker thread that read the fd (a save's
            # start reading its marks) then sees the backend closed whenever its fd may
            # already be closed, or its number taken by another file.
            fd, self._fd = self._fd, None
            # Explicitly: a passed fd's dup shares its description with the fdset's fd,
            # which may stay open after this backend.
            hold_as_memory(fd, held=False)
            self._close_fd(fd)
        if self.layer_fd is not None:
            layer, self.layer_fd = self.layer_fd, None
            os.close(layer)  # its mark goes with it


def _identity_of(fd: int | None) -> tuple[int, int] | None:
    """(st_dev, st_ino) of fd's file; None without an fd."""
    return None if fd is None else file_identity(fd)


def _validate(id: str, size: int, ramblock_name: str | None) -> str:
    if not isinstance(id, str) or not ID_RE.fullmatch(id):
        raise BackendError("Parameter 'id' expects an identifier")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % PAGE_SIZE:
        raise BackendError(f"Parameter 'size' expects a positive multiple of {PAGE_SIZE}")
    if size > MAX_SIZE:
        # mmap and off_t are signed 64-bit: larger sizes cannot be mapped or saved.
        raise BackendError(f"Parameter 'size' expects a value of at most {MAX_SIZE}")
    if ramblock_name is None:
        return id
    if not isinstance(ramblock_name, str) or not 1 <= len(ramblock_name.encode()) <= 255:
        raise BackendError("Parameter 'ramblock-name' expects a name of 1 to 255 bytes")
    return ramblock_name


def create_file_backend(
    id: str,
    size: int,
    mem_path: str,
    *,
    share: bool = True,
    ramblock_name: str | None = None,
    fd: int | None = None,
    close_fd: Callable[[int], None] = os.close,
    open_file: FileOpener = plain_open,
    owners: Collection[int] | None = None,
    refuse_file: Callable[[tuple[int, int]], None] | None = None,
) -> MemoryBackend:
    """Map mem_path (or the passed fd, which the backend owns even on failure) as RAM.
    `refuse_file((st_dev, st_ino))` may refuse the file before it is extended or mapped
    (another backend's file, a job's save file).

    QEMU's size rules (qemu_ram_alloc_from_fd): a new or empty file is extended to
    `size`; a larger one is used as a prefix; a non-empty smaller one is refused, never
    grown (its end may hold data someone keeps there). A refused backend leaves an
    existing file as it was. An existing mem-path must pass paths.check_trusted for
    `owners` (default: migd's own uid).
    """
    try:
        block_name = _validate(id, size, ramblock_name)
    except BackendError:
        if fd is not None:
            close_fd(fd)
        raise
    created = False
    if fd is None:
        try:
            fd, created = open_regular(
                mem_path,
                os.O_RDWR,
                create=True,
                owners=trusted_owners() if owners is None else owners,
                open_file=open_file,
            )
        except OSError as e:
            if e.errno == errno.EISDIR:  # QEMU makes a temporary file there; migd refuses
                raise BackendError(f"Could not open '{mem_path}': Is a directory") from None
            # QEMU's text (qemu_ram_alloc_from_file) for a name it cannot open either.
            raise BackendError(
                f"can't open backing store {mem_path} for guest RAM: {e.strerror}"
            ) from None
    step = "use"
    st: os.stat_result | None = None
    layer: int | None = None
    extending = held = False
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BackendError(f"Could not open '{mem_path}': Is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise BackendError(f"Could not use '{mem_path}': not a regular file")
        if refuse_file is not None:
            refuse_file((st.st_dev, st.st_ino))
        # Marked before the look at jobs, as a job holds its file before it looks for the
        # mark (engine._hold_file): of a save starting meanwhile, one of the two sees the
        # other.
        hold_as_memory(fd)
        held = True
        # On overlayfs, on its layer's file too: another migd's save into the file by
        # that name looks there (paths.mapped_as_memory).
        layer = layer_file(fd, os.O_RDONLY)
        if layer is not None:
            hold_as_memory(layer)
        _refuse_written_by_a_job(fd, mem_path)
        # Two requests may set up one existing empty file at once (no claim covers a file
        # neither created): one extended it and, refused after all, cut it back to empty
        # under the mapping of the other, which had seen it extended or empty (red-team,
        # session 16: 25 of 300 rounds answered {} to an object-add whose file was then 0
        # bytes). Its size is read, and it is extended and mapped, under a lock of migd's.
        extending = _lock_extending(fd, mem_path)
        st = os.fstat(fd)
        if 0 < st.st_size < size:
            raise BackendError(
                f"{id} backing store size 0x{st.st_size:x} is too small for 'size' option "
                f"0x{size:x} plus 'offset' option 0x0"
            )
        if _is_hugetlbfs(fd):
            huge = os.fstatvfs(fd).f_bsize
            if size % huge:
                raise BackendError(
                    f"Could not use '{mem_path}': size {size} is not a multiple "
                    f"of the huge page size {huge}"
                )
        step = "extend"
        if st.st_size == 0:
            os.ftruncate(fd, size)
        step = "map"
        try:
            mm = mmap.mmap(
                fd,
                size,
                flags=mmap.MAP_SHARED if share else mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except ValueError:  # Python's own check: another process cut the file meanwhile
            raise BackendError(
                f"Could not map '{mem_path}': it is now {os.fstat(fd).st_size} bytes, "
                f"shorter than 'size' {size} (cut by another process meanwhile)"
            ) from None
    except BaseException as e:
        if created:
            remove_created(mem_path, fd)  # unless another request has opened it since
        elif st is not None and st.st_size == 0 and step in ("extend", "map"):
            _restore_empty(fd, st)
        if extending:
            _unlock_extending(fd)
        if held:  # a passed fd's open may outlive this close (its fdset keeps it)
            hold_as_memory(fd, held=False)
        if layer is not None:
            os.close(layer)
        close_fd(fd)
        if isinstance(e, OSError):
            raise BackendError(f"Could not {step} '{mem_path}': {e.strerror}") from None
        raise
    if extending:
        _unlock_extending(fd)
    backend = MemoryBackend(
        id, size, "memory-backend-file", mm, fd, mem_path, share, block_name, close_fd
    )
    backend.created_file = created
    backend.layer_fd = layer
    return backend


def _refuse_written_by_a_job(fd: int, mem_path: str) -> None:
    """A file another migd process's job writes (its save's file, its restore's memory)
    is no memory to add: extended while that save had just cut it empty, it made the save
    `completed` with zeros past its end, a file `migd verify` and every restore refused;
    cut by that save under the mapping, the backend held no memory at all (red-team,
    session 18). This migd's own jobs are refused before (`refuse_file`), by name."""
    if written_by_a_job(fd):
        raise BackendError(
            f"Memory file '{mem_path}' is being written by a job of another migd process: "
            "it is that job's save file or memory until it ends"
        )


def _lock_extending(fd: int, mem_path: str) -> bool:
    """Hold migd's lock for sizing a memory file: reading its size, extending it if empty,
    mapping it (an open-file-description lock, so that it also excludes another request
    of this process) -> True if taken, False where the filesystem has no such locks.
    Refused, not waited for, while another request holds it: it holds it only for those
    steps, and no other program may keep an object-add waiting."""
    taken = ofd_lock(fd, fcntl.F_WRLCK, EXTEND_BYTE)
    if taken is False:
        raise BackendError(
            f"'{mem_path}' is being set up as memory by another request of migd's: try again"
        )
    return bool(taken)


def _unlock_extending(fd: int) -> None:
    ofd_lock(fd, fcntl.F_UNLCK, EXTEND_BYTE)


def _restore_empty(fd: int, st: os.stat_result) -> None:
    """An existing empty file we extended and then could not map: empty again, with its
    times as they were (a refused object-add changes nothing)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def create_ram_backend(id: str, size: int, *, ramblock_name: str | None = None) -> MemoryBackend:
    """Anonymous private memory owned by migd."""
    block_name = _validate(id, size, ramblock_name)
    try:
        mm = mmap.mmap(
            -1,
            size,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
    except OSError as e:
        raise BackendError(
            f"Could not allocate {size} bytes for memory backend '{id}': {e.strerror}"
        ) from None
    return MemoryBackend(id, size, "memory-backend-ram", mm, None, None, False, block_name)


class MemoryRegistry:
    """The daemon's memory backends by id, in insertion order."""

    def __init__(self) -> None:
        self._backends: dict[str, MemoryBackend] = {}
        self._reserved: dict[str, str] = {}  # id -> block name, of object-adds under way
        # id -> the capped uid whose backend it is (listed or under way): see UID_MAX_BACKENDS.
        self._owners: dict[str, int] = {}

    def check_new(self, id: str, block_name: str, *, reserved: bool = False) -> None:
        """Refuse an id or block name already taken, or reserved by an object-add still
        making its backend (`reserved`: the caller holds that reservation itself)."""
        if id in self._backends or (id in self._reserved and not reserved):
            raise BackendError(f"Memory backend '{id}' already exists")
        other = self.by_block_name(block_name)
        if other is not None:
            raise BackendError(
                f"RAM block name '{block_name}' is already used by memory backend '{other.id}'"
            )
        for other_id, name in self._reserved.items():
            if name == block_name and not (reserved and other_id == id):
                raise BackendError(
                    f"RAM block name '{block_name}' is already used by memory backend '{other_id}'"
                )

    @contextlib.contextmanager
    def reserving(self, id: str, block_name: str, owner: int | None = None) -> Iterator[None]:
        """Hold `id` and `block_name` while a backend is made off the event loop: a second
        object-add of the same id meanwhile is refused before it creates a file (it used
        to create one, be refused at add(), and leave the file behind). `owner`: the
        capped uid that asks (None: root's, migd's, the configuration's), whose backends,
        those under way included, must stay under UID_MAX_BACKENDS and
        OTHER_UIDS_MAX_BACKENDS."""
        self.check_new(id, block_name)
        if owner is not None:
            self._check_owner_room(owner)
            self._owners[id] = owner
        self._reserved[id] = block_name
        try:
            yield
        finally:
            del self._reserved[id]
            if id not in self._backends:
                self._owners.pop(id, None)  # refused: it holds nothing

    def _check_owner_room(self, owner: int) -> None:
        held = sum(1 for uid in self._owners.values() if uid == owner)
        if held >= UID_MAX_BACKENDS:
            raise BackendError(
                f"uid {owner} has {held} memory backends, the most migd keeps for a uid other "
                f"than root's and migd's (UID_MAX_BACKENDS {UID_MAX_BACKENDS}): delete some "
                "with object-del"
            )
        if len(self._owners) >= OTHER_UIDS_MAX_BACKENDS:
            raise BackendError(
                f"uids other than root's and migd's have {len(self._owners)} memory backends, "
                f"the most migd keeps for them together (OTHER_UIDS_MAX_BACKENDS "
                f"{OTHER_UIDS_MAX_BACKENDS}): delete some with object-del"
            )

    def add(self, backend: MemoryBackend, *, reserved: bool = False) -> None:
        """Register backend; on refusal the caller still owns (and closes) it."""
        self.check_new(backend.id, backend.block_name, reserved=reserved)
        identity = backend.file_identity()
        if identity is not None:
            self.refuse_shared_file(identity, backend.file_name or backend.id)
        self._backends[backend.id] = backend
        if backend.created_file and backend.fd is not None:
            settle_claim(backend.fd)  # added: no longer a file a refusal may remove

    def refuse_shared_file(self, identity: tuple[int, int], path: str) -> None:
        """Refuse a second backend on a backend's file (same device and inode, whatever
        the name): a restore into both would write each block's pages over the other's,
        and the checks of one would blame the save file for the other's bytes.

        object-add calls this from a worker thread too, while other clients' commands
        change the backends on the event loop: it walks a copy (list() of a dict is one
        step for the GIL), never the dict itself ("dictionary changed size during
        iteration", red-team, session 16)."""
        for other in list(self._backends.values()):
            if other.file_identity() == identity:
                named = other.file_name if other.file_name not in (None, path) else None
                raise BackendError(
                    f"'{path}' is already the memory file of memory backend '{other.id}'"
                    + (f" ('{named}')" if named else "")
                    + ": two backends cannot map one file"
                )

    def remove(self, id: str) -> None:
        """Unregister and close a backend no migration is using."""
        self.take(id).close()

    def take(self, id: str) -> MemoryBackend:
        """Unregister a backend no migration is using; the caller closes it (object-del
        does so off the event loop: unmapping populated memory takes 20-25 ms per GiB)."""
        backend = self.get(id)
        if backend.in_use > 0:
            raise BackendError(f"Memory backend '{id}' is in use by a migration")
        del self._backends[id]
        self._owners.pop(id, None)
        return backend

    def get(self, id: str) -> MemoryBackend:
        try:
            return self._backends[id]
        except KeyError:
            raise BackendError(f"Memory backend '{id}' not found") from None

    def by_block_name(self, name: str) -> MemoryBackend | None:
        return next((b for b in self._backends.values() if b.block_name == name), None)

    def __iter__(self) -> Iterator[MemoryBackend]:
        return iter(list(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def close_all(self) -> list[MemoryBackend]:
        """Close every backend at shutdown but those a job still uses; -> those.

        A job's backends are in use until its task ends, after its threads have returned.
        A shutdown gives up waiting for a stuck job (engine.STOP_TIMEOUT): closing its
        backends then closed fds under its threads, which got EBADF, or used the number
        once it was another file's. Such a backend is left open: the process's exit
        closes and unmaps it once the threads are done."""
        backends, self._backends = list(self._backends.values()), {}
        self._owners = {}
        kept = [backend for backend in backends if backend.in_use > 0]
        for backend in backends:
            if backend.in_use == 0:
                backend.close()
        return kept
