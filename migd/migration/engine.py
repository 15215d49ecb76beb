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
import contextvars
import dataclasses
import fcntl
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from ..errors import MigdError, MigrationError
from ..io import blocking
from ..io.checksums import ChecksumMismatch, UnitChecksums, hash_memory
from ..io.digests import DIGEST_BYTES, unit_count
from ..io.engine import HASH_THREADS, BlockIO, IOEngine, PageRun, Transfer, check_sizes, load_engine
from ..io.file_verify import FileBlock, FileProgress, verify_file
from ..io.share import DEFAULT_SLOTS, DiskShare
from ..io.target import Openers, Target, close_quietly, open_channel_fd
from ..io.throttle import Throttle
from ..pages import PAGE_SIZE
from ..state.fdsets import fd_budget, is_fdset_path
from ..state.memory import MemoryBackend, MemoryRegistry
from ..state.overlay import file_identity
from ..state.partial import PartialMarks
from ..state.paths import (
    ChannelOpener,
    FileOpener,
    hold_for_job,
    mapped_as_memory,
    plain_open,
    reopen,
    reopen_for_locks,
)
from . import plan, settings
from .job import (
    JOB_STEPS,
    MIGRATION_JOB_ID,
    STRICT_STATUS_ENV,
    TRANSITIONS,
    IllegalTransition,
    Job,
    JobCancelled,
    JobInfoStats,
    JobSettings,
    JobStats,
    JobStatus,
    MigrationStatus,
    check_cancel,
)
from .mapped_ram import checksum_table, format, page_slots, restore, save, update
from .settings import Capabilities, Parameters

log = logging.getLogger(__name__)

IN_PROGRESS = "There's a migration process in progress"
JOB_NOT_FOUND = "Job not found"
# Concluded jobs stay listed until job-dismiss: bound what a client that never dismisses
# can make the daemon keep.
MAX_JOBS = 256  # QEMU's text (job-qmp.c find_job_locked)
# Jobs one uid other than root's and migd's may have listed, running or concluded and not
# dismissed: they count apart from MAX_JOBS, which counts root's and migd's alone, so a
# user let on the socket whose jobs hang on its own FUSE file, or who never dismisses
# them, cannot fill the table and have the management's jobs refused (before, 256 of
# one such uid's did). 32 is twice UID_WORKER_THREADS (io/blocking.py): more jobs than
# its threads could serve at once, and concluded ones waiting for job-dismiss.
UID_MAX_JOBS = 32
# All those uids' jobs together: each uid's cap alone let a socket open to all (a rootless
# container's 65,536 sub-uids) list 32 jobs per uid, some 10 KiB each, and query-jobs
# answer all of them (1,920 jobs of 60 uids: 19 MiB kept, a 440 KB reply). 1024 is 32
# uids' full tables. Root's and migd's jobs are not counted (MAX_JOBS is theirs).
OTHER_UIDS_MAX_JOBS = 1024
# The fds the running jobs of those uids open (a main fd and a channel fd per multifd
# channel, up to 255) may together be a quarter of what passed fds may use
# (state/fdsets.py fd_budget): unbounded, one uid's 32 saves of 255 channels held
# 8,300 fds, and three uids every fd migd had, so root's clients were no longer accepted
# and its jobs failed, "Too many open files". A quarter: such uids' passed fds and
# backends stop at half (check_room_for_fds), which leaves root at least a quarter.
OTHER_UIDS_FD_SHARE = 4
# QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'.
_JOB_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
SAMPLE_PERIOD = 0.1  # seconds between throughput samples (QEMU's BUFFER_DELAY)
STOP_TIMEOUT = 1.5  # seconds a shutdown waits for a cancelled job (SIGTERM ends in < 2 s)


def _job_fds(settings: JobSettings) -> int:
    """The fds a job with `settings` opens: its main fd and one per multifd channel."""
    return 1 + (settings.channels if settings.multifd else 0)


def _refuse_readable_memory(backend: MemoryBackend) -> None:
    """A restore puts guest RAM into each backend's memory file: a file named by path that
    group or others may read would hand it to them (red-team, session 13: a mem-path
    created under umask 022 was read by `nobody` after the restore). A passed fd, and
    anonymous or private memory, are not files others can open by name."""
    fd, path = backend.fd, backend.mem_path
    if fd is None or not backend.share or path is None or is_fdset_path(path):
        return
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o044:
        raise MigrationError(
            f"Memory backend '{backend.id}' file '{path}' may be read by group or others "
            f"(mode {mode:04o}): a restore would put guest RAM where they can read it; "
            "chmod go-rw it (QEMU creates mem-path files 0644 under umask 022) or pass the "
            "file as an fd"
        )


_T = TypeVar("_T")


# The job whose task runs: set by _run, read by job_thread to let a cancel drop a step.
_RUNNING_JOB: contextvars.ContextVar[Job | None] = contextvars.ContextVar(
    "migd_running_job", default=None
)


