"""The migration job: status machine, capabilities and parameters, save and restore.

The asyncio side plans the file with `format`, does the small metadata I/O through the
main fd in worker threads, and deals page runs to the `channels` threads; query-migrate
answers from counters and never waits for I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import __version__
from ..errors import ChannelError, MigdError, MigrationError
from ..io.target import FileTarget
from ..io.threads import (
    BlockIO,
    Channel,
    PageRun,
    Populator,
    open_channel_fd,
    read_upto,
    split_runs,
    write_fully,
)
from ..io.throttle import Throttle
from ..pages import PAGE_SIZE, READ_CHUNK_PAGES
from ..state.fdsets import is_fdset_path
from ..state.memory import MemoryBackend, MemoryRegistry
from ..state.partial import PartialMarks
from ..state.paths import (
    ChannelOpener,
    FileOpener,
    open_regular,
    plain_open,
    remove_created,
    trusted_owners,
)
from .mapped_ram import format
from .settings import Capabilities, Parameters

log = logging.getLogger(__name__)

IN_PROGRESS = "There's a migration process in progress"
SAMPLE_PERIOD = 0.1  # seconds between throughput samples (QEMU's BUFFER_DELAY)
STOP_TIMEOUT = 1.5  # seconds a shutdown waits for a cancelled job (SIGTERM ends in < 2 s)


class MigrationStatus(enum.StrEnum):
    none = "none"
    setup = "setup"
    cancelling = "cancelling"
    cancelled = "cancelled"
    active = "active"
    completed = "completed"
    failed = "failed"


ACTIVE_STATES = {MigrationStatus.setup, MigrationStatus.active, MigrationStatus.cancelling}

_S = MigrationStatus
# The status changes a job may make; anything else is a bug in the engine. A cancel that
# comes after the last check still lets the job complete (or fail), as in QEMU.
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    _S.none: frozenset({_S.setup}),
    _S.setup: frozenset({_S.active, _S.failed, _S.cancelling}),
    _S.active: frozenset({_S.completed, _S.failed, _S.cancelling}),
    _S.cancelling: frozenset({_S.cancelled, _S.failed, _S.completed}),
    _S.completed: frozenset(),
    _S.failed: frozenset(),
    _S.cancelled: frozenset(),
}
# Set by the test suite: an illegal status change raises instead of only being logged.
STRICT_STATUS_ENV = "MIGD_STRICT_STATUS"


class IllegalTransition(Exception):
    """A status change TRANSITIONS does not allow (raised only under MIGD_STRICT_STATUS)."""


class JobCancelled(Exception):
    pass


def _pwrite_all(fd: int, data: bytes, offset: int, path: str) -> None:
    """Metadata through pwrite (page data goes through pwritev)."""
    write_fully(fd, memoryview(data), offset, path, vectored=False)


def _pread_all(fd: int, offset: int, n: int, path: str) -> bytes:
    """Up to n bytes at offset: fewer where the file ends, which the format reports."""
    buf = bytearray(n)
    got = read_upto(fd, memoryview(buf), offset, path)
    return bytes(buf[:got])


def _fdatasync(fd: int, path: str) -> None:
    try:
        os.fdatasync(fd)
    except OSError as exc:
        raise ChannelError(f"Could not sync '{path}': {exc.strerror}") from None


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _reopener(main_fd: int) -> FileOpener:
    """An open_file that reopens the main fd's file, whatever its name is now."""

    def reopen(_path: str, flags: int, mode: int) -> int:
        return os.open(f"/proc/self/fd/{main_fd}", flags | os.O_CLOEXEC)

    return reopen


def _check_room(path: str, needs: Sequence[tuple[MemoryBackend, int]]) -> None:
    """Refuse a restore whose pages cannot fit in the backends' filesystems.

    Restoring into a tmpfs file allocates its pages; once the filesystem is full the reads
    would fail half-way with EFAULT. Per filesystem: the bytes to read must fit in its
    free space plus what the backend files already hold (overwriting that needs no room).
    """
    by_device: dict[int, tuple[int, int, list[str]]] = {}
    for backend, needed in needs:
        room = backend.room()
        if room is None or needed == 0:
            continue
        dev, free, allocated = room
        total, have, names = by_device.get(dev, (0, free, []))
        by_device[dev] = (total + needed, have + allocated, [*names, backend.id])
    for total, have, names in by_device.values():
        if total > have:
            which = ", ".join(f"'{n}'" for n in names)
            raise MigrationError(
                f"Could not restore '{path}': memory backends {which} need {total} bytes, "
                f"but their filesystem has room for {have}"
            )


