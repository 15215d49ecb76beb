"""`migd verify FILE[,offset=N]`: prove a save file whole without a daemon.

Checks what a restore checks before it changes memory (the stream's structure, the RAM
end section, every block's bitmap against the vmdescription's counts and digest, the
checksum table's entry, digest and place at the file's end), then every unit's checksum
(io/file_verify.py: one thread per fd, each fd O_DIRECT where the filesystem takes it).
A file without checksums (QEMU's, or a save with "checksums": false) is checked for
structure only. Returns plain data; the command line prints it and picks the exit code.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import FormatError, MigrationError
from ..io.digests import ALGORITHM, UNIT_BYTES
from ..io.file_verify import FileBlock, FileProgress, verify_file
from ..migration.mapped_ram import checksum_table, format
from .client import parse_offset
from .inspect import InspectError, open_regular, refuse_if_being_written

POLL_SECONDS = 0.1  # how often the progress callback runs while the threads read
_MAGIC = struct.pack(">I", format.QEVM_MAGIC)
_OFFSET_OPTION = ",offset="


class NotASaveError(Exception):
    """Not a save file at all: unreadable, not a regular file, empty, foreign (exit 2)."""


class FileInUse(NotASaveError):
    """A migd job is writing the file now: no verdict on half a save (exit 1)."""


class CorruptError(Exception):
    """A save file that fails a check; the text names the file and where (exit 1)."""


class VerifyCancelled(Exception):
    """The caller set the cancel event before every unit was checked."""


@dataclass
class VerifyReport:
    path: str
    offset: int
    blocks: int
    pages: int
    present_pages: int
    checksums: bool  # False: the file has none, only its structure was checked
    units: int  # units in the checksum table (0 without one)
    units_checked: int
    bytes_read: int  # page data read to check the units
    seconds: float
    threads: int
    direct_io: bool
    save_id: str | None
    table_digest: str | None

    @property
    def gib_per_s(self) -> float:
        return self.bytes_read / self.seconds / (1 << 30) if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = "good"
        out["gib_per_s"] = round(self.gib_per_s, 3)
        out["algorithm"] = ALGORITHM if self.checksums else None
        out["unit_bytes"] = UNIT_BYTES if self.checksums else None
        return out


def parse_file_argument(text: str) -> tuple[str, int]:
    """`FILE[,offset=N]` (as in a file: URI) -> (path, offset); ValueError if bad. Split
    at the first `,offset=`, as QEMU's file_parse_offset and migd's FileTarget.parse
    split a file: URI, and the offset read as they read it ("4k" too): the file that
    verifies is the one `migrate-incoming file:TEXT` would read."""
    path, option, value = text.partition(_OFFSET_OPTION)
    if not path:
        raise ValueError(f"'{text}' names no file")
    return path, parse_offset(value) if option else 0


def _open_save(path: str, offset: int) -> tuple[int, int]:
    """(fd, size) of a regular file that starts a stream (or a piece of one) at `offset`."""
    try:
        fd = open_regular(path)  # a FIFO is refused without waiting for a writer
    except OSError as exc:
        raise NotASaveError(f"'{path}': {exc.strerror or exc}") from None
    except InspectError as exc:
        raise NotASaveError(f"'{path}': {exc}") from None
    try:
        _refuse_if_being_written(fd, path)
        st = os.fstat(fd)
        try:
            head = os.pread(fd, len(_MAGIC), offset) if offset < st.st_size else b""
        except OSError as exc:
            raise NotASaveError(f"'{path}': {exc.strerror or exc}") from None
        if not head:
            raise NotASaveError(f"'{path}': {format.empty_file_text(offset, st.st_size)}")
        if head != _MAGIC[: len(head)]:  # a shorter head that matches is a cut-short save
            raise NotASaveError(
                f"'{path}': not a QEMU/migd save file (no QEVM magic at offset {offset}, "
                f"found {head.hex()})"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _refuse_if_being_written(fd: int, path: str) -> None:
    try:
        refuse_if_being_written(fd)
    except InspectError as exc:
        raise FileInUse(f"'{path}': {exc}") from None


def _reader(fd: int, path: str) -> format.ReadAt:
    def read_at(at: int, n: int) -> bytes:
        try:
            return os.pread(fd, n, at)
        except OSError as exc:
            raise CorruptError(f"'{path}': read error at offset {at}: {exc.strerror}") from None

    return read_at


def check_structure(
    fd: int, path: str, offset: int, size: int
) -> tuple[format.ParsedStream, list[np.ndarray], checksum_table.ChecksumTable | None]:
    """The checks a restore makes before it reads a page: (stream, bitmaps, table)."""
    read_at = _reader(fd, path)
    try:
        parsed = format.parse_stream(read_at, offset, size)
        if not parsed.complete:
            raise FormatError(
                "save file is incomplete (no RAM end section: the save was interrupted or "
                "the file is truncated)"
            )
        bitmaps = [format.read_bitmap(read_at, block) for block in parsed.blocks]
        table = checksum_table.read_table(read_at, parsed, size)
    except FormatError as exc:
        raise CorruptError(f"'{path}': {exc.desc}") from None
    return parsed, bitmaps, table


def _direct_io_works(fd: int) -> bool:
    """One aligned O_DIRECT read at offset 0; EINVAL means the filesystem refuses it."""
    buffer = mmap.mmap(-1, mmap.PAGESIZE)  # page aligned, as O_DIRECT wants
    try:
        os.preadv(fd, [buffer], 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        buffer.close()
    return True


def open_readers(main_fd: int, path: str, count: int) -> tuple[list[int], bool]:
    """`count` fds of the file `main_fd` has open (the same inode, whatever its name now),
    O_DIRECT if the filesystem takes it: (fds, direct)."""
    same_file = f"/proc/self/fd/{main_fd}"
    flags = os.O_RDONLY | os.O_CLOEXEC
    direct = hasattr(os, "O_DIRECT")
    fds: list[int] = []
    try:
        if direct:
            try:
                fds.append(os.open(same_file, flags | os.O_DIRECT))
                direct = _direct_io_works(fds[0])
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                direct = False
            if not direct:
                for fd in fds:
                    os.close(fd)
                fds = []
        while len(fds) < count:
            fds.append(os.open(same_file, flags | (os.O_DIRECT if direct else 0)))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise CorruptError(f"'{path}': cannot open it again: {exc.strerror or exc}") from None
    return fds, direct


def _check_units(
    fds: list[int],
    path: str,
    blocks: list[FileBlock],
    progress: FileProgress,
    cancel: threading.Event,
    on_progress: Callable[[FileProgress], None] | None,
) -> None:
    """verify_file in a thread of its own, so that this (the main) thread keeps drawing
    progress and takes Ctrl-C: KeyboardInterrupt sets `cancel`, waits for the readers
    (each stops after its current unit) and goes on up."""
    errors: list[BaseException] = []
    # Waited for with an Event, not Thread.join: a join that Ctrl-C interrupts marks the
    # thread stopped while it still runs (CPython 3.11, bpo-45274), and a second join
    # would then return at once, with the readers still reading.
    finished = threading.Event()

    def run() -> None:
        try:
            verify_file(fds, path, blocks, cancel, progress)
        except BaseException as exc:  # handed to the main thread
            errors.append(exc)
        finally:
            finished.set()

    worker = threading.Thread(target=run, name="migd-verify-main", daemon=True)
    worker.start()
    try:
        while True:
            if on_progress is not None:
                on_progress(progress)
            if finished.wait(POLL_SECONDS):
                break
    except BaseException:
        cancel.set()
        finished.wait()
        raise
    worker.join()
    if on_progress is not None:
        on_progress(progress)
    if errors:
        error = errors[0]
        if isinstance(error, MigrationError):  # ChecksumMismatch, ChannelError: name the file
            raise CorruptError(error.desc) from None
        raise error
    if cancel.is_set():
        raise VerifyCancelled(f"'{path}': verify cancelled")
    if progress.units_done != progress.units_total:  # never call unchecked units good
        raise RuntimeError(
            f"'{path}': internal error: {progress.units_total - progress.units_done} of "
            f"{progress.units_total} units were not checked"
        )


def verify_save(
    path: str,
    offset: int,
    threads: int,
    *,
    cancel: threading.Event | None = None,
    on_progress: Callable[[FileProgress], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Check the save at `offset` of `path`; raises NotASaveError or CorruptError, or
    VerifyCancelled if `cancel` was set from elsewhere.

    `on_progress` is called about every POLL_SECONDS while units are checked; `warn`
    gets the one note that the filesystem refuses O_DIRECT. A set `cancel` (Ctrl-C)
    stops the readers; KeyboardInterrupt passes through once they have stopped.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    cancel = cancel if cancel is not None else threading.Event()
    started = time.monotonic()
    main_fd, size = _open_save(path, offset)
    try:
        parsed, bitmaps, table = check_structure(main_fd, path, offset, size)
        report = VerifyReport(
            path=path,
            offset=offset,
            blocks=len(parsed.blocks),
            pages=sum(b.pages for b in parsed.blocks),
            present_pages=sum(int(np.count_nonzero(b)) for b in bitmaps),
            checksums=table is not None,
            units=table.units if table is not None else 0,
            units_checked=0,
            bytes_read=0,
            seconds=0.0,
            threads=0,
            direct_io=False,
            save_id=table.save_id if table is not None else None,
            table_digest=table.table_digest if table is not None else None,
        )
        if table is not None:
            blocks = [
                FileBlock(layout.name, layout.pages_offset, layout.pages, present, digests)
                for layout, present, digests in zip(
                    parsed.blocks, bitmaps, table.digests, strict=True
                )
            ]
            fds, report.direct_io = open_readers(main_fd, path, threads)
            if not report.direct_io and warn is not None:
                warn(f"'{path}': the filesystem refuses O_DIRECT; reading through the page cache")
            report.threads = len(fds)
            progress = FileProgress(blocks)
            try:
                _check_units(fds, path, blocks, progress, cancel, on_progress)
            finally:
                for fd in fds:
                    os.close(fd)
            report.units_checked, report.bytes_read = progress.units_done, progress.bytes_read
        _refuse_if_being_written(main_fd, path)  # a save began meanwhile: no verdict
    except CorruptError:
        _refuse_if_being_written(main_fd, path)  # its writes, not corruption
        raise
    finally:
        os.close(main_fd)
    report.seconds = time.monotonic() - started
    return report
