"""The job: one save or restore, its status enum and the allowed changes, its counters
and query-migrate's answer from them."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import threading
import time
from dataclasses import dataclass, field

from ..io.blocking import Step
from ..io.checksums import UnitChecksums
from ..io.engine import Counters
from ..io.file_verify import FileProgress
from ..io.target import Target
from ..io.throttle import Throttle
from ..pages import PAGE_SIZE
from ..state.memory import MemoryBackend
from ..state.serving import current_client


class MigrationStatus(enum.StrEnum):
    none = "none"
    setup = "setup"
    cancelling = "cancelling"
    cancelled = "cancelled"
    active = "active"
    completed = "completed"
    failed = "failed"


ACTIVE_STATES = {MigrationStatus.setup, MigrationStatus.active, MigrationStatus.cancelling}


class JobStatus(enum.StrEnum):
    """QEMU's JobStatus (qapi/job.json), the status query-jobs and JOB_STATUS_CHANGE give."""

    undefined = "undefined"
    created = "created"
    running = "running"
    paused = "paused"
    ready = "ready"
    standby = "standby"
    waiting = "waiting"
    pending = "pending"
    aborting = "aborting"
    concluded = "concluded"
    null = "null"


# The QEMU job statuses a migration status change passes through, in order (a QEMU job
# that succeeds goes running -> waiting -> pending -> concluded; one that fails or is
# cancelled, aborting -> concluded). A job already `aborting` (cancelling) only concludes.
JOB_STEPS: dict[MigrationStatus, tuple[JobStatus, ...]] = {
    MigrationStatus.setup: (JobStatus.created, JobStatus.running),
    MigrationStatus.active: (),
    MigrationStatus.cancelling: (JobStatus.aborting,),
    MigrationStatus.completed: (JobStatus.waiting, JobStatus.pending, JobStatus.concluded),
    MigrationStatus.failed: (JobStatus.aborting, JobStatus.concluded),
    MigrationStatus.cancelled: (JobStatus.aborting, JobStatus.concluded),
}
# The job id under which migrate and migrate-incoming appear in query-jobs.
MIGRATION_JOB_ID = "migration"


@dataclass(frozen=True)
class JobSettings:
    """What a job runs with, fixed when it starts: changing the daemon's parameters
    afterwards changes only later jobs (and, as in QEMU, max-bandwidth of a running
    migrate)."""

    multifd: bool = True
    channels: int = 2
    direct_io: bool = False  # effective: O_DIRECT channel fds
    max_bandwidth: int = 0  # bytes/s, 0 = unlimited
    detect_zero: bool = True
    # Restore with direct_io: read the runs the page cache mostly holds through a buffered
    # fd (x-read-cached auto, docs/cache-aware-restore.md); False: everything O_DIRECT.
    read_cached: bool = True


_S = MigrationStatus
# The status changes a job may make; anything else is a bug in the engine. A cancel that
# comes after the last check ends the job cancelled once that step has run (or failed),
# as in QEMU, whose completion changes the state to COMPLETED only from ACTIVE (a
# compare-and-swap in migrate_set_state), never from CANCELLING.
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    _S.none: frozenset({_S.setup}),
    _S.setup: frozenset({_S.active, _S.failed, _S.cancelling}),
    _S.active: frozenset({_S.completed, _S.failed, _S.cancelling}),
    _S.cancelling: frozenset({_S.cancelled, _S.failed}),
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


def check_cancel(job: Job) -> None:
    if job.cancel.is_set():
        raise JobCancelled()


