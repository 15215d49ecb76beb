"""A direct-io save's page slots in its file: allocated before the channels write them,
and the slots of the pages found zero freed again once they have.

On ext4, an O_DIRECT write that allocates blocks (into a hole) takes the file's inode
lock exclusively for its whole length, so the channels' writes into a new save file went
one at a time, whatever the channel count. Into blocks allocated beforehand (fallocate:
unwritten extents, which read as zeros) they take it shared and run side by side (none
extends the file: its head already ends past the pages, format.plan_save). Plain loops of
four threads writing 4 MiB O_DIRECT calls into a new 1.5 GiB file of that length on the
fast disk (ext4 over a loop device on tmpfs): 8.8 GiB/s as it was, 11.4 with its blocks
allocated first, as fast as overwriting a file (11.7); fallocate per call, in the writing
threads, gained nothing (it waits for the writes in flight). On this machine's virtio
disk the same (1.8 against 2.0 GiB/s): there new blocks cost the host (a discard mount).
docs/bench/fast-disk/README.md, "Session 24".

The slots allocated are those of the runs the save will write (a memory file's holes are
not among them); the zero scan finds the rest of the zero pages only as the channels go,
so their slots are allocated too, and punched out again at the end (free_absent), before
the save's syncs: the file takes no more room than a save without it. A save that fails
or is cancelled frees the slots of every page it did not write the same way. Only on
ext4, where it was measured, and only where the filesystem has room for every slot and
HEADROOM besides: a save whose zero pages made it fit must not fail for want of their
room.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from ...fallocate import KEEP_SIZE, PUNCH_HOLE, fallocate
from ...io.engine import BlockIO, PageRun
from ...pages import PAGE_SIZE
from ...state.overlay import fs_type
from ..job import Job
from . import format

log = logging.getLogger(__name__)

EXT4_MAGIC = 0xEF53  # statfs f_type of ext2, ext3 and ext4
HEADROOM = 64 << 20  # bytes left free beyond the slots, for everything else on the disk

Slots = list[tuple[int, int, int]]  # (block index, first page, pages) allocated


def allocate(job: Job, blocks: Sequence[BlockIO], runs: Sequence[PageRun], fd: int) -> Slots:
    """Allocate the file's slots of `runs` -> the slots allocated (none where the
    filesystem is not ext4, lacks the room or refuses)."""
    if fs_type(fd) != EXT4_MAGIC or not runs:
        return []
    slots = _coalesce(runs)
    needed = sum(pages for _, _, pages in slots) * PAGE_SIZE
    try:
        st = os.fstatvfs(fd)
    except OSError:
        return []  # the writes allocate, as without this
    if st.f_bavail * st.f_frsize < needed + HEADROOM:
        log.debug("'%s': %d bytes free, not enough to allocate the %d bytes of page slots "
                  "ahead", job.target.name, st.f_bavail * st.f_frsize, needed)  # fmt: skip
        return []
    allocated: Slots = []
    for block, first, pages in slots:
        code = fallocate(fd, KEEP_SIZE, blocks[block].page_offset(first), pages * PAGE_SIZE)
        if code != 0:  # the writes allocate the rest, as without this
            log.debug("'%s': page slots not allocated ahead: %s", job.target.name,
                      os.strerror(code))  # fmt: skip
            break
        allocated.append((block, first, pages))
    return allocated


def free_absent(job: Job, blocks: Sequence[BlockIO], allocated: Slots, fd: int) -> None:
    """Punch out the allocated slots of the pages the save did not write (zero pages):
    once every channel has stopped, before the syncs. A failure only costs room: the
    slots read as zeros, and no reader looks at an absent page's slot."""
    for block, first, pages in allocated:
        io = blocks[block]
        for lo, count in format.set_runs(~io.present[first : first + pages]):
            code = fallocate(fd, PUNCH_HOLE | KEEP_SIZE, io.page_offset(first + lo),
                             count * PAGE_SIZE)  # fmt: skip
            if code != 0:
                log.warning("'%s': could not free the slots of zero pages: %s",
                            job.target.name, os.strerror(code))  # fmt: skip
                return


def _coalesce(runs: Sequence[PageRun]) -> Slots:
    """The runs as (block, first page, pages), adjacent ones of a block joined."""
    out: Slots = []
    for run in sorted(runs, key=lambda r: (r.block, r.first_page)):
        if out and out[-1][0] == run.block and out[-1][1] + out[-1][2] == run.first_page:
            block, first, pages = out[-1]
            out[-1] = (block, first, pages + run.pages)
        else:
            out.append((run.block, run.first_page, run.pages))
    return out
