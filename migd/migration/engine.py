"""The engine: admission (one job at a time, its checks), launch, status changes and
their events, cancel and shutdown.

The seams do the rest: the job's target (io/target.py) opens and closes its fds, the I/O
engine (io/engine.py; `threads` by default) moves its page runs, mapped_ram/save.py and
restore.py do its own file I/O, plan.py splits its pages into runs, and job.py holds its
status and counters; the asyncio side never waits for I/O, so query-migrate answers from
counters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import MigdError, MigrationError
from ..io.checksums import ChecksumMismatch, UnitChecksums
from ..io.engine import BlockIO, IOEngine, PageRun, Transfer, check_sizes, load_engine
from ..io.file_verify import FileProgress, verify_file
from ..io.target import Openers, Target, close_quietly, open_channel_fd
from ..io.throttle import Throttle
from ..pages import PAGE_SIZE
from ..state.memory import MemoryBackend, MemoryRegistry
from ..state.partial import PartialMarks
from ..state.paths import ChannelOpener, FileOpener, plain_open
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
from .mapped_ram import checksum_table, format, restore, save
from .settings import Capabilities, Parameters

log = logging.getLogger(__name__)

IN_PROGRESS = "There's a migration process in progress"
SAMPLE_PERIOD = 0.1  # seconds between throughput samples (QEMU's BUFFER_DELAY)
STOP_TIMEOUT = 1.5  # seconds a shutdown waits for a cancelled job (SIGTERM ends in < 2 s)


class MigrationEngine:
    """Owns capabilities, parameters and at most one running job."""

    def __init__(
        self,
        memory: MemoryRegistry,
        emit: Callable[[str, dict[str, Any]], None] = lambda name, data: None,
        notify: Callable[[str], None] = lambda state: None,
        opener: ChannelOpener = open_channel_fd,
        closer: Callable[[int], None] = close_quietly,
        open_file: FileOpener = plain_open,
        io_engine: IOEngine | None = None,
    ) -> None:
        self.memory = memory
        self.emit = emit
        self.notify = notify
        # The daemon's policies for the fds a job's target opens.
        self.openers = Openers(fdset=opener, named=open_file, close=closer)
        self.io_engine = io_engine if io_engine is not None else load_engine()
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
    def detect_zero(self) -> bool:
        # 'legacy' and 'multifd' give the same file here: zero runs are skipped either way.
        return self.params.zero_page_detection != "none"

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

    def _pass(self, job: Job, number: int) -> None:
        """A save's RAM pass `number` begins: QEMU's dirty-sync-count and MIGRATION_PASS
        (QEMU syncs the dirty bitmap, and emits the event, as the pass starts and at the
        switchover; a stopped guest has nothing dirty, so there is one pass and the final
        sync)."""
        job.sync_count = number
        if number == 2:
            job.switchover = time.monotonic()
            job.switchover_main_bytes = job.main_bytes
        if self.caps.events:
            self.emit("MIGRATION_PASS", {"pass": number})

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

    async def start_save(
        self, target: Target, peer_uid: int | None = None, checksums: bool = True
    ) -> None:
        """Checks, open the main fd (off the loop), then run the save in the background;
        `checksums`: record unit checksums (docs/checksums.md)."""
        self._check_can_start()
        backends = list(self.memory)
        if not backends:
            raise MigrationError("There is no memory backend to save: add one with object-add")
        layout = format.plan_save([(b.block_name, b.size) for b in backends], target.offset)
        # In a worker thread: a file on a hung or slow filesystem must not stop the loop.
        main_fd = await asyncio.to_thread(target.open_main, self.openers, "save", peer_uid)
        try:
            self._refuse_backend_file(
                main_fd, target.path, "a save to it would overwrite that memory"
            )
            self.refuse_if_busy()  # another request may have started one while we opened
        except BaseException:
            target.discard()
            raise
        job = Job("save", target, backends, sum(b.size for b in backends))
        job.expected_downtime = self.params.downtime_limit
        job.save_id = uuid.uuid4().hex
        self._launch(job, self._save(job, layout, main_fd, checksums))

    async def start_restore(
        self,
        target: Target,
        skip_unmatched: bool,
        peer_uid: int | None = None,
        verify: str = "on",
    ) -> None:
        """Open and validate the file's head and blocks, then restore in the background.

        `verify`: "on" checks each unit against the file's checksums as it lands, "off"
        does not, "before-write" also checks the whole file before any memory changes.
        """
        self._check_can_start()
        main_fd = await asyncio.to_thread(target.open_main, self.openers, "restore", peer_uid)
        try:
            self._refuse_backend_file(
                main_fd, target.path, "a restore would overwrite the save while reading it"
            )
            parsed = await asyncio.to_thread(restore.parse, main_fd, target, self.caps.mapped_ram)
            matched, skipped = plan.match_blocks(self.memory, parsed, target, skip_unmatched)
            table = None
            if verify != "off":
                table = await asyncio.to_thread(restore.read_checksums, main_fd, target, parsed)
        except BaseException:
            target.discard()
            raise
        self.refuse_if_busy()  # another request may have started one while we parsed
        backends = [b for _, b in matched]
        job = Job("restore", target, backends, sum(layout.length for layout, _ in matched))
        job.skipped_blocks = [layout.name for layout in skipped]
        job.save_id = restore.save_id(parsed)
        if verify == "off":
            job.unverified = "'verify' is off"
        elif table is None:
            job.unverified = "the file has no checksums (saved by QEMU or an older migd)"
        job.verify_before_write = verify == "before-write" and table is not None
        self._launch(job, self._restore(job, parsed, matched, main_fd, table))

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

    def _launch(self, job: Job, body: Any) -> None:
        for b in job.backends:
            b.in_use += 1
        self.job = job
        self._set_status(job, MigrationStatus.setup)
        job.task = asyncio.create_task(self._run(job, body))

    async def _run(self, job: Job, body: Any) -> None:
        sampler = asyncio.create_task(self._sample(job))
        try:
            await body
            self._set_status(job, MigrationStatus.completed)
        except JobCancelled:
            if job.direction == "restore":
                job.error_desc = self._partial_note(job, "Restore cancelled")
            self._set_status(job, MigrationStatus.cancelled)
        except MigdError as exc:  # ChannelError included: I/O failures name the file
            job.mismatch = isinstance(exc, ChecksumMismatch)
            text = exc.desc
            job.error_desc = self._partial_note(job, text) if job.direction == "restore" else text
            self._set_status(job, MigrationStatus.failed)
        except Exception as exc:  # a bug: fail the job, keep the daemon
            log.exception("migration job crashed")
            job.error_desc = f"Internal error: {type(exc).__name__}: {exc}"
            self._set_status(job, MigrationStatus.failed)
        finally:
            sampler.cancel()
            job.target.close()
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

    async def _verify_file(
        self,
        job: Job,
        parsed: format.ParsedStream,
        table: checksum_table.ChecksumTable,
        main_fd: int,
        fds: Sequence[int],
    ) -> None:
        """verify-before-write: every unit of the file checked before any memory changes."""
        assert job.checksums is not None
        # The blocks it restores have their bitmaps read; those it skips, not yet.
        present = {b.name: b.present for b in job.checksums.blocks}
        others = [layout for layout in parsed.blocks if layout.name not in present]
        bitmaps = await asyncio.to_thread(restore.read_bitmaps, job, others, main_fd)
        present.update((layout.name, bm) for layout, bm in zip(others, bitmaps, strict=True))
        files = restore.file_blocks(parsed, table, present)
        job.file_check = FileProgress(files)
        await asyncio.to_thread(
            verify_file, fds, job.target.path, files, job.cancel, job.file_check
        )
        check_cancel(job)

    # -- the two directions --------------------------------------------------------------

    async def _open_channels(self, job: Job, main_fd: int) -> list[int]:
        """One fd per channel; without multifd the main fd is the only channel."""
        if not self.caps.multifd:
            return [main_fd]
        count, direct = self.params.multifd_channels, self.direct_io_effective
        return await asyncio.to_thread(job.target.open_channels, count, direct)

    async def _move_pages(
        self, job: Job, fds: Sequence[int], blocks: Sequence[BlockIO], runs: Sequence[PageRun]
    ) -> None:
        """The page runs through the I/O engine, then the checks no channel could make."""
        job.throttle = Throttle(self.params.max_bandwidth)
        direction = job.direction
        transfer = Transfer(
            direction,
            job.target.path,
            fds,
            blocks,
            runs,
            job.cancel,
            job.throttle,
            detect_zero=self.detect_zero,
            # Buffered saves keep their dirty page cache small, so that neither the final
            # sync nor a stop has to wait for the whole save to reach a slow disk.
            write_behind=direction == "save" and not self.direct_io_effective,
            counters=job.counters,
            checksums=job.checksums,
        )
        try:
            await self.io_engine.run(transfer)
        finally:
            if job.checksums is not None:
                job.checksums.release()
        check_cancel(job)
        check_sizes(blocks, direction)
        sums = job.checksums
        if sums is not None and sums.units_done != sums.units_total:
            # Never record zeros as checksums, nor call unchecked pages verified.
            raise MigrationError(
                f"'{job.target.path}': internal error: {sums.units_total - sums.units_done} "
                f"of {sums.units_total} checksum units were not "
                f"{'hashed' if direction == 'save' else 'checked'}"
            )

    async def _save(
        self, job: Job, layout: format.SaveLayout, main_fd: int, checksums: bool
    ) -> None:
        await asyncio.to_thread(save.write_head, job, layout, main_fd)
        check_cancel(job)
        fds = await self._open_channels(job, main_fd)
        try:
            # SEEK_DATA walks and run splitting take tens of ms on large memory: off the loop.
            blocks, runs = await asyncio.to_thread(
                plan.plan_save_runs, job, layout, self.detect_zero
            )
            if checksums:
                job.checksums = UnitChecksums(blocks, job.target.path, None, runs)
            check_cancel(job)
            self._pass(job, 1)  # before `active`, as in QEMU
            self._activate(job)
            await self._move_pages(job, fds, blocks, runs)
            self._pass(job, 2)
            await asyncio.to_thread(save.finish_save, job, layout, blocks, fds, main_fd)
        finally:
            job.target.close_channels()

    async def _restore(
        self,
        job: Job,
        parsed: format.ParsedStream,
        matched: Sequence[tuple[format.BlockLayout, MemoryBackend]],
        main_fd: int,
        table: checksum_table.ChecksumTable | None,
    ) -> None:
        path = job.target.path

        # Every check is done before the first byte of any backend changes.
        bitmaps = await asyncio.to_thread(
            restore.read_bitmaps, job, [layout for layout, _ in matched], main_fd
        )
        plan.check_room(
            path,
            [
                (b, int(present.sum()) * PAGE_SIZE)
                for (_, b), present in zip(matched, bitmaps, strict=True)
            ],
        )
        check_cancel(job)
        fds = await self._open_channels(job, main_fd)
        try:
            blocks, runs = plan.plan_restore_runs(matched, bitmaps)
            self._activate(job)
            if table is not None:
                expected = restore.expected_digests(parsed, table, matched)
                job.checksums = UnitChecksums(blocks, path, expected, runs)
                if job.verify_before_write:
                    try:
                        await self._verify_file(job, parsed, table, main_fd, fds)
                    except BaseException:
                        job.checksums.release()
                        raise
            # Durable before the first page changes; only a completed restore removes it.
            await asyncio.to_thread(self.partial.set_all, job.backends, path)
            job.memory_touched = True
            await self._move_pages(job, fds, blocks, runs)
            job.sync_count = 1
        finally:
            job.target.close_channels()
        await asyncio.to_thread(self.partial.clear_all, job.backends)