@dataclass
class Job:
    """One save or restore, from `setup` to a final status."""

    direction: str  # "save" | "restore"
    target: Target
    backends: list[MemoryBackend]
    total_bytes: int
    settings: JobSettings = field(default_factory=JobSettings)
    id: str = MIGRATION_JOB_ID  # its id in query-jobs
    migration: bool = True  # started by migrate / migrate-incoming (query-migrate's job)
    auto_dismiss: bool = True  # leaves query-jobs once concluded, without job-dismiss
    # Its steps submitted to a worker thread (engine.job_thread): a cancel drops queued ones.
    steps: set[Step] = field(default_factory=set)
    # Its holds on its backends' memory files (engine._hold_memory_files), closed at its end.
    memory_holds: list[int] = field(default_factory=list)
    owner: int | None = None  # the capped uid that started it (None: root, migd, daemon)
    # The client that started it ("client 3"), named in its log lines; None: the daemon.
    client: str | None = field(default_factory=current_client)
    status: MigrationStatus = MigrationStatus.none
    job_status: JobStatus = JobStatus.undefined
    file_identity: tuple[int, int] | None = None  # (st_dev, st_ino) of its file
    started: float = field(default_factory=time.monotonic)
    setup_done: float | None = None
    finished: float | None = None
    error_desc: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    counters: list[Counters] = field(default_factory=list)  # one per channel, from the engine
    throttle: Throttle | None = None  # while the channels run: max-bandwidth can change
    hole_pages: int = 0  # pages known zero without touching memory (file holes)
    main_bytes: int = 0
    task: asyncio.Task[None] | None = None
    skipped_blocks: list[str] = field(default_factory=list)
    sync_count: int = 0  # QEMU's dirty-sync-count: 1 once the pass starts, 2 at the final sync
    memory_touched: bool = False  # restore: some backend may already hold new data
    expected_downtime: int = 0  # ms: the downtime-limit, as QEMU reports it for a stopped guest
    switchover: float | None = None  # save: when the final stage (final sync) began
    switchover_main_bytes: int = 0  # main_bytes then: what the final stage writes is downtime-bytes
    checksums: UnitChecksums | None = None  # the unit checksums recorded (save) or checked
    save_id: str | None = None  # the save's (restore: the file's), once known
    updates: bool = False  # save: rewrites the dirty pages of the save in the file only
    unverified: str | None = None  # restore: why its pages are not checked
    verify_before_write: bool = False  # restore: the file is checked before any page
    file_check: FileProgress | None = None  # verify-before-write's progress
    mismatch: bool = False  # restore: failed on a checksum that did not match
    _samples: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES

    def totals(self) -> tuple[int, int, int, int, int]:
        """(bytes moved, pages done, normal pages, zero pages, multifd bytes) right now."""
        moved = normal = zero = done = 0
        for c in self.counters:
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

    def stats(self) -> JobStats:
        """What query-migrate reports, from counters only, with QEMU's members per status.

        A save shows what QEMU's source side shows (migration.c fill_source_migration_info,
        checked against QEMU 10): in setup only the status; while active or cancelling the
        times, 'expected-downtime' and 'ram'; once completed the times, 'downtime' and
        'ram'; once failed the status and 'error-desc'; once cancelled the status alone.
        A restore keeps migd's times and 'ram' in every status (a migd extension: QEMU's
        incoming side shows only its status), with no downtime members.
        """
        if self.direction == "save":
            if self.status in (MigrationStatus.setup, MigrationStatus.cancelled):
                return JobStats(status=self.status)
            if self.status == MigrationStatus.failed:
                return JobStats(status=self.status, error_desc=self.error_desc)
        full = self._full_stats()
        if self.direction != "save":
            return full
        if self.status == MigrationStatus.completed:
            return dataclasses.replace(full, downtime=self._downtime())
        return dataclasses.replace(full, expected_downtime=self.expected_downtime)

    def _downtime(self) -> int:
        """ms of the final stage, as QEMU measures downtime: from the switchover (the final
        sync) to the end, although the guest, stopped, was 'down' all along."""
        if self.switchover is None or self.finished is None:
            return 0
        return int((self.finished - self.switchover) * 1000)

    def _full_stats(self) -> JobStats:
        end = self.finished if self.finished is not None else time.monotonic()
        setup_time = None
        if self.setup_done is not None:
            setup_time = int((self.setup_done - self.started) * 1000)
        moved, done, normal, zero, multifd = self.totals()
        mbps, pps = self.rates()
        remaining = (
            0 if self.status == MigrationStatus.completed else (self.total_bytes - done * PAGE_SIZE)
        )
        ram = RamStats(
            transferred=moved,
            remaining=max(0, remaining),
            total=self.total_bytes,
            duplicate=zero,
            normal=normal,
            normal_bytes=normal * PAGE_SIZE,
            mbps=round(mbps, 3),
            dirty_sync_count=self.sync_count,
            page_size=PAGE_SIZE,
            multifd_bytes=multifd,
            pages_per_second=int(pps),
            precopy_bytes=moved,
            downtime_bytes=(
                self.main_bytes - self.switchover_main_bytes if self.switchover is not None else 0
            ),
        )
        return JobStats(
            status=self.status,
            total_time=int((end - self.started) * 1000),
            setup_time=setup_time,
            error_desc=self.error_desc,
            ram=ram,
            skipped_blocks=tuple(self.skipped_blocks),
            # A save's members stay QEMU's own (tests/test_migration_pass.py); its checksums
            # are in the file (migd inspect, migd verify).
            checksums=self._checksum_stats() if self.direction == "restore" else None,
        )

    def info(self) -> JobInfoStats:
        """query-jobs' entry: QEMU's JobInfo, progress in bytes, then migd's members."""
        _, done, *_ = self.totals()
        mbps, _ = self.rates()
        return JobInfoStats(
            id=self.id,
            type="snapshot-save" if self.direction == "save" else "snapshot-load",
            status=self.job_status,
            current_progress=min(self.total_bytes, done * PAGE_SIZE),
            total_progress=self.total_bytes,
            error=self._job_error(),
            x_file=self.target.path,
            x_backends=tuple(b.id for b in self.backends),
            x_mbps=round(mbps, 3),
            x_migration_status=self.status,
        )

    def _job_error(self) -> str | None:
        """JobInfo's error: the job's, or for a cancel without one QEMU's
        strerror(ECANCELED), as QEMU's job_update_rc sets it."""
        if self.status == MigrationStatus.completed:
            return None
        if self.status == MigrationStatus.cancelled and self.error_desc is None:
            return "Operation canceled"
        return (
            self.error_desc
            if self.status in (MigrationStatus.failed, MigrationStatus.cancelled)
            else None
        )

    def _checksum_stats(self) -> ChecksumStats:
        """A restore's x-checksums: what is checked, how far."""
        sums = self.checksums
        units, done = (sums.units_total, sums.units_done) if sums is not None else (0, 0)
        if self.unverified is not None:
            return ChecksumStats(state="unverified", save_id=self.save_id, note=self.unverified)
        check = self.file_check
        if check is not None and not self.memory_touched:
            state = "mismatch" if self.mismatch else "verifying-file"
            return ChecksumStats(
                state=state, units=check.units_total, units_done=check.units_done,
                save_id=self.save_id,
            )  # fmt: skip
        if self.mismatch:
            state = "mismatch"
        elif self.status == MigrationStatus.completed:
            state = "verified"
        else:
            state = "verifying"
        return ChecksumStats(state=state, units=units, units_done=done, save_id=self.save_id)


