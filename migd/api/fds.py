"""fd passing commands, QEMU's: getfd, closefd, add-fd, remove-fd, query-fdsets.

Each fd travels as SCM_RIGHTS on the socket just before (or with) the command that
takes it; the store owns it from then on.

The commands that close stored fds (getfd replacing a namesake, closefd, remove-fd) run
the store's call in a worker thread: the close of the last reference to a memfd frees
its memory, 50 ms per GiB (8 GiB: 400 ms), in which no other client was answered
(red-team, session 16). The reply still comes once the fds are closed.
"""

from __future__ import annotations

import os

from ..errors import InvalidRequest
from ..io import blocking
from ..qapi import Int64
from ..qmp.dispatch import command
from ..qmp.validation import Empty, QapiModel
from .context import Context
from .scope import record_fd


class GetfdArgs(QapiModel):
    fdname: str


@command(
    "getfd",
    GetfdArgs,
    Empty,
    "Keep the fd sent with this command (SCM_RIGHTS) under 'fdname', closing any fd "
    "already of that name. The name must not start with a digit. Names are the client's "
    "uid's (root's and migd's share theirs).",
)
async def getfd(ctx: Context, args: GetfdArgs) -> Empty:
    fd = ctx.session.take_fd()
    uid = blocking.capped_uid()
    await blocking.to_thread(ctx.services.fdsets.add_named, args.fdname, fd, uid)
    return Empty()


class ClosefdArgs(QapiModel):
    fdname: str


@command("closefd", ClosefdArgs, Empty, "Close the fd kept by getfd under 'fdname'.")
async def closefd(ctx: Context, args: ClosefdArgs) -> Empty:
    uid = blocking.capped_uid()
    await blocking.to_thread(ctx.services.fdsets.close_named, args.fdname, uid)
    return Empty()


# add-fd's note on an fd (libvirt's are names such as "libvirt-1-storage").
MAX_OPAQUE_CHARS = 1024


class AddFdArgs(QapiModel):
    fdset_id: Int64 | None = None
    opaque: str | None = None


class AddfdInfo(QapiModel):
    fdset_id: int
    fd: int


@command(
    "add-fd",
    AddFdArgs,
    AddfdInfo,
    "Add the fd sent with this command (SCM_RIGHTS) to fdset 'fdset-id' (created if "
    "needed; default: the lowest free id), with an optional 'opaque' note (at most 1024 "
    "characters). A path "
    "'/dev/fdset/N' then opens as a dup of the newest fd of set N whose access mode and "
    "O_DIRECT flag match the open. Returns the set's id and migd's number for the fd. A "
    "set belongs to the uid that made it: a client of another uid than root's and migd's "
    "sees, opens, joins and removes only its own uid's (migd's).",
)
async def add_fd(ctx: Context, args: AddFdArgs) -> AddfdInfo:
    fd = ctx.session.take_fd()
    if args.opaque is not None and len(args.opaque) > MAX_OPAQUE_CHARS:
        # Kept as long as the fd and sent back by every query-fdsets: unbounded, a few
        # clients made it hundreds of MiB, encoded on the event loop for seconds.
        await blocking.to_thread(os.close, fd)  # a close may wait (add_fd's comment)
        raise InvalidRequest(
            f"Parameter 'opaque' is {len(args.opaque)} characters long: at most "
            f"{MAX_OPAQUE_CHARS}"
        )
    # In a thread: a refused fd is closed, and the close of a client's file on a FUSE mount
    # of theirs waits for its FLUSH, which they may never answer (on the event loop, it
    # froze the daemon; red-team, session 17).
    # The set is the uid's (state/fdsets.py): another uid's is refused.
    uid = blocking.capped_uid()
    fdset_id, number = await blocking.to_thread(
        ctx.services.fdsets.add_fd, fd, args.fdset_id, args.opaque, uid
    )
    record_fd(ctx, fdset_id, number)
    return AddfdInfo(fdset_id=fdset_id, fd=number)


class RemoveFdArgs(QapiModel):
    fdset_id: Int64
    fd: Int64 | None = None


@command(
    "remove-fd",
    RemoveFdArgs,
    Empty,
    "Close fd 'fd' of fdset 'fdset-id', or every fd of the set without 'fd'. As in QEMU, "
    "a set without fds disappears once no dup opened from it (a running migration's "
    "channels, a memory backend on /dev/fdset/N) is open any more; until then "
    "query-fdsets lists it with no fds and add-fd does not reuse its id.",
)
async def remove_fd(ctx: Context, args: RemoveFdArgs) -> Empty:
    uid = blocking.capped_uid()
    await blocking.to_thread(ctx.services.fdsets.remove_fd, args.fdset_id, args.fd, uid)
    return Empty()


class FdsetFdInfo(QapiModel):
    fd: int
    opaque: str | None = None


class FdsetInfo(QapiModel):
    fdset_id: int
    fds: list[FdsetFdInfo]


@command(
    "query-fdsets",
    Empty,
    list[FdsetInfo],
    "List the fdsets and their fds (with 'opaque' where given), in QEMU's order: for a "
    "client of another uid than root's and migd's, its own uid's sets only (migd's).",
)
async def query_fdsets(ctx: Context, args: Empty) -> list[FdsetInfo]:
    return [
        FdsetInfo(fdset_id=fdset_id, fds=[FdsetFdInfo(fd=f.fd, opaque=f.opaque) for f in fds])
        for fdset_id, fds in ctx.services.fdsets.query(blocking.capped_uid())
    ]
