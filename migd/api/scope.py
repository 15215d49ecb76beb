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
3. its fd sets are removed (as remove-fd of the whole set; a set it only added fds to
   loses those fds).

What the client already deleted itself is skipped; nothing it does fails the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from ..errors import MigdError
from ..migration.engine import MigrationEngine
from ..migration.job import Job, JobStatus
from ..qmp.dispatch import Session, command
from ..qmp.validation import Empty
from ..state.fdsets import FdStore
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
    fdsets: set[int] = field(default_factory=set)  # sets this session created
    fds: list[tuple[int, int]] = field(default_factory=list)  # (set, fd) added to others'

    def __bool__(self) -> bool:
        return bool(self.jobs or self.backends or self.fdsets or self.fds)


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


def record_fd(ctx: Context, fdset_id: int, fd: int, new_set: bool) -> None:
    scope = scope_of(ctx.session)
    if scope is None:
        return
    if new_set:
        scope.fdsets.add(fdset_id)
    elif fdset_id not in scope.fdsets:
        scope.fds.append((fdset_id, fd))


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
        await asyncio.to_thread(backend.close)


async def _remove_fds(scope: SessionScope, fdsets: FdStore) -> None:
    listed = dict(fdsets.query())
    removals: list[tuple[int, int | None]] = [(s, None) for s in sorted(scope.fdsets)]
    removals += [(s, fd) for s, fd in scope.fds if s not in scope.fdsets]
    for fdset_id, fd in removals:
        present = listed.get(fdset_id)
        if not present or (fd is not None and all(f.fd != fd for f in present)):
            continue  # removed already
        log.info("client %d gone: removing its fd set %d", scope.session, fdset_id)
        try:
            # Off the loop, as remove-fd: the last close of a memfd frees its memory.
            await asyncio.to_thread(fdsets.remove_fd, fdset_id, fd)
        except MigdError as exc:
            log.info("client %d: fd set %d: %s", scope.session, fdset_id, exc)
