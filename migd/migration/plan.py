"""Planning a job before any memory is touched: which backend takes which block of a
file, whether the restore fits, and the page runs the channel threads share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import MigrationError
from ..io.engine import BlockIO, PageRun, split_runs
from ..io.target import Target
from ..pages import PAGE_SIZE, READ_CHUNK_PAGES
from ..state.memory import MemoryBackend
from .job import Job
from .mapped_ram import format


def check_room(path: str, needs: Sequence[tuple[MemoryBackend, int]]) -> None:
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


def match_blocks(
    backends: Sequence[MemoryBackend],
    parsed: format.ParsedStream,
    target: Target,
    skip_unmatched: bool,
) -> tuple[list[tuple[format.BlockLayout, MemoryBackend]], list[format.BlockLayout]]:
    """Each block of the file with the backend of its name among `backends` (a job's)."""
    by_name = {b.block_name: b for b in backends}
    matched, skipped = [], []
    for layout in parsed.blocks:
        backend = by_name.get(layout.name)
        if backend is None:
            if skip_unmatched:
                skipped.append(layout)
                continue
            raise MigrationError(f'Unknown ramblock "{layout.name}", cannot accept migration')
        if backend.size != layout.length:
            raise MigrationError(
                f"Length mismatch: block '{layout.name}' is {layout.length} bytes in "
                f"'{target.name}' but memory backend '{backend.id}' has {backend.size} bytes"
            )
        matched.append((layout, backend))
    if not matched:
        raise MigrationError(f"'{target.name}': no block in the file has a memory backend")
    return matched, skipped


def save_blocks(
    job: Job, layout: format.SaveLayout, presents: Sequence[np.ndarray] | None = None
) -> list[BlockIO]:
    """The save's blocks over its backends' memory; `presents`: their bitmaps to start
    from (an update's), else all clear."""
    blocks = []
    for index, (backend, block) in enumerate(zip(job.backends, layout.blocks, strict=True)):
        present = presents[index].copy() if presents is not None else None
        blocks.append(
            BlockIO(
                block.name,
                block.pages_offset,
                block.pages,
                backend.view(0, backend.size),
                present if present is not None else np.zeros(block.pages, dtype=bool),
                populate=backend.prefault,
                explain_fault=backend.fault_error,
                check_size=backend.shrink_error,
                content_fd=backend.shared_fd,
                huge_pages=backend.huge_pages,
            )
        )
    return blocks


def plan_save_runs(
    job: Job, layout: format.SaveLayout, detect: bool
) -> tuple[list[BlockIO], list[PageRun]]:
    """The save's blocks and page runs; `detect`: zero page detection is on."""
    blocks = save_blocks(job, layout)
    runs: list[PageRun] = []
    for index, (backend, block) in enumerate(zip(job.backends, layout.blocks, strict=True)):
        # Holes of a file-backed backend are zero pages found without touching memory.
        ranges = backend.data_ranges() if detect else None
        if ranges is None:
            ranges = [(0, backend.size)]
        page_runs = [(off // PAGE_SIZE, length // PAGE_SIZE) for off, length in ranges]
        job.hole_pages += block.pages - sum(count for _, count in page_runs)
        runs += split_runs(index, page_runs)
    return blocks, runs


def plan_update_runs(
    job: Job, blocks: Sequence[BlockIO], changed: Sequence[np.ndarray]
) -> list[PageRun]:
    """An update's runs: only the changed pages are saved again (their bits cleared
    first, set again for those not zero now); the others keep the earlier save's bits
    and slots, and count as done from the start."""
    runs: list[PageRun] = []
    for index, (block, mask) in enumerate(zip(blocks, changed, strict=True)):
        block.present &= ~mask
        job.hole_pages += block.pages - int(np.count_nonzero(mask))
        runs += split_runs(index, format.set_runs(mask))
    return runs


def plan_restore_runs(
    matched: Sequence[tuple[format.BlockLayout, MemoryBackend]],
    bitmaps: Sequence[np.ndarray],
    staging: bool = False,
) -> tuple[list[BlockIO], list[PageRun]]:
    """The restore's blocks and page runs: absent pages zeroed, present ones read.

    With `staging`, the present runs of a shared memory file on 4 KiB pages are read
    through the channels' staging buffers and written into the file (PageRun.staged,
    io/threads.py Staging), its pages allocated ahead by the Populator with fallocate
    (the block's populate is the backend's allocate): the writes only copy. Where
    writing into new pages turns out dear, the rest of the runs are read into the
    mapping, populated ahead (map_in; io/threads.py NewPages). Other memory is read into
    its mapping, populated ahead."""
    blocks: list[BlockIO] = []
    runs: list[PageRun] = []
    for index, ((layout, backend), present) in enumerate(zip(matched, bitmaps, strict=True)):
        stage = staging and backend.shared_fd is not None and not backend.huge_pages
        blocks.append(
            BlockIO(
                layout.name,
                layout.pages_offset,
                layout.pages,
                backend.view(0, backend.size),
                present,
                backend.zero_range,
                backend.allocate if stage else backend.populate,
                backend.fault_error,
                backend.shrink_error,
                backend.shared_fd,
                store=backend.write_at if stage else None,
                map_in=backend.populate if stage else None,
                holds_every_page=backend.holds_every_page if stage else None,
            )
        )
        runs += split_runs(index, format.set_runs(~present), zero=True)
        runs += split_runs(index, format.set_runs(present), chunk=READ_CHUNK_PAGES, staged=stage)
    return blocks, runs
