"""x-migd-session-scope (migd's): what a session creates ends with its connection.

QEMU keeps objects, fd sets and jobs after the monitor that made them is gone, and so
does migd by default. A client that cannot clean up after itself if it dies (a killed
`migd vm save` left the guest's RAM file mapped, its fd sets open and its job writing a
temporary file no one would use: red-team, rt-vm) asks for the scope first: from then on
the memory backends, fd sets and jobs this session creates are the session's, and when
its connection ends, however it ends, `release` runs as a background task of the daemon:

1. its jobs still running are cancelled (as job-cancel) and, once ended, dismissed;
2. its backends are deleted (as object-del), except one another session's job uses
   (left, logged);
3. the fds it added are removed (as remove-fd): a set it made holds only those unless
   another session added to it, and then goes as remove-fd of the whole set takes it
   (at once, or once its last dup is closed); another session's fds stay.

What the client already deleted itself is skipped; nothing it does fails the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from ..errors import MigdError
from ..io import blocking
from ..migration.engine import MigrationEngine
from ..migration.job import Job, JobStatus
from ..qmp.dispatch import Session, command
from ..qmp.validation import Empty
from ..state.fdsets import FdsetFd, FdStore
from ..state.memory import MemoryBackend, MemoryRegistry
from .context import Context, Services

log = logging.getLogger(__name__)


@dataclass
class SessionScope:
    """What one scoped session created, by object (not by name: the client may delete
    one and another session reuse its name meanwhile)."""

    session: int  # the session's number, for the log
    jobs: list[Job] = field(default_factory=list)
    backends: list[MemoryBackend] = field(default_factory=list)
    fds: dict[int, list[FdsetFd]] = field(default_factory=dict)  # set id -> its entries

    def __bool__(self) -> bool:
        return bool(self.jobs or self.backends or self.fds)


def scope_of(session: Session) -> SessionScope | None:
    scope = getattr(session, "scope", None)
    return scope if isinstance(scope, SessionScope) else None


@command(
    "x-migd-session-scope",
    Empty,
    Empty,
    "Tie what this session creates from now on to its connection (migd extension): when "
    "the connection ends, however it ends (disconnect, reset, dropped by migd), its jobs "
    "still running are cancelled and, once ended, dismissed; its memory backends are "
    "deleted (one a job of another session uses is left); its fd sets are removed (fds it "
    "added to another session's set are removed from it). Without it, as in QEMU, they "
    "stay until deleted. Idempotent; there is no way back for the session.",
)
async def session_scope(ctx: Context, args: Empty) -> Empty:
    if scope_of(ctx.session) is None:
        ctx.session.scope = SessionScope(getattr(ctx.session, "number", 0))
    return Empty()


# -- recording (the commands that create call these) -------------------------------------


def record_job(ctx: Context, job: Job) -> None:
    scope = scope_of(ctx.session)
    if scope is not None:
        scope.jobs.append(job)


def record_backend(ctx: Context, backend: MemoryBackend) -> None:
    scope = scope_of(ctx.session)
    if scope is not None:
        scope.backends.append(backend)


def record_fd(ctx: Context, fdset_id: int, fd: int) -> None:
    scope = scope_of(ctx.session)
    entry = None if scope is None else ctx.services.fdsets.entry(fdset_id, fd)
    if scope is not None and entry is not None:
        scope.fds.setdefault(fdset_id, []).append(entry)


# -- release (at the end of the session) -------------------------------------------------


async def release(scope: SessionScope, services: Services) -> None:
    """End what a scoped session left, in the order of the module docstring. Never
    raises (but for a cancel, at daemon shutdown): each step logs its own failures."""
    steps = (
        _end_jobs(scope, services.engine),
        _delete_backends(scope, services.memory, services.engine),
        _remove_fds(scope, services.fdsets),
    )
    for step in steps:
        try:
            await step
        except asyncio.CancelledError:
            for rest in steps:  # not started: no "never awaited" warnings
                rest.close()
            raise
        except Exception:
            log.exception("client %d: releasing its session scope failed", scope.session)


async def _end_jobs(scope: SessionScope, engine: MigrationEngine) -> None:
    ours = [job for job in scope.jobs if engine.jobs.get(job.id) is job]
    for job in ours:
        if job.active:
            log.info("client %d gone: cancelling its job '%s'", scope.session, job.id)
            with contextlib.suppress(MigdError):  # already cancelling
                engine.cancel_job(job.id)
    tasks = [job.task for job in ours if job.task is not None and not job.task.done()]
    if tasks:
        # asyncio.wait, not await: cancelling this task must not cancel the jobs'.
        await asyncio.wait(tasks)
    for job in ours:
        if engine.jobs.get(job.id) is job and job.job_status == JobStatus.concluded:
            engine.dismiss_job(job.id)


async def _delete_backends(
    scope: SessionScope, memory: MemoryRegistry, engine: MigrationEngine
) -> None:
    for backend in scope.backends:
        if not any(b is backend for b in memory):
            continue  # the client deleted it already
        owner = engine.owner_of(backend.id)
        if owner is not None:
            log.warning(
                "client %d gone: its memory backend '%s' is left, in use by job '%s'",
                scope.session,
                backend.id,
                owner,
            )
            continue
        memory.take(backend.id)
        log.info("client %d gone: deleting its memory backend '%s'", scope.session, backend.id)
        # Off the loop, as object-del: unmapping a populated mapping takes tens of ms.
        await blocking.to_thread(backend.close)


async def _remove_fds(scope: SessionScope, fdsets: FdStore) -> None:
    for fdset_id, entries in sorted(scope.fds.items()):
        # Off the loop, as remove-fd: the last close of a memfd frees its memory. By
        # identity: what the client removed itself (its number maybe reused since) is
        # not there any more.
        removed = await blocking.to_thread(fdsets.remove_entries, fdset_id, entries)
        if removed:
            log.info("client %d gone: removed its %d fd(s) of fd set %d",
                     scope.session, removed, fdset_id)  # fmt: skip
