"""Memory jobs, QEMU's job API style: memory-save, memory-restore (migd's), query-jobs,
job-cancel, job-dismiss and JOB_STATUS_CHANGE (QEMU's), and the daemon-wide bandwidth.

A memory job saves or restores the backends it names (default all) to or from its own
file, alongside other jobs; its settings are the arguments it gives, the daemon's
migration parameters where it gives none, fixed when it starts. migrate and
migrate-incoming are jobs too, with id "migration" (migration/job.py MIGRATION_JOB_ID).
"""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import Strict

from ..errors import InvalidRequest
from ..migration.job import JobSettings, JobStatus, MigrationStatus
from ..migration.settings import ZeroPageDetection
from ..qapi import Size, Uint8
from ..qmp.dispatch import command, event
from ..qmp.validation import Empty, QapiModel
from .context import Context
from .migration import READ_CACHED_TEXT, ReadCached, TargetArgs, VerifyMode, client_target
from .scope import record_job


class MemoryJobArgs(TargetArgs):
    """What memory-save and memory-restore share: the job and its settings."""

    job_id: str
    backends: list[str] | None = None
    multifd_channels: Uint8 | None = None
    direct_io: bool | None = None
    max_bandwidth: Size | None = None
    zero_page_detection: Annotated[ZeroPageDetection, Strict(False)] | None = None
    auto_dismiss: bool = False

    def settings(self, ctx: Context) -> JobSettings:
        if self.multifd_channels == 0:  # QEMU's check and text for the parameter
            raise InvalidRequest("Parameter 'multifd_channels' expects a value between 1 and 255")
        return ctx.services.engine.job_settings(
            self.multifd_channels,
            self.direct_io,
            self.max_bandwidth,
            None if self.zero_page_detection is None else self.zero_page_detection.value,
        )


class MemorySaveArgs(MemoryJobArgs):
    checksums: bool = True
    x_live: bool = False
    x_update: bool = False


_COMMON = (
    "'job-id' names the job (QEMU's rules: a letter, then letters, digits, '-', '.', "
    "'_'; unique among the jobs query-jobs lists). 'backends' lists memory backend ids "
    "(default: all); a backend belongs to one running job at a time, and two jobs may not "
    "use one file while either writes it. 'uri' or 'channels' as for migrate. Optional "
    "per-job 'multifd-channels', 'direct-io', 'max-bandwidth' (bytes/s, 0 = unlimited) "
    "and 'zero-page-detection'; what is not given comes from migrate-set-parameters as it "
    "is when the job starts (the mapped-ram layout and multifd are always used). Returns "
    "at once; follow the job with query-jobs and JOB_STATUS_CHANGE events. "
    "'auto-dismiss' (default false) removes the job from query-jobs once it concludes."
)


@command(
    "memory-save",
    MemorySaveArgs,
    Empty,
    "Start a job saving memory backends to a file in the mapped-ram layout, alongside "
    f"other jobs. {_COMMON} 'checksums' as for migrate. The two passes of a live save "
    "(migd's): 'x-live' saves memory that may change meanwhile (a running guest's) and "
    "records as its checksums what the file then holds, read back; 'x-update', once the "
    "memory stands still, updates the complete save with checksums already in the file "
    "(same backends, same offset): every unit of memory is hashed and only those whose "
    "checksum changed are saved again. Both need 'checksums' and the file readable "
    "(fdset: read-write fds).",
)
async def memory_save(ctx: Context, args: MemorySaveArgs) -> Empty:
    job = await ctx.services.engine.start_save(
        await client_target(ctx, args, outgoing=True),
        ctx.session.peer_uid,
        args.checksums,
        job_id=args.job_id,
        backend_ids=args.backends,
        job_settings=args.settings(ctx),
        auto_dismiss=args.auto_dismiss,
        live=args.x_live,
        updates=args.x_update,
    )
    record_job(ctx, job)
    return Empty()


class MemoryRestoreArgs(MemoryJobArgs):
    skip_unmatched_blocks: bool = False
    verify: Annotated[VerifyMode, Strict(False)] = VerifyMode.on
    x_read_cached: Annotated[ReadCached, Strict(False)] = ReadCached.auto