@dataclass(frozen=True, kw_only=True)
class RamStats:
    """A job's page counters at one moment: QEMU's MigrationStats, member for member and in
    its order (query-migrate's 'ram' model is built from these fields). The members that
    default to 0 are what migd never has: dirty tracking, postcopy, zero-copy."""

    transferred: int
    remaining: int
    total: int
    duplicate: int
    normal: int
    normal_bytes: int
    dirty_pages_rate: int = 0
    mbps: float
    dirty_sync_count: int
    postcopy_requests: int = 0
    page_size: int
    multifd_bytes: int
    pages_per_second: int
    precopy_bytes: int
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    dirty_sync_missed_zero_copy: int = 0


@dataclass(frozen=True, kw_only=True)
class JobStats:
    """A snapshot of a job for query-migrate: times in ms, None where QEMU shows none."""

    status: MigrationStatus
    total_time: int | None = None
    expected_downtime: int | None = None
    downtime: int | None = None
    setup_time: int | None = None
    error_desc: str | None = None
    ram: RamStats | None = None
    skipped_blocks: tuple[str, ...] = ()
    checksums: ChecksumStats | None = None


@dataclass(frozen=True, kw_only=True)
class JobInfoStats:
    """A job as query-jobs shows it: QEMU's JobInfo (type: QEMU's snapshot-save for a
    save, snapshot-load for a restore), then migd's members."""

    id: str
    type: str
    status: JobStatus
    current_progress: int  # bytes
    total_progress: int  # bytes
    error: str | None = None
    x_file: str
    x_backends: tuple[str, ...]
    x_mbps: float  # megabits per second: recent while running, the average once concluded
    x_migration_status: MigrationStatus  # the finer status query-migrate would give


@dataclass(frozen=True, kw_only=True)
class ChecksumStats:
    """query-migrate's x-checksums for a restore (a migd extension). state:
    "verifying-file" (verify-before-write, before any memory
    changes), "verifying", "verified", "mismatch", "unverified" (`note` says why: the
    file has none, or verify is off)."""

    state: str
    units: int = 0
    units_done: int = 0  # hashed (save) or matched (restore)
    save_id: str | None = None
    note: str | None = None