async def job_thread(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """blocking.to_thread for a job's own steps (in the threads of the uid that started
    the job, io/blocking.py), except that a job task cancelled while the
    thread runs waits for it to return before the cancel goes on. The loop cancels a job's
    task at its end (a stop that gave up waiting after STOP_TIMEOUT), and `_run`'s finally
    then closes the job's fds: with the thread still in, say, finish_save, it wrote the end
    section of a stopped save through fds closed under it, leaving a complete file, and a
    closed fd's number may by then be another file's (red-team, session 16). The thread
    sees the job's cancel event, which every stop sets first.

    A step no thread has started yet is dropped by the job's cancel (_cancel), and one
    asked for after it is not queued at all: JobCancelled, and the job ends `cancelled`
    at once. Before, a step waiting behind its uid's stuck calls (a FUSE filesystem of
    theirs that stopped answering) kept a cancelled job `cancelling` until they returned.
    A cleanup a cancel needs (save.withdraw_end) goes through job_cleanup_thread instead.

    A plain executor future, not a task: the loop's end cancels every task, and a cancelled
    to_thread task counts as done while its thread still runs."""
    job = _RUNNING_JOB.get()
    if job is not None:
        check_cancel(job)
    step = blocking.Step(func, *args, **kwargs)
    if job is not None:
        job.steps.add(step)
    try:
        return cast(_T, await _wait_step(step))
    finally:
        if job is not None:
            job.steps.discard(step)


async def job_cleanup_thread(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """job_thread for a step a cancelled job still needs (closing its files, taking back
    its end): never dropped, and in its uid's cleanups pool (blocking.submit_cleanup)."""
    return cast(_T, await _wait_step(blocking.Step(func, *args, cleanup=True, **kwargs)))


async def _wait_step(step: blocking.Step) -> Any:
    future = step.future
    assert future is not None  # forgotten only here, once it is done
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if step.dropped:
            raise JobCancelled() from None  # no thread ever ran it: nothing to wait for
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                continue  # cancelled again: the thread is still the one to wait for
            except BaseException:
                break  # its error: the cancel is what this task ends with
        raise
    finally:
        # The future holds the thread's error, whose traceback holds this frame: a cycle
        # that kept the error's frames, and with them views of the backends' memory, until
        # a GC pass (object-del could not unmap at once; test_faults).
        del future
        step.forget()


def _hold_memory_files(
    backends: Sequence[MemoryBackend], direction: str
) -> tuple[list[int], str | None]:
    """Each backend's hold on its memory file for the job (a restore writes it, a save
    reads it), through an open of the file of the job's own, closed at the job's end: what
    refuses a job of another migd process on that file. -> (the fds holding, the refusal
    if another open file description holds a conflicting hold), the refusal raised by the
    caller after its own checks, whose texts name this migd's jobs.

    Blocking, in a worker thread: on NFS, or a FUSE mount whose server handles locks
    (FUSE_POSIX_LOCKS), the kernel sends every lock request to the server, and one that
    did not answer stalled the daemon while these were taken on the event loop through the
    backends' own fds (red-team, session 17). An open of the job's own makes each job's
    hold its own: a refused start's close drops its holds only, never another job's."""
    writes = direction == "restore"
    fds: list[int] = []
    refusal = None
    try:
        for backend in backends:
            if backend.fd is None:
                continue
            access = fcntl.fcntl(backend.fd, fcntl.F_GETFL) & os.O_ACCMODE
            try:
                fd = reopen_for_locks(backend.fd, access)  # overlayfs: its layer's file
            except OSError:
                continue  # nothing known, as where the filesystem has no such locks
            fds.append(fd)
            if refusal is None and hold_for_job(fd, writes) is False:
                refusal = (
                    f"Memory backend '{backend.id}' file '{backend.file_name}' is in use by "
                    f"a job that {'reads or writes' if writes else 'writes'} it (another migd "
                    "process's, or one of this migd's that is starting): two jobs cannot use "
                    "one file while either writes it"
                )
    except BaseException:
        _close_all(fds)
        raise
    return fds, refusal


def _close_all(fds: list[int]) -> None:
    """Close fds (a job's holds on its memory files) and empty the list."""
    while fds:
        close_quietly(fds.pop())


def _let_go(close_target: Callable[[], None], holds: list[int]) -> None:
    """A job's file and its holds on its memory files let go, in one worker thread (a
    close on FUSE or NFS waits for the server): `close_target` is the target's close, or
    its discard for a start refused after the open."""
    close_target()
    _close_all(holds)


def _reopen_for_reading(fd: int) -> int | None:
    """The file of a save's (write-only) main fd opened again for reading, or None where
    it cannot be (then the checksums are read from memory, as before)."""
    try:
        return reopen(fd, os.O_RDONLY)  # this very file, whatever its name is now
    except OSError as exc:
        log.warning("save: cannot read its file back for the checksums: %s", exc.strerror)
        return None


def _refuse_changed_backends(
    resolved: Sequence[MemoryBackend], now: Sequence[MemoryBackend]
) -> None:
    """The backends a start resolved before its awaits must be the ones it launches on.

    Without named backends (migrate, migrate-incoming) the job takes every backend the
    daemon has: an object-del meanwhile would leave a closed backend in the job (which
    then failed with "is closed" after the command had answered {}), an object-add one
    the job silently missed. Refused before anything is written; the client may retry.
    """
    if [id(b) for b in resolved] != [id(b) for b in now]:
        before = ", ".join(f"'{b.id}'" for b in resolved) or "none"
        after = ", ".join(f"'{b.id}'" for b in now) or "none"
        raise MigrationError(
            f"The memory backends changed while the migration started (from {before} to "
            f"{after}: object-add or object-del by another client); nothing was written"
        )


class MigrationEngine:
    """Owns capabilities, parameters and the jobs: at most one migration (migrate,
    migrate-incoming; query-migrate's) and any number of memory jobs (memory-save,
    memory-restore), each over its own backends and file."""

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
        self.job: Job | None = None  # the last migration: what query-migrate reports
        self.jobs: dict[str, Job] = {}  # query-jobs: every job not dismissed, by id
        # All jobs' page I/O together (0 = unlimited); each job's own cap applies too.
        self.daemon_throttle = Throttle(0)
        # The disk's I/O slots, shared by all jobs' channels so that each gets its turn.
        # MIGD_IO_SLOTS: for measuring the policy (migd.bench.concurrency --slots).
        self.disk_share = DiskShare(int(os.environ.get("MIGD_IO_SLOTS", DEFAULT_SLOTS)))
        # MIGD_HASH_THREADS: for measuring the checksums' hashing threads (docs/checksums.md).
        self.hash_threads = int(os.environ.get("MIGD_HASH_THREADS", HASH_THREADS))
        # MIGD_STAGING=0: O_DIRECT saves and restores straight from and into the mapping,
        # as before io/threads.py's Staging, for measuring the two ways against each
        # other (migd bench's paired "staging buffers" rows).
        self.staging = os.environ.get("MIGD_STAGING", "1") != "0"
        self.partial = PartialMarks()  # the daemon gives it a state directory

    # -- settings ------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A migration (migrate, migrate-incoming) is running."""
        return self.job is not None and self.job.active

    def refuse_if_busy(self) -> None:
        if self.busy:
            raise MigrationError(IN_PROGRESS)

    def set_capabilities(self, changes: dict[str, bool]) -> None:
        """`changes`: Capabilities field names -> new state, checked as a whole set."""
        self.refuse_if_busy()
        self.caps = settings.apply_capabilities(self.caps, changes, self.params)

    def set_parameters(self, changes: dict[str, Any]) -> None:
        """`changes`: Parameters field names -> new values, checked as a whole set.

        Jobs keep the settings they started with (JobSettings), so this is never refused
        for a running job; as in QEMU, max-bandwidth also applies at once to a running
        migration.
        """
        self.params = settings.apply_parameters(self.params, changes, self.caps)
        job = self.job
        if "max_bandwidth" in changes and job is not None and job.throttle is not None:
            job.throttle.set_rate(self.params.max_bandwidth)

    def set_daemon_bandwidth(self, rate: int) -> None:
        """Cap all jobs' page I/O together at `rate` bytes/s (0 = unlimited), at once."""
        self.daemon_throttle.set_rate(rate)

    def migration_settings(self) -> JobSettings:
        """What a migrate or migrate-incoming started now runs with."""
        multifd = self.caps.multifd
        return JobSettings(
            multifd=multifd,
            channels=self.params.multifd_channels if multifd else 1,
            # QEMU's rule: direct-io only takes effect with multifd and mapped-ram.
            direct_io=self.params.direct_io and multifd and self.caps.mapped_ram,
            max_bandwidth=self.params.max_bandwidth,
            # 'legacy' and 'multifd' give the same file here: zero runs are skipped.
            detect_zero=self.params.zero_page_detection != "none",
        )

    def job_settings(
        self,
        channels: int | None = None,
        direct_io: bool | None = None,
        max_bandwidth: int | None = None,
        zero_page_detection: str | None = None,
    ) -> JobSettings:
        """A memory job's: always multifd and mapped-ram; what it does not set comes from
        the daemon's parameters as they are now."""
        p = self.params
        detect = zero_page_detection if zero_page_detection is not None else p.zero_page_detection
        return JobSettings(
            multifd=True,
            channels=channels if channels is not None else p.multifd_channels,
            direct_io=direct_io if direct_io is not None else p.direct_io,
            max_bandwidth=max_bandwidth if max_bandwidth is not None else p.max_bandwidth,
            detect_zero=detect != "none",
        )

    def query(self) -> JobStats | None:
        """The last migration's stats, None before any."""
        return None if self.job is None else self.job.stats()

    def query_jobs(self) -> list[JobInfoStats]:
        return [job.info() for job in self.jobs.values()]

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
        # A failure at warning level: a journal read at that priority (or log-level =
        # "warning") showed no failed save or restore at all (red-team, round 10c).
        log.log(
            logging.WARNING if status == MigrationStatus.failed else logging.INFO,
            "%s %s: %s%s [job '%s'%s]",
            job.direction,
            job.target,
            status.value,
            f" ({job.error_desc})" if job.error_desc else "",
            job.id,
            f", {job.client}" if job.client else "",
        )
        if job.migration and self.caps.events:
            self.emit("MIGRATION", {"status": status.value})
        for step in JOB_STEPS[status]:
            self._set_job_status(job, step)
        self.notify(f"STATUS={job.direction} {job.id} {status.value}")

    def _set_job_status(self, job: Job, status: JobStatus) -> None:
        """QEMU's job status and its JOB_STATUS_CHANGE event (every job, migrations too)."""
        if job.job_status == status:
            return
        job.job_status = status
        self.emit("JOB_STATUS_CHANGE", {"id": job.id, "status": status.value})

    def _pass(self, job: Job, number: int) -> None:
        """A save's RAM pass `number` begins: QEMU's dirty-sync-count and MIGRATION_PASS
        (QEMU syncs the dirty bitmap, and emits the event, as the pass starts and at the
        switchover; a stopped guest has nothing dirty, so there is one pass and the final
        sync)."""
        job.sync_count = number
        if number == 2:
            job.switchover = time.monotonic()
            job.switchover_main_bytes = job.main_bytes
        if job.migration and self.caps.events:
            self.emit("MIGRATION_PASS", {"pass": number})

    def _activate(self, job: Job) -> None:
        """setup -> active once the channels are ready, unless a cancel came meanwhile: the
        job then ends cancelled, as `cancelling` never goes back to `active`."""
        check_cancel(job)
        job.setup_done = time.monotonic()
        self._set_status(job, MigrationStatus.active)

    # -- starting ------------------------------------------------------------------------

    def _check_can_start(self) -> None:
        """A migration: none running, and the mapped-ram capability on."""
        self.refuse_if_busy()
        if not self.caps.mapped_ram:
            raise MigrationError(
                "migd writes and reads only the mapped-ram layout: enable the 'mapped-ram' "
                "capability with migrate-set-capabilities"
            )

    def _check_job_id(self, job_id: str | None) -> None:
        """A memory job's id: QEMU's rules and texts (job.c job_create)."""
        if job_id is None:
            return
        if not _JOB_ID.fullmatch(job_id):
            raise MigrationError(f"Invalid job ID '{job_id}'")
        if job_id in self.jobs or job_id == MIGRATION_JOB_ID:
            raise MigrationError(f"Job ID '{job_id}' already in use")

    def _check_room(self, job_id: str | None) -> None:
        """A job of a capped uid (io/blocking.py): under UID_MAX_JOBS of its own, whether
        a memory job or a migration; root's and migd's memory jobs: under MAX_JOBS of
        theirs (a migration is one at a time, refuse_if_busy). Concluded jobs count until
        dismissed: the table keeps them as long."""
        owner = blocking.capped_uid()
        if owner is not None:
            held = sum(1 for job in self.jobs.values() if job.owner == owner)
            if held >= UID_MAX_JOBS:
                raise MigrationError(
                    f"uid {owner} has {held} jobs listed, the most migd keeps for a uid other "
                    f"than root's and migd's (UID_MAX_JOBS {UID_MAX_JOBS}): dismiss its "
                    "concluded jobs with job-dismiss (or start jobs with 'auto-dismiss'), "
                    "or cancel running ones"
                )
            others = sum(1 for job in self.jobs.values() if job.owner is not None)
            if others >= OTHER_UIDS_MAX_JOBS:
                raise MigrationError(
                    f"uids other than root's and migd's have {others} jobs listed, the most "
                    f"migd keeps for them together (OTHER_UIDS_MAX_JOBS {OTHER_UIDS_MAX_JOBS}): "
                    "dismiss concluded jobs with job-dismiss (or start jobs with "
                    "'auto-dismiss'), or cancel running ones"
                )
            return
        listed = sum(1 for job in self.jobs.values() if job.owner is None)
        if job_id is not None and listed >= MAX_JOBS:
            raise MigrationError(
                f"{listed} jobs are listed, the most migd keeps: dismiss concluded "
                "jobs with job-dismiss (or start jobs with 'auto-dismiss')"
            )

    def _check_fd_room(self, settings: JobSettings) -> None:
        """A capped uid's job (io/blocking.py): its fds, with those of the capped uids'
        running jobs, within OTHER_UIDS_FD_SHARE's budget. Counted from the jobs'
        settings, not the open fds: a job opens its channels after its start returns, so a
        burst of starts would each have seen the fds free."""
        budget = fd_budget(OTHER_UIDS_FD_SHARE)
        if blocking.capped_uid() is None or budget is None:
            return
        held = sum(_job_fds(job.settings) for job in self.jobs.values()
                   if job.owner is not None and job.active)  # fmt: skip
        if held + _job_fds(settings) > budget:
            raise MigrationError(
                f"the running jobs of uids other than root's and migd's hold {held} fds, "
                f"and this one needs {_job_fds(settings)}: migd keeps theirs under "
                f"{budget}, so that its clients and root's jobs have theirs; wait for "
                "them to end, or use fewer multifd-channels"
            )

    def _resolve_backends(self, ids: Sequence[str] | None) -> list[MemoryBackend]:
        """The backends a job names (all of the daemon's when it names none)."""
        if ids is None:
            return list(self.memory)
        if len(set(ids)) != len(ids):
            raise MigrationError("'backends' lists a memory backend twice")
        return [self.memory.get(id) for id in ids]

    def owner_of(self, backend_id: str) -> str | None:
        """The id of the running job that uses a backend, if one does."""
        for job in self.jobs.values():
            if job.active and any(b.id == backend_id for b in job.backends):
                return job.id
        return None

    def _check_backends_free(self, backends: Sequence[MemoryBackend]) -> None:
        """A backend belongs to one running job at a time."""
        for backend in backends:
            for job in self.jobs.values():
                if job.active and backend in job.backends:
                    raise MigrationError(
                        f"Memory backend '{backend.id}' is in use by job '{job.id}'"
                    )

    async def start_save(
        self,
        target: Target,
        peer_uid: int | None = None,
        checksums: bool = True,
        *,
        job_id: str | None = None,
        backend_ids: Sequence[str] | None = None,
        job_settings: JobSettings | None = None,
        auto_dismiss: bool = False,
        live: bool = False,
        updates: bool = False,
    ) -> Job:
        """Checks, open the main fd (off the loop), then run the save in the background;
        `checksums`: record unit checksums (docs/checksums.md).

        Without `job_id` this is migrate: every backend, the daemon's capabilities and
        parameters, at most one at a time. With it, a memory job over `backend_ids`
        (default all) with `job_settings`, alongside other jobs. The two passes of a live
        save (memory jobs only; mapped_ram/update.py): `live`, memory that may change
        meanwhile, its checksums read back from the file; `updates`, the save already in
        the file brought up to date with memory that stands still.
        """

        def admit() -> list[MemoryBackend]:
            if job_id is None:
                self._check_can_start()
            self._check_job_id(job_id)
            self._check_room(job_id)
            chosen = self._resolve_backends(backend_ids)
            self._check_backends_free(chosen)
            return chosen

        backends = admit()
        settings = job_settings if job_settings is not None else self.migration_settings()
        self._check_fd_room(settings)  # again just before the launch
        if not backends:
            raise MigrationError("There is no memory backend to save: add one with object-add")
        if (live or updates) and not checksums:
            raise MigrationError(
                f"'{'x-live' if live else 'x-update'}' needs 'checksums': they tell an update "
                "what the file holds"
            )
        if live and updates:
            raise MigrationError("'x-live' and 'x-update' are the two passes: give one")
        # Reads the backends' marks (xattrs, or files in the state directory): a thread.
        # The file's mark, not only the daemon's `partial_restore`: an xattr left by
        # another instance's interrupted restore of the same file is seen there alone.
        restores_begun = [b.restores_begun for b in backends]
        await blocking.to_thread(self.partial.check_save, backends)
        layout = format.plan_save([(b.block_name, b.size) for b in backends], target.offset)
        job = Job("save", target, backends, sum(b.size for b in backends))
        job.updates = updates
        direction = "update" if updates else "live" if live else "save"
        # In a worker thread: a file on a hung or slow filesystem must not stop the loop.
        main_fd = await blocking.to_thread(target.open_main, self.openers, direction, peer_uid)
        previous: update.Previous | None = None
        holds: list[int] = []
        try:
            # Threads': an fstat of a file on FUSE or NFS asks its server, which may not
            # answer (on the loop, that froze the daemon; red-team, session 17).
            await blocking.to_thread(target.refuse_shared)
            # As a backend's is taken (a file through overlayfs is its layer's); in a
            # thread: on FUSE or NFS an fstat asks the server.
            identity = await blocking.to_thread(file_identity, main_fd)
            self._refuse_file_conflicts(
                identity, target.name, "save", "a save to it would overwrite that memory"
            )
            await blocking.to_thread(self._hold_file, target, main_fd, target.name, "save")
            holds, refusal = await blocking.to_thread(_hold_memory_files, backends, "save")
            if updates:
                previous = await blocking.to_thread(update.read_previous, job, layout, main_fd)
            # Another request may have started a job (or added or deleted a backend)
            # meanwhile: both checks again, with no await between them and the job's launch.
            _refuse_changed_backends(backends, admit())
            self._check_fd_room(settings)
            self._refuse_file_conflicts(
                identity, target.name, "save", "a save to it would overwrite that memory"
            )
            for backend, begun in zip(backends, restores_begun, strict=True):
                if backend.restores_begun != begun:  # it may have ended partial since
                    raise MigrationError(
                        f"Memory backend '{backend.id}' was restored into while this save "
                        "started: try again"
                    )
            if refusal is not None:
                raise MigrationError(refusal)
        except BaseException:
            await job_cleanup_thread(_let_go, target.discard, holds)  # may wait (FUSE, NFS)
            raise
        job.memory_holds = holds
        job.settings = settings
        self._identify(job, job_id, auto_dismiss, identity)
        job.expected_downtime = self.params.downtime_limit
        job.save_id = uuid.uuid4().hex
        self._launch(job, self._save(job, layout, main_fd, checksums, live, previous))
        target.settle()
        return job  # the caller may tie it to its session (api/scope.py)

    async def start_restore(
        self,
        target: Target,
        skip_unmatched: bool,
        peer_uid: int | None = None,
        verify: str = "on",
        *,
        job_id: str | None = None,
        backend_ids: Sequence[str] | None = None,
        job_settings: JobSettings | None = None,
        auto_dismiss: bool = False,
        read_cached: bool = True,
    ) -> Job:
        """Open and validate the file's head and blocks, then restore in the background.

        `verify`: "on" checks each unit against the file's checksums as it lands, "off"
        does not, "before-write" also checks the whole file before any memory changes.
        Without `job_id`, migrate-incoming; with it, a memory job as for start_save.
        `read_cached` (x-read-cached auto): with direct-io, runs the page cache holds
        are read buffered.
        """

        def admit() -> list[MemoryBackend]:
            if job_id is None:
                self._check_can_start()
            self._check_job_id(job_id)
            self._check_room(job_id)
            return self._resolve_backends(backend_ids)

        candidates = admit()
        chosen = job_settings if job_settings is not None else self.migration_settings()
        self._check_fd_room(chosen)  # again just before the launch
        main_fd = await blocking.to_thread(target.open_main, self.openers, "restore", peer_uid)
        holds: list[int] = []
        try:
            identity = await blocking.to_thread(file_identity, main_fd)  # as a save's
            self._refuse_file_conflicts(
                identity,
                target.name,
                "restore",
                "a restore would overwrite the save while reading it",
            )
            await blocking.to_thread(self._hold_file, target, main_fd, target.name, "restore")
            parsed = await blocking.to_thread(
                restore.parse, main_fd, target, job_id is not None or self.caps.mapped_ram
            )
            matched, skipped = plan.match_blocks(candidates, parsed, target, skip_unmatched)
            for _, backend in matched:  # an fstat each: a thread's, as file_identity
                await blocking.to_thread(_refuse_readable_memory, backend)
            holds, refusal = await blocking.to_thread(
                _hold_memory_files, [b for _, b in matched], "restore"
            )
            table = None
            if verify != "off":
                table = await blocking.to_thread(restore.read_checksums, main_fd, target, parsed)
            # Another request may have started a job (a save to this very file: it would
            # write what this restore reads) or added or deleted a backend meanwhile: every
            # check again, with no await between them and the job's launch.
            _refuse_changed_backends(candidates, admit())
            self._check_fd_room(chosen)
            self._check_backends_free([b for _, b in matched])
            self._refuse_file_conflicts(
                identity,
                target.name,
                "restore",
                "a restore would overwrite the save while reading it",
            )
            if refusal is not None:
                raise MigrationError(refusal)
        except BaseException:
            await job_cleanup_thread(_let_go, target.discard, holds)  # may wait (FUSE, NFS)
            raise
        backends = [b for _, b in matched]
        job = Job("restore", target, backends, sum(layout.length for layout, _ in matched))
        job.memory_holds = holds
        job.settings = dataclasses.replace(chosen, read_cached=read_cached)
        self._identify(job, job_id, auto_dismiss, identity)
        job.skipped_blocks = [layout.name for layout in skipped]
        job.save_id = restore.save_id(parsed)
        if verify == "off":
            job.unverified = "'verify' is off"
        elif table is None:
            job.unverified = "the file has no checksums (saved by QEMU or an older migd)"
        job.verify_before_write = verify == "before-write" and table is not None
        self._launch(job, self._restore(job, parsed, matched, main_fd, table))
        return job

    @staticmethod
    def _identify(
        job: Job, job_id: str | None, auto_dismiss: bool, identity: tuple[int, int]
    ) -> None:
        job.file_identity = identity
        if job_id is not None:
            job.id, job.migration, job.auto_dismiss = job_id, False, auto_dismiss

    def _refuse_file_conflicts(
        self, identity: tuple[int, int], path: str, direction: str, consequence: str
    ) -> None:
        """Refuse a job whose file (`identity`: its device and inode) is a memory
        backend's own file: the save would truncate the memory it reads, the restore
        overwrite the file it reads from, each reporting success; or the file of a
        running job when either of them writes it."""
        for backend in self.memory:
            if backend.file_identity() == identity:
                named = backend.file_name if backend.file_name not in (None, path) else None
                raise MigrationError(
                    f"'{path}' is the memory file of memory backend '{backend.id}'"
                    + (f" ('{named}')" if named else "")
                    + f": {consequence}"
                )
        for job in self.jobs.values():
            if (
                job.active
                and job.file_identity == identity
                and "save" in (direction, job.direction)
            ):
                raise MigrationError(
                    f"'{path}' is the file of job '{job.id}' ({job.direction} of "
                    f"'{job.target.name}'): two jobs cannot use one file while either writes it"
                )

    @staticmethod
    def _hold_file(target: Target, fd: int, path: str, direction: str) -> None:
        """The job's hold on its file (Target.hold), kept until its target closes: what
        refuses a job of another migd process (or one of this migd's that has not
        launched yet) on a file that either job writes. Blocking: a thread."""
        if target.hold(writes=direction == "save") is False:
            raise MigrationError(
                f"'{path}' is in use by another job that "
                f"{'reads or writes' if direction == 'save' else 'writes'} it (another migd "
                "process's, or one of this migd's that is starting): two jobs cannot use "
                "one file while either writes it"
            )
        if direction == "save" and mapped_as_memory(fd):
            raise MigrationError(
                f"'{path}' is the memory file of a memory backend of another migd process: "
                "a save to it would overwrite that memory"
            )

    def refuse_job_file(self, identity: tuple[int, int], path: str) -> None:
        """object-add: refuse a memory file that is the file of a running job (a restore
        into the new backend would overwrite the save the job reads or writes).
        Called from object-add's worker thread too: it walks a copy of the jobs, which
        other clients' commands change on the event loop meanwhile."""
        for job in list(self.jobs.values()):
            if job.active and job.file_identity == identity:
                raise MigrationError(
                    f"'{path}' is the file of job '{job.id}' ({job.direction} of "
                    f"'{job.target.name}'): it cannot be a memory backend's file too"
                )

    def _launch(self, job: Job, body: Any) -> None:
        job.owner = blocking.capped_uid()  # the uid admission counted it for
        for b in job.backends:
            b.in_use += 1
            if job.direction == "restore":
                b.restores_begun += 1
        if job.migration:
            self.job = job
        self.jobs[job.id] = job
        self._set_status(job, MigrationStatus.setup)
        job.task = asyncio.create_task(self._run(job, body))

    async def _run(self, job: Job, body: Any) -> None:
        _RUNNING_JOB.set(job)  # this task's own context: job_thread's steps are its
        sampler = asyncio.create_task(self._sample(job))
        try:
            await body
            if job.cancel.is_set():
                # job-cancel was accepted (`cancelling`, JOB `aborting`) while the last
                # step ran to its end: the job ends cancelled, as QEMU's migration does,
                # never `completed` after an accepted cancel.
                if job.direction == "restore":
                    names = ", ".join(f"'{b.id}'" for b in job.backends)
                    job.error_desc = (
                        "Restore cancelled after its last page had landed; memory "
                        f"backends {names} hold the whole restored data"
                    )
                await self._conclude(job, MigrationStatus.cancelled)
            else:
                await self._conclude(job, MigrationStatus.completed)
        except JobCancelled:
            if job.direction == "restore":
                job.error_desc = self._partial_note(job, "Restore cancelled")
            await self._conclude(job, MigrationStatus.cancelled)
        except MigdError as exc:  # ChannelError included: I/O failures name the file
            job.mismatch = isinstance(exc, ChecksumMismatch)
            text = exc.desc
            job.error_desc = self._partial_note(job, text) if job.direction == "restore" else text
            await self._conclude(job, MigrationStatus.failed)
        except Exception as exc:  # a bug: fail the job, keep the daemon
            log.exception("migration job crashed")
            job.error_desc = f"Internal error: {type(exc).__name__}: {exc}"
            await self._conclude(job, MigrationStatus.failed)
        finally:
            sampler.cancel()
            job.target.close()  # nothing left once _conclude closed it: a task cut short
            if job.checksums is not None:
                # Also when the job ended before its transfer (a cancel during setup): the
                # concluded job is kept until dismissed, and its views of the backends'
                # memory would keep object-del from unmapping them.
                job.checksums.release()
            for b in job.backends:
                b.in_use -= 1
            _close_all(job.memory_holds)  # none left once concluded: a task cut short
            if job.auto_dismiss:
                self._dismiss(job)

    async def _conclude(self, job: Job, status: MigrationStatus) -> None:
        """The job's final status, once its holds on its file and memory files are gone:
        the status goes out to clients at once, and one that acts on it (`migd verify` of
        the file, another migd's job on it) must not find this job still holding them.
        Every thread of the job has returned by now. The close is a thread's: closing a
        file on a FUSE or NFS mount that stopped answering waits for it (its FLUSH), and
        on the loop that froze every client of the daemon (red-team, session 17)."""
        await job_cleanup_thread(_let_go, job.target.close, job.memory_holds)
        self._set_status(job, status)

    def _dismiss(self, job: Job) -> None:
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
            self._set_job_status(job, JobStatus.null)

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
        if self.job is not None:
            self._cancel(self.job)

    def _cancel(self, job: Job) -> None:
        if job.active and job.status != MigrationStatus.cancelling:
            job.cancel.set()
            self._set_status(job, MigrationStatus.cancelling)
            for step in list(job.steps):
                step.drop()  # one still queued: its job_thread ends the job (JobCancelled)

    def _find(self, job_id: str, verb: str, allowed: set[JobStatus]) -> Job:
        """A job for job-cancel or job-dismiss, with QEMU's texts (job.c)."""
        job = self.jobs.get(job_id)
        if job is None:
            raise MigrationError(JOB_NOT_FOUND)
        if job.job_status not in allowed:
            raise MigrationError(
                f"Job '{job_id}' in state '{job.job_status.value}' cannot accept command "
                f"verb '{verb}'"
            )
        return job

    def cancel_job(self, job_id: str) -> None:
        """job-cancel: as migrate_cancel, for any job (the migration's id included)."""
        job = self._find(job_id, "cancel", {JobStatus.created, JobStatus.running})
        self._cancel(job)

    def dismiss_job(self, job_id: str) -> None:
        """job-dismiss: a concluded job leaves query-jobs (status null)."""
        self._dismiss(self._find(job_id, "dismiss", {JobStatus.concluded}))

    def unfinished_jobs(self) -> list[Job]:
        """Jobs whose task has not ended: after close(), those a thread stuck in a
        syscall holds (the process's exit waits for that thread)."""
        return [job for job in self.jobs.values() if job.task is not None and not job.task.done()]

    async def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Shutdown: cancel every job, and give them `timeout` seconds to stop. A thread
        still in a syscall after that is not waited for here: the daemon goes on closing,
        and a save left behind stays incomplete (no end section), which readers refuse."""
        running = [job for job in self.jobs.values() if job.active]
        for job in running:
            self._cancel(job)
        tasks = {job.task for job in running if job.task is not None and not job.task.done()}
        if not tasks:
            return
        done, _ = await asyncio.wait(tasks, timeout=timeout)
        for job in running:
            if job.task is not None and job.task not in done and not job.task.done():
                log.warning("%s %s: still stopping after %.1f s, going on with the shutdown",
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
        bitmaps = await job_thread(restore.read_bitmaps, job, others, main_fd)
        present.update((layout.name, bm) for layout, bm in zip(others, bitmaps, strict=True))
        files = restore.file_blocks(parsed, table, present)
        job.file_check = FileProgress(files)
        await job_thread(verify_file, fds, job.target.name, files, job.cancel, job.file_check)
        check_cancel(job)

    # -- the two directions --------------------------------------------------------------

    async def _open_channels(self, job: Job, main_fd: int) -> list[int]:
        """One fd per channel; without multifd the main fd is the only channel."""
        if not job.settings.multifd:
            return [main_fd]
        count, direct = job.settings.channels, job.settings.direct_io
        return await job_thread(job.target.open_channels, count, direct)

    async def _move_pages(
        self,
        job: Job,
        fds: Sequence[int],
        blocks: Sequence[BlockIO],
        runs: Sequence[PageRun],
        cached_fd: int | None = None,
    ) -> None:
        """The page runs through the I/O engine, then the checks no channel could make.
        `cached_fd`: Transfer.cached_fd (restores from O_DIRECT fds)."""
        job.throttle = Throttle(job.settings.max_bandwidth, parent=self.daemon_throttle)
        direction = job.direction
        transfer = Transfer(
            direction,
            job.target.name,
            fds,
            blocks,
            runs,
            job.cancel,
            job.throttle,
            detect_zero=job.settings.detect_zero,
            # Buffered saves keep their dirty page cache small, so that neither the final
            # sync nor a stop has to wait for the whole save to reach a slow disk.
            write_behind=direction == "save" and not job.settings.direct_io,
            counters=job.counters,
            # An update's checksums are hashed before it writes: nothing for the channels.
            checksums=None if job.updates else job.checksums,
            share=self.disk_share,
            cached_fd=cached_fd,
            hash_threads=self.hash_threads,
            # Through a buffer (io/threads.py Staging) where the fds are O_DIRECT: a
            # buffered fd copies into the page cache anyway.
            stage_saves=self.staging and job.settings.direct_io,
        )
        try:
            await self.io_engine.run(transfer)
        finally:
            if job.checksums is not None:
                job.checksums.release()
        if cached_fd is not None:
            cached = sum(c.bytes_cached for c in job.counters)
            log.info("restore %s: %d of %d bytes read from the page cache",
                     job.target, cached, sum(c.bytes for c in job.counters))  # fmt: skip
        check_cancel(job)
        # A thread: a restore through the memory file walks every page of it here
        # (check_stored: tens of ms per GiB, which the event loop would stop for).
        await job_thread(check_sizes, blocks, direction)
        sums = job.checksums
        if sums is not None and sums.units_done != sums.units_total:
            # Never record zeros as checksums, nor call unchecked pages verified.
            raise MigrationError(
                f"'{job.target.name}': internal error: {sums.units_total - sums.units_done} "
                f"of {sums.units_total} checksum units were not "
                f"{'hashed' if direction == 'save' else 'checked'}"
            )

    async def _save(
        self,
        job: Job,
        layout: format.SaveLayout,
        main_fd: int,
        checksums: bool,
        live: bool = False,
        previous: update.Previous | None = None,
    ) -> None:
        # The channels first: a save that cannot open them (O_DIRECT on a filesystem
        # without it) must fail before write_head truncates what the file held.
        fds = await self._open_channels(job, main_fd)
        read_fd: int | None = None
        slots: page_slots.Slots = []
        try:
            if previous is None:
                await job_thread(save.write_head, job, layout, main_fd)
            else:
                await job_thread(update.invalidate_end, job, layout, main_fd)
            check_cancel(job)
            if previous is None:
                # SEEK_DATA walks and run splitting take tens of ms on large memory.
                blocks, runs = await job_thread(
                    plan.plan_save_runs, job, layout, job.settings.detect_zero
                )
                if job.settings.direct_io:  # the channels' writes side by side on ext4
                    slots = await job_thread(page_slots.allocate, job, blocks, runs, main_fd)
                if checksums and not live:
                    job.checksums = UnitChecksums(blocks, job.target.name, None, runs)
                    if not job.settings.direct_io:
                        # Buffered: the pages just written are in the page cache, and
                        # hashing them there records what the file holds, even where
                        # memory changes after its pages went out (docs/checksums.md).
                        read_fd = await job_thread(_reopen_for_reading, main_fd)
                        if read_fd is not None:
                            job.checksums.set_file(read_fd)
            else:
                blocks = plan.save_blocks(job, layout, previous.bitmaps)
            check_cancel(job)
            self._pass(job, 1)  # before `active`, as in QEMU
            self._activate(job)
            if previous is not None:
                runs = await self._changed_runs(job, blocks, previous)
            await self._move_pages(job, fds, blocks, runs)
            if live and checksums:
                await self._checksums_of_file(job, blocks, fds)
            self._pass(job, 2)
            if slots:
                freeing, slots = slots, []
                await job_thread(page_slots.free_absent, job, blocks, freeing, main_fd)
            await job_thread(save.finish_save, job, layout, blocks, fds, main_fd)
            if job.cancel.is_set():
                # Answered after finish_save's own last look, while its thread returned:
                # _run ends the job cancelled, so its file must not read as a save.
                await job_cleanup_thread(save.withdraw_end, job, layout, main_fd)
        finally:
            if slots:
                # Failed or cancelled before its end (the channels have stopped): the slots
                # of the pages never written take no room in the file it leaves.
                await job_cleanup_thread(page_slots.free_absent, job, blocks, slots, main_fd)
            await job_cleanup_thread(job.target.close_channels)  # may wait, as _conclude's
            if read_fd is not None:
                await job_cleanup_thread(os.close, read_fd)

    async def _changed_runs(
        self, job: Job, blocks: Sequence[BlockIO], previous: update.Previous
    ) -> list[PageRun]:
        """An update: every unit of memory hashed; those that differ from the earlier
        save's checksum (what the file holds) are the runs to save again, and the new
        checksums are the save's."""
        digests = await job_thread(hash_memory, blocks, self.hash_threads, job.cancel)
        check_cancel(job)
        changed = update.changed_units(blocks, digests, previous.digests)
        job.checksums = UnitChecksums.recorded(blocks, job.target.name, digests)
        return plan.plan_update_runs(job, blocks, changed)

    async def _checksums_of_file(
        self, job: Job, blocks: Sequence[BlockIO], fds: Sequence[int]
    ) -> None:
        """A live save's checksums: of the pages as its file holds them, read back, not of
        memory that kept changing while they were written (a page written, then changed
        before its unit was hashed, would leave a checksum the file does not match, and
        an update would take the stale page for current)."""
        files = [FileBlock(b.name, b.pages_offset, b.pages, b.present, b"") for b in blocks]
        digests = [bytearray(unit_count(b.pages) * DIGEST_BYTES) for b in blocks]
        await job_thread(verify_file, fds, job.target.name, files, job.cancel, None, digests)
        check_cancel(job)
        job.checksums = UnitChecksums.recorded(blocks, job.target.name, digests)

    async def _restore(
        self,
        job: Job,
        parsed: format.ParsedStream,
        matched: Sequence[tuple[format.BlockLayout, MemoryBackend]],
        main_fd: int,
        table: checksum_table.ChecksumTable | None,
    ) -> None:
        path = job.target.name

        # Every check is done before the first byte of any backend changes.
        bitmaps = await job_thread(
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
            # A thread, as for a save: the memory files' SEEK_DATA walks and run splitting.
            blocks, runs = await job_thread(
                plan.plan_restore_runs,
                matched,
                bitmaps,
                staging=self.staging and job.settings.direct_io,
            )
            self._activate(job)
            if table is not None:
                expected = restore.expected_digests(parsed, table, matched)
                job.checksums = UnitChecksums(blocks, path, expected, runs)
                job.checksums.set_file(main_fd)  # tells changed memory from a bad file
                if job.verify_before_write:
                    # On failure `_run` releases job.checksums, as for every job end.
                    await self._verify_file(job, parsed, table, main_fd, fds)
            # Durable before the first page changes; only a completed restore removes it.
            await job_thread(self.partial.set_all, job.backends, path)
            job.memory_touched = True
            # The main fd is the file itself (no reopen, so no identity to check), buffered,
            # and otherwise idle now: positional reads from the channels share nothing.
            direct = job.settings.direct_io and job.settings.multifd
            cached_fd = main_fd if direct and job.settings.read_cached else None
            await self._move_pages(job, fds, blocks, runs, cached_fd)
            job.sync_count = 1
        finally:
            await job_cleanup_thread(job.target.close_channels)  # a FLUSH may wait, as a save's
        # A cancel that came while the last pages landed ends the job cancelled (_run):
        # then the marks stay, as for any cancelled restore.
        check_cancel(job)
        await job_thread(self.partial.clear_all, job.backends)