@command(
    "memory-restore",
    MemoryRestoreArgs,
    Empty,
    "Start a job restoring memory backends from a save file (migd's or QEMU's), alongside "
    f"other jobs: the file's blocks are matched by block name to 'backends'. {_COMMON} "
    "'skip-unmatched-blocks' and 'verify' as for migrate-incoming. The file's head and "
    f"block list are checked before it returns. {READ_CACHED_TEXT}",
)
async def memory_restore(ctx: Context, args: MemoryRestoreArgs) -> Empty:
    job = await ctx.services.engine.start_restore(
        await client_target(ctx, args),
        args.skip_unmatched_blocks,
        ctx.session.peer_uid,
        args.verify.value,
        job_id=args.job_id,
        backend_ids=args.backends,
        job_settings=args.settings(ctx),
        auto_dismiss=args.auto_dismiss,
        read_cached=args.x_read_cached == ReadCached.auto,
    )
    record_job(ctx, job)
    return Empty()


class JobType(enum.StrEnum):
    """QEMU 10's JobType: migd's jobs are snapshot-save and snapshot-load."""

    commit = "commit"
    stream = "stream"
    mirror = "mirror"
    backup = "backup"
    create = "create"
    amend = "amend"
    snapshot_load = "snapshot-load"
    snapshot_save = "snapshot-save"
    snapshot_delete = "snapshot-delete"


class JobInfo(QapiModel):
    """QEMU's JobInfo, then migd's members."""

    id: str
    type: JobType
    status: JobStatus
    current_progress: int
    total_progress: int
    error: str | None = None
    x_file: str
    x_backends: list[str]
    x_mbps: float
    x_migration_status: MigrationStatus


@command(
    "query-jobs",
    Empty,
    list[JobInfo],
    "Every job not dismissed, in the order they started, in QEMU's JobInfo shape: 'type' "
    "is QEMU's 'snapshot-save' for a save and 'snapshot-load' for a restore; 'status' "
    "QEMU's job status (created, running, aborting, waiting, pending, concluded); "
    "'current-progress' and 'total-progress' in bytes; 'error' once a job failed or was "
    "cancelled. migd's members: 'x-file', 'x-backends', 'x-mbps' (recent throughput while "
    "running, the average once concluded) and 'x-migration-status' (what query-migrate "
    "would say). A migration (migrate, migrate-incoming) is listed as 'migration' while it "
    "runs. Answered from counters, never waiting for I/O.",
)
async def query_jobs(ctx: Context, args: Empty) -> list[JobInfo]:
    return [
        JobInfo(
            id=info.id,
            type=JobType(info.type),
            status=info.status,
            current_progress=info.current_progress,
            total_progress=info.total_progress,
            error=info.error,
            x_file=info.x_file,
            x_backends=list(info.x_backends),
            x_mbps=info.x_mbps,
            x_migration_status=info.x_migration_status,
        )
        for info in ctx.services.engine.query_jobs()
    ]


class JobIdArgs(QapiModel):
    id: str


@command(
    "job-cancel",
    JobIdArgs,
    Empty,
    "Cancel a running job, as migrate_cancel does a migration: it goes 'aborting' at once "
    "and 'concluded' once its threads have stopped (a restore's backends then hold partial "
    "data, and its 'error' says so). QEMU's texts: 'Job not found', and a job past running "
    "'cannot accept command verb'.",
)
async def job_cancel(ctx: Context, args: JobIdArgs) -> Empty:
    ctx.services.engine.cancel_job(args.id)
    return Empty()


@command(
    "job-dismiss",
    JobIdArgs,
    Empty,
    "Remove a concluded job from query-jobs (its status becomes 'null').",
)
async def job_dismiss(ctx: Context, args: JobIdArgs) -> Empty:
    ctx.services.engine.dismiss_job(args.id)
    return Empty()


class JobStatusChangeEvent(QapiModel):
    id: str
    status: JobStatus


event("JOB_STATUS_CHANGE", JobStatusChangeEvent)


class DaemonBandwidthArgs(QapiModel):
    max_bandwidth: Size


@command(
    "x-migd-set-bandwidth",
    DaemonBandwidthArgs,
    Empty,
    "Cap the page I/O of all jobs together at 'max-bandwidth' bytes/s (0 = unlimited, the "
    "default; the configuration file's top-level 'max-bandwidth' sets it at start), at once, "
    "running jobs included; each job's own max-bandwidth applies too.",
)
async def set_daemon_bandwidth(ctx: Context, args: DaemonBandwidthArgs) -> Empty:
    ctx.services.engine.set_daemon_bandwidth(args.max_bandwidth)
    return Empty()
