"""The engine: admission (one job at a time, its checks), launch, status changes and
their events, cancel and shutdown, and the channel threads of a job.

What a job does to its file is in mapped_ram/save.py and restore.py, how its pages are
split among the threads in plan.py, the job itself (status, counters) in job.py; the
asyncio side never waits for I/O, so query-migrate answers from counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import ChannelError, MigdError, MigrationError
from ..io.target import FileTarget
from ..io.threads import (
    BlockIO,
    Channel,
    PageRun,
    Populator,
    open_channel_fd,
)
from ..io.throttle import Throttle
from ..pages import PAGE_SIZE
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
from . import plan, settings
from .job import (
    STRICT_STATUS_ENV,
    TRANSITIONS,
    IllegalTransition,
    Job,
    JobCancelled,
    JobStats,
    MigrationStatus,
    check_cancel,
)
from .mapped_ram import format, restore, save
from .settings import Capabilities, Parameters

log = logging.getLogger(__name__)

IN_PROGRESS = "There's a migration process in progress"
SAMPLE_PERIOD = 0.1  # seconds between throughput samples (QEMU's BUFFER_DELAY)
STOP_TIMEOUT = 1.5  # seconds a shutdown waits for a cancelled job (SIGTERM ends in < 2 s)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _reopener(main_fd: int) -> FileOpener:
    """An open_file that reopens the main fd's file, whatever its name is now."""

    def reopen(_path: str, flags: int, mode: int) -> int:
        return os.open(f"/proc/self/fd/{main_fd}", flags | os.O_CLOEXEC)

    return reopen


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
        """`changes`: Capabilities field names -> new state, checked as a whole set."""
        self.refuse_if_busy()
        self.caps = settings.apply_capabilities(self.caps, changes, self.params)

    def set_parameters(self, changes: dict[str, Any]) -> None:
        """`changes`: Parameters field names -> new values, checked as a whole set."""
        # As in QEMU, max-bandwidth may change during a migration and applies at once; the
        # others shape how a migration sets up, so they wait until none is running.
        if set(changes) - {"max_bandwidth"}:
            self.refuse_if_busy()
        self.params = settings.apply_parameters(self.params, changes, self.caps)
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

    def query(self) -> JobStats | None:
        """The last job's stats, None before any."""
        return None if self.job is None else self.job.stats()

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

    def _activate(self, job: Job) -> None:
        """setup -> active once the channels are ready, unless a cancel came meanwhile: the
        job then ends cancelled, as `cancelling` never goes back to `active`."""
        check_cancel(job)
        job.setup_done = time.monotonic()
        self._set_status(job, MigrationStatus.active)

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
            parsed = await asyncio.to_thread(restore.parse, main_fd, target, self.caps.mapped_ram)
            matched, skipped = plan.match_blocks(self.memory, parsed, target, skip_unmatched)
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
        check_cancel(job)
        # A file cut short after the channels were done with its pages faults no thread,
        # but what was restored into the lost pages is gone: the job must not complete.
        for block in blocks:
            shrunk = block.check_size(direction) if block.check_size is not None else None
            if shrunk is not None:
                raise shrunk

    async def _save(self, job: Job, layout: format.SaveLayout, main_fd: int) -> None:
        await asyncio.to_thread(save.write_head, job, layout, main_fd)
        check_cancel(job)
        fds = await self._open_channels(job, os.O_WRONLY, main_fd)
        try:
            # SEEK_DATA walks and run splitting take tens of ms on large memory: off the loop.
            detect = self.params.zero_page_detection != "none"
            blocks, runs = await asyncio.to_thread(plan.plan_save_runs, job, layout, detect)
            self._activate(job)
            await self._run_channels(job, fds, blocks, runs, "save")
            job.sync_count = 1
            await asyncio.to_thread(save.finish_save, job, layout, blocks, fds, main_fd)
        finally:
            for fd in fds:
                if fd != main_fd:
                    self.closer(fd)

    async def _restore(
        self, job: Job, matched: Sequence[tuple[format.BlockLayout, MemoryBackend]], main_fd: int
    ) -> None:
        path = job.target.path

        # Every check is done before the first byte of any backend changes.
        bitmaps = await asyncio.to_thread(restore.read_bitmaps, job, matched, main_fd)
        plan.check_room(
            path,
            [
                (b, int(present.sum()) * PAGE_SIZE)
                for (_, b), present in zip(matched, bitmaps, strict=True)
            ],
        )
        check_cancel(job)
        fds = await self._open_channels(job, os.O_RDONLY, main_fd)
        try:
            blocks, runs = plan.plan_restore_runs(matched, bitmaps)
            self._activate(job)
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