@dataclass
class Job:
    """One save or restore, from `setup` to a final status."""

    direction: str  # "save" | "restore"
    target: FileTarget
    backends: list[MemoryBackend]
    total_bytes: int
    status: MigrationStatus = MigrationStatus.none
    started: float = field(default_factory=time.monotonic)
    setup_done: float | None = None
    finished: float | None = None
    error_desc: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    channels: list[Channel] = field(default_factory=list)
    throttle: Throttle | None = None  # while the channels run: max-bandwidth can change
    hole_pages: int = 0  # pages known zero without touching memory (file holes)
    main_bytes: int = 0
    task: asyncio.Task[None] | None = None
    skipped_blocks: list[str] = field(default_factory=list)
    sync_count: int = 0
    memory_touched: bool = False  # restore: some backend may already hold new data
    _samples: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES

    def totals(self) -> tuple[int, int, int, int, int]:
        """(bytes moved, pages done, normal pages, zero pages, multifd bytes) right now."""
        moved = normal = zero = done = 0
        for ch in self.channels:
            c = ch.counters
            moved += c.bytes
            done += c.pages_done
            normal += c.pages_normal
            zero += c.pages_zero
        return (
            moved + self.main_bytes,
            done + self.hole_pages,
            normal,
            zero + self.hole_pages,
            moved,
        )

    def sample(self) -> None:
        moved, done, *_ = self.totals()
        now = time.monotonic()
        self._samples.append((now, moved, done))
        # Keep about one second: mbps is measured over the recent window, as QEMU's is.
        while len(self._samples) > 2 and now - self._samples[0][0] > 1.0:
            self._samples.pop(0)

    def rates(self) -> tuple[float, float]:
        """(mbps, pages per second) over the recent window, or over the whole job when done."""
        moved, done, *_ = self.totals()
        if self.finished is not None:
            span = self.finished - (self.setup_done or self.started)
            if span <= 0:
                return 0.0, 0.0
            return moved * 8 / span / 1e6, done / span
        if len(self._samples) < 2:
            return 0.0, 0.0
        (t0, b0, p0), (t1, b1, p1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return 0.0, 0.0
        return (b1 - b0) * 8 / (t1 - t0) / 1e6, (p1 - p0) / (t1 - t0)

    def info(self) -> dict[str, Any]:
        """query-migrate's MigrationInfo, from counters only."""
        end = self.finished if self.finished is not None else time.monotonic()
        out: dict[str, Any] = {"status": self.status.value}
        out["total-time"] = int((end - self.started) * 1000)
        if self.setup_done is not None:
            out["setup-time"] = int((self.setup_done - self.started) * 1000)
        if self.error_desc is not None:
            out["error-desc"] = self.error_desc
        moved, done, normal, zero, multifd = self.totals()
        mbps, pps = self.rates()
        remaining = (
            0 if self.status == MigrationStatus.completed else (self.total_bytes - done * PAGE_SIZE)
        )
        out["ram"] = {
            "transferred": moved,
            "remaining": max(0, remaining),
            "total": self.total_bytes,
            "duplicate": zero,
            "normal": normal,
            "normal-bytes": normal * PAGE_SIZE,
            "dirty-pages-rate": 0,
            "mbps": round(mbps, 3),
            "dirty-sync-count": self.sync_count,
            "postcopy-requests": 0,
            "page-size": PAGE_SIZE,
            "multifd-bytes": multifd,
            "pages-per-second": int(pps),
            "precopy-bytes": moved,
            "downtime-bytes": 0,
            "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0,
        }
        if self.skipped_blocks:
            out["x-skipped-blocks"] = list(self.skipped_blocks)
        return out


class MigrationEngine:
    """Owns capabilities, parameters and at most one running job."""

    def __init__(
        self,
        memory: MemoryRegistry,
        emit: Callable[[str, dict[str, Any]], None] = lambda name, data: None,
        notify: Callable[[str], None] = lambda state: None,
        opener: ChannelOpener = open_channel_fd,
        closer: Callable[[int], None] = _close_quietly,
        open_file: FileOpener = plain_open,
    ) -> None:
        self.memory = memory
        self.emit = emit
        self.notify = notify
        self.opener = opener  # /dev/fdset/N: dups from the set, matched by flags
        self.open_file = open_file  # named files (the allowed-dirs policy's open)
        self.closer = closer  # closes what opener opened (fdset dups are tracked)
        self.caps = Capabilities()
        self.params = Parameters()
        self.job: Job | None = None
        self.partial = PartialMarks()  # the daemon gives it a state directory

    # -- settings ------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.active

    def refuse_if_busy(self) -> None:
        if self.busy:
            raise MigrationError(IN_PROGRESS)

    def set_capabilities(self, changes: dict[str, bool]) -> None:
        """`changes`: Capabilities field names -> new state."""
        self.refuse_if_busy()
        self.caps = dataclasses.replace(self.caps, **changes)

    def set_parameters(self, changes: dict[str, Any]) -> None:
        # As in QEMU, max-bandwidth may change during a migration and applies at once; the
        # others shape how a migration sets up, so they wait until none is running.
        if set(changes) - {"max_bandwidth"}:
            self.refuse_if_busy()
        if changes.get("direct_io") and not hasattr(os, "O_DIRECT"):
            raise MigrationError("No build-time support for direct-io")
        self.params = dataclasses.replace(self.params, **changes)
        job = self.job
        if "max_bandwidth" in changes and job is not None and job.throttle is not None:
            job.throttle.set_rate(self.params.max_bandwidth)

    @property
    def direct_io_effective(self) -> bool:
        # QEMU's rule: direct-io only takes effect with multifd and mapped-ram.
        return self.params.direct_io and self.caps.multifd and self.caps.mapped_ram

    @property
    def channel_count(self) -> int:
        return self.params.multifd_channels if self.caps.multifd else 1

    def query(self) -> dict[str, Any]:
        return {} if self.job is None else self.job.info()

    # -- status --------------------------------------------------------------------------

    def _set_status(self, job: Job, status: MigrationStatus) -> None:
        """The one place a job's status changes; it also emits the event."""
        if status not in TRANSITIONS[job.status]:
            text = f"{job.direction} {job.target}: illegal status change {job.status} -> {status}"
            log.error("%s", text)
            if os.environ.get(STRICT_STATUS_ENV) == "1":
                raise IllegalTransition(text)
        job.status = status
        if status in (MigrationStatus.completed, MigrationStatus.failed, MigrationStatus.cancelled):
            job.finished = time.monotonic()
        log.info(
            "%s %s: %s%s",
            job.direction,
            job.target,
            status.value,
            f" ({job.error_desc})" if job.error_desc else "",
        )
        if self.caps.events:
            self.emit("MIGRATION", {"status": status.value})
        self.notify(f"STATUS={job.direction} {status.value}")

    # -- starting ------------------------------------------------------------------------

    def _check_can_start(self) -> None:
        self.refuse_if_busy()
        if not self.caps.mapped_ram:
            raise MigrationError(
                "migd writes and reads only the mapped-ram layout: enable the 'mapped-ram' "
                "capability with migrate-set-capabilities"
            )

    async def start_save(self, target: FileTarget, peer_uid: int | None = None) -> None:
        """Checks, open the main fd (off the loop), then run the save in the background."""
        self._check_can_start()
        backends = list(self.memory)
        if not backends:
            raise MigrationError("There is no memory backend to save: add one with object-add")
        layout = format.plan_save([(b.block_name, b.size) for b in backends], target.offset)
        main_fd, created = await self._open_main(target.path, os.O_WRONLY, True, peer_uid)
        try:
            self._refuse_backend_file(
                main_fd, target.path, "a save to it would overwrite that memory"
            )
            self.refuse_if_busy()  # another request may have started one while we opened
        except BaseException:
            if created:
                remove_created(target.path, main_fd)
            self.closer(main_fd)
            raise
        job = Job("save", target, backends, sum(b.size for b in backends))
        self._launch(job, self._save(job, layout, main_fd), main_fd)

    async def start_restore(
        self, target: FileTarget, skip_unmatched: bool, peer_uid: int | None = None
    ) -> None:
        """Open and validate the file's head and blocks, then restore in the background."""
        self._check_can_start()
        main_fd, _ = await self._open_main(target.path, os.O_RDONLY, False, peer_uid)
        try:
            self._refuse_backend_file(
                main_fd, target.path, "a restore would overwrite the save while reading it"
            )
            parsed = await asyncio.to_thread(self._parse, main_fd, target)
            matched, skipped = self._match_blocks(parsed, target, skip_unmatched)
        except BaseException:
            self.closer(main_fd)
            raise
        self.refuse_if_busy()  # another request may have started one while we parsed
        backends = [b for _, b in matched]
        job = Job("restore", target, backends, sum(layout.length for layout, _ in matched))
        job.skipped_blocks = [layout.name for layout in skipped]
        self._launch(job, self._restore(job, matched, main_fd), main_fd)

    async def _open_main(
        self, path: str, flags: int, create: bool, peer_uid: int | None
    ) -> tuple[int, bool]:
        """The job's main fd -> (fd, created), opened in a worker thread: a file on a hung
        or slow filesystem must not stop the loop. A passed fd (/dev/fdset/N) is a dup
        from its set; a named file must pass paths.open_regular's rules."""
        if is_fdset_path(path):
            # O_CREAT only for QEMU's matching-flags text: a set's fds are never created.
            creat = os.O_CREAT if create else 0
            return await asyncio.to_thread(self.opener, path, flags | creat, False), False
        try:
            return await asyncio.to_thread(
                open_regular,
                path,
                flags,
                create=create,
                owners=trusted_owners(peer_uid),
                open_file=self.open_file,
            )
        except OSError as exc:
            raise ChannelError(
                f"Could not open '{path}': {os.strerror(exc.errno or errno.EIO)}"
            ) from None

    def _refuse_backend_file(self, fd: int, path: str, consequence: str) -> None:
        """Refuse a job whose file is a memory backend's own file, by device and inode:
        the save would truncate the memory it reads, the restore overwrite the file it
        reads from, each reporting success."""
        st = os.fstat(fd)
        for backend in self.memory:
            if backend.file_identity() == (st.st_dev, st.st_ino):
                raise MigrationError(
                    f"'{path}' is the memory file of memory backend '{backend.id}' "
                    f"('{backend.mem_path}'): {consequence}"
                )

    def _parse(self, fd: int, target: FileTarget) -> format.ParsedStream:
        size = os.fstat(fd).st_size
        try:
            parsed = format.parse_stream(
                lambda at, n: _pread_all(fd, at, n, target.path),
                target.offset,
                size,
                require_mapped_ram=self.caps.mapped_ram,
            )
        except format.FormatError as exc:
            raise MigrationError(f"'{target.path}': {exc.desc}") from None
        if not parsed.complete:
            raise MigrationError(
                f"'{target.path}': save file is incomplete (no RAM end section: the save "
                "was interrupted or the file is truncated)"
            )
        return parsed

    def _match_blocks(
        self, parsed: format.ParsedStream, target: FileTarget, skip_unmatched: bool
    ) -> tuple[list[tuple[format.BlockLayout, MemoryBackend]], list[format.BlockLayout]]:
        matched, skipped = [], []
        for layout in parsed.blocks:
            backend = self.memory.by_block_name(layout.name)
            if backend is None:
                if skip_unmatched:
                    skipped.append(layout)
                    continue
                raise MigrationError(f'Unknown ramblock "{layout.name}", cannot accept migration')
            if backend.size != layout.length:
                raise MigrationError(
                    f"Length mismatch: block '{layout.name}' is {layout.length} bytes in "
                    f"'{target.path}' but memory backend '{backend.id}' has {backend.size} bytes"
                )
            matched.append((layout, backend))
        if not matched:
            raise MigrationError(f"'{target.path}': no block in the file has a memory backend")
        return matched, skipped

    def _launch(self, job: Job, body: Any, main_fd: int) -> None:
        for b in job.backends:
            b.in_use += 1
        self.job = job
        self._set_status(job, MigrationStatus.setup)
        job.task = asyncio.create_task(self._run(job, body, main_fd))

    async def _run(self, job: Job, body: Any, main_fd: int) -> None:
        sampler = asyncio.create_task(self._sample(job))
        try:
            await body
            self._set_status(job, MigrationStatus.completed)
        except JobCancelled:
            if job.direction == "restore":
                job.error_desc = self._partial_note(job, "Restore cancelled")
            self._set_status(job, MigrationStatus.cancelled)
        except MigdError as exc:  # ChannelError included: I/O failures name the file
            text = exc.desc
            job.error_desc = self._partial_note(job, text) if job.direction == "restore" else text
            self._set_status(job, MigrationStatus.failed)
        except Exception as exc:  # a bug: fail the job, keep the daemon
            log.exception("migration job crashed")
            job.error_desc = f"Internal error: {type(exc).__name__}: {exc}"
            self._set_status(job, MigrationStatus.failed)
        finally:
            sampler.cancel()
            self.closer(main_fd)
            for b in job.backends:
                b.in_use -= 1

    @staticmethod
    def _partial_note(job: Job, text: str) -> str:
        if not job.memory_touched:
            return f"{text}; no memory backend was changed"
        names = ", ".join(f"'{b.id}'" for b in job.backends)
        return f"{text}; memory backends {names} hold partial data"

    async def _sample(self, job: Job) -> None:
        last_notify = 0.0
        while True:
            job.sample()
            now = time.monotonic()
            if now - last_notify >= 1.0 and job.status == MigrationStatus.active:
                last_notify = now
                _, done, *_ = job.totals()
                mbps, _ = job.rates()
                pct = 100 * done * PAGE_SIZE / max(1, job.total_bytes)
                self.notify(f"STATUS={job.direction} {pct:.0f}% at {mbps / 8:.0f} MB/s")
            await asyncio.sleep(SAMPLE_PERIOD)

    # -- cancel / shutdown ---------------------------------------------------------------

    async def cancel(self) -> None:
        """migrate_cancel: tell the threads to stop and answer at once, in `cancelling`, as
        QEMU does; the job ends in `cancelled` once its threads have stopped, within an
        I/O call (channels.CALL_SECONDS on any disk) and its fds are closed."""
        job = self.job
        if job is None or not job.active:
            return
        if job.status != MigrationStatus.cancelling:
            job.cancel.set()
            self._set_status(job, MigrationStatus.cancelling)

    async def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Shutdown: cancel, and give the job `timeout` seconds to stop. A thread still in a
        syscall after that is not waited for here: the daemon goes on closing, and a save
        left behind stays incomplete (no end section), which readers refuse."""
        await self.cancel()
        job = self.job
        if job is None or job.task is None or job.task.done():
            return
        done, _ = await asyncio.wait({job.task}, timeout=timeout)
        if not done:
            log.warning("%s %s: still stopping after %.1f s, not waiting for it",
                        job.direction, job.target, timeout)  # fmt: skip

    # -- the two directions --------------------------------------------------------------

    def _check_cancel(self, job: Job) -> None:
        if job.cancel.is_set():
            raise JobCancelled()

    async def _open_channels(self, job: Job, flags: int, main_fd: int) -> list[int]:
        """One fd per channel; without multifd the main fd is the only channel.

        Every channel fd is the main fd's file: a named file is reopened through
        /proc/self/fd/N of the main fd, never by its name again (a name replaced
        meanwhile would mix pages of two files). A passed fdset gives dups matched by
        flags, as QEMU's; they must be the main fd's file too.
        """
        if not self.caps.multifd:
            return [main_fd]
        path = job.target.path
        if is_fdset_path(path):
            opener = self.opener
        else:
            opener = functools.partial(open_channel_fd, open_file=_reopener(main_fd))
        main = os.fstat(main_fd)
        fds: list[int] = []
        try:
            for _ in range(self.params.multifd_channels):
                fd = await asyncio.to_thread(opener, path, flags, self.direct_io_effective)
                fds.append(fd)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (main.st_dev, main.st_ino):
                    raise ChannelError(
                        f"'{path}': a channel's fd is not the file the migration opened "
                        "(the fdset holds fds of different files)"
                    )
        except BaseException:
            for fd in fds:
                self.closer(fd)
            raise
        return fds

    async def _run_channels(
        self,
        job: Job,
        fds: Sequence[int],
        blocks: Sequence[BlockIO],
        runs: Sequence[PageRun],
        direction: str,
    ) -> None:
        work: queue.SimpleQueue[PageRun | None] = queue.SimpleQueue()
        for run in runs:
            work.put(run)
        for _ in fds:
            work.put(None)
        throttle = job.throttle = Throttle(self.params.max_bandwidth)
        detect = self.params.zero_page_detection != "none"
        # Buffered saves keep their dirty page cache small, so that neither the final sync
        # nor a stop has to wait for the whole save to reach a slow disk.
        write_behind = direction == "save" and not self.direct_io_effective
        job.channels = [
            Channel(fd, job.target.path, blocks, work, job.cancel, throttle, detect, write_behind)
            for fd in fds
        ]
        # The populator is first in the list, so that its error (out of memory, on restore)
        # is the one reported, not the EFAULT that reads into memory that cannot be
        # allocated get meanwhile.
        populator = Populator(blocks, runs, job.cancel)
        threads: list[Channel | Populator] = [populator, *job.channels]
        bodies = [populator.run, *(getattr(ch, direction) for ch in job.channels)]
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(len(bodies), thread_name_prefix=f"migd-{direction}") as pool:
            try:
                futures = [loop.run_in_executor(pool, body) for body in bodies]
                results = await asyncio.gather(*futures, return_exceptions=True)
            except BaseException:
                # This task cancelled, or a thread that could not start: leaving the pool
                # waits for its threads, so they must be told to stop first.
                job.cancel.set()
                raise
        for thread in threads:
            thread.blocks = ()  # drop the mmap views so object-del really unmaps afterwards
        del threads, bodies
        failures = [r for r in results if isinstance(r, BaseException)]
        del results, futures
        if failures:
            job.cancel.set()
            # The thread frames an error reaches hold views of the backends' mappings:
            # cut them (and any cycle through this frame) so object-del can unmap at once.
            error = failures.pop(0)
            error.__context__ = error.__cause__ = None
            try:
                raise error.with_traceback(None)
            finally:
                del error, failures
        self._check_cancel(job)
        # A file cut short after the channels were done with its pages faults no thread,
        # but what was restored into the lost pages is gone: the job must not complete.
        for block in blocks:
            shrunk = block.check_size(direction) if block.check_size is not None else None
            if shrunk is not None:
                raise shrunk

    async def _save(self, job: Job, layout: format.SaveLayout, main_fd: int) -> None:
        path = job.target.path

        def write_head() -> None:
            try:
                os.ftruncate(main_fd, layout.offset)
            except OSError as exc:
                raise ChannelError(
                    f"Could not truncate '{path}' to offset {layout.offset}: {exc.strerror}"
                ) from None
            for at, data in layout.head_writes:
                _pwrite_all(main_fd, data, at, path)
                job.main_bytes += len(data)

        await asyncio.to_thread(write_head)
        self._check_cancel(job)
        fds = await self._open_channels(job, os.O_WRONLY, main_fd)
        try:
            # SEEK_DATA walks and run splitting take tens of ms on large memory: off the loop.
            blocks, runs = await asyncio.to_thread(self._plan_save_runs, job, layout)
            job.setup_done = time.monotonic()
            self._set_status(job, MigrationStatus.active)
            await self._run_channels(job, fds, blocks, runs, "save")
            job.sync_count = 1
            await asyncio.to_thread(self._finish_save, job, layout, blocks, fds, main_fd)
        finally:
            for fd in fds:
                if fd != main_fd:
                    self.closer(fd)

    def _plan_save_runs(
        self, job: Job, layout: format.SaveLayout
    ) -> tuple[list[BlockIO], list[PageRun]]:
        blocks: list[BlockIO] = []
        runs: list[PageRun] = []
        detect = self.params.zero_page_detection != "none"
        for index, (backend, block) in enumerate(zip(job.backends, layout.blocks, strict=True)):
            present = np.zeros(block.pages, dtype=bool)
            view = backend.view(0, backend.size)
            blocks.append(
                BlockIO(
                    block,
                    view,
                    present,
                    populate=backend.prefault,
                    explain_fault=backend.fault_error,
                    check_size=backend.shrink_error,
                )
            )
            # Holes of a file-backed backend are zero pages found without touching memory.
            ranges = backend.data_ranges() if detect else None
            if ranges is None:
                ranges = [(0, backend.size)]
            page_runs = [(off // PAGE_SIZE, length // PAGE_SIZE) for off, length in ranges]
            job.hole_pages += block.pages - sum(count for _, count in page_runs)
            runs += split_runs(index, page_runs)
        return blocks, runs

    def _finish_save(
        self,
        job: Job,
        layout: format.SaveLayout,
        blocks: Sequence[BlockIO],
        fds: Sequence[int],
        main_fd: int,
    ) -> None:
        """Pages durable, then bitmaps durable, then the end section and EOF durable.

        A file only reads as complete once its end section is on disk; syncing the
        bitmaps before writing it means a power cut can never leave a "complete" file
        whose bitmaps are still zeros (a restore of it would give all-zero memory).
        """
        path = job.target.path
        for fd in fds:
            _fdatasync(fd, path)
        self._check_cancel(job)
        described = []
        for block in blocks:
            data = format.encode_bitmap(block.present, block.layout.bitmap_size)
            _pwrite_all(main_fd, data, block.layout.bitmap_offset, path)
            job.main_bytes += len(data)
            described.append(
                {
                    "name": block.layout.name,
                    "pages": block.layout.pages,
                    "present": int(np.count_nonzero(block.present)),
                    "bitmap-sha256": format.bitmap_digest(data),
                }
            )
        _fdatasync(main_fd, path)
        _, _, normal, zero, _ = job.totals()
        vmdesc = {
            "migd": {
                "version": __version__,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "blocks": described,
                "normal-pages": normal,
                "zero-pages": zero,
            }
        }
        end = layout.encode_end(vmdesc)
        _pwrite_all(main_fd, end, layout.end_offset, path)
        job.main_bytes += len(end)
        _fdatasync(main_fd, path)

    async def _restore(
        self, job: Job, matched: Sequence[tuple[format.BlockLayout, MemoryBackend]], main_fd: int
    ) -> None:
        path = job.target.path

        def read_bitmaps() -> list[np.ndarray]:
            out = []
            for layout, _ in matched:
                try:
                    # Checked against the counts and digest of a migd file's description.
                    out.append(
                        format.read_bitmap(lambda at, n: _pread_all(main_fd, at, n, path), layout)
                    )
                except format.FormatError as exc:
                    raise MigrationError(f"'{path}': {exc.desc}") from None
                job.main_bytes += layout.bitmap_size
            return out

        # Every check is done before the first byte of any backend changes.
        bitmaps = await asyncio.to_thread(read_bitmaps)
        _check_room(
            path,
            [
                (b, int(present.sum()) * PAGE_SIZE)
                for (_, b), present in zip(matched, bitmaps, strict=True)
            ],
        )
        self._check_cancel(job)
        fds = await self._open_channels(job, os.O_RDONLY, main_fd)
        try:
            blocks: list[BlockIO] = []
            runs: list[PageRun] = []
            for index, ((layout, backend), present) in enumerate(
                zip(matched, bitmaps, strict=True)
            ):
                blocks.append(
                    BlockIO(
                        layout,
                        backend.view(0, backend.size),
                        present,
                        backend.zero_range,
                        backend.populate,
                        backend.fault_error,
                        backend.shrink_error,
                    )
                )
                runs += split_runs(index, format.set_runs(~present), zero=True)
                runs += split_runs(index, format.set_runs(present), chunk=READ_CHUNK_PAGES)
            job.setup_done = time.monotonic()
            self._set_status(job, MigrationStatus.active)
            # Durable before the first page changes; only a completed restore removes it.
            await asyncio.to_thread(self.partial.set_all, job.backends, path)
            job.memory_touched = True
            await self._run_channels(job, fds, blocks, runs, "restore")
            job.sync_count = 1
        finally:
            for fd in fds:
                if fd != main_fd:
                    self.closer(fd)
        await asyncio.to_thread(self.partial.clear_all, job.backends)
