"""Updating a save in place: the second pass of a live save (docs/vm-image.md).

`memory-save` with `x-live` saves memory that may change meanwhile, and records as its
checksums what its file then holds (read back). `memory-save` with `x-update`, once the
memory stands still, hashes every unit of it again and saves again only the units whose
checksum changed: the others are in the file as they are in memory. That is only right
if the file holds a complete migd save of the same blocks at the same offset, with its
checksums; all of it is checked here, before any byte of the file changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import MigrationError
from ...io.digests import DIGEST_BYTES, UNIT_PAGES
from ...io.engine import BlockIO
from ...io.target import Target
from ..job import Job
from . import format, restore, save

_DIGEST = np.dtype((np.void, DIGEST_BYTES))


@dataclass(frozen=True)
class Previous:
    """The earlier save an update builds on: per block, its bitmap and unit digests."""

    bitmaps: list[np.ndarray]
    digests: list[bytes]
    save_id: str | None


def read_previous(job: Job, layout: format.SaveLayout, fd: int) -> Previous:
    """The save already in the file, which must be laid out exactly as `layout`."""
    target: Target = job.target
    path = target.name
    not_it = (
        f"'{path}' does not hold a complete migd save of these backends at offset {target.offset}"
    )
    for at, data in layout.head_writes:
        if restore.pread_all(fd, at, len(data), path) != data:
            raise MigrationError(f"{not_it} (its head differs): nothing to update")
    parsed = restore.parse(fd, target, require_mapped_ram=True)
    if [(b.name, b.length, b.pages_offset) for b in parsed.blocks] != [
        (b.name, b.length, b.pages_offset) for b in layout.blocks
    ]:
        raise MigrationError(f"{not_it} (its blocks differ): nothing to update")
    table = restore.read_checksums(fd, target, parsed)
    if table is None:
        raise MigrationError(f"{not_it} (it has no checksums to check kept pages against)")
    bitmaps = restore.read_bitmaps(job, list(parsed.blocks), fd)
    return Previous(bitmaps, list(table.digests), restore.save_id(parsed))


def changed_units(
    blocks: Sequence[BlockIO], now: Sequence[bytearray], before: Sequence[bytes]
) -> list[np.ndarray]:
    """Per block, one bool per page: in a unit whose memory no longer hashes as the
    earlier save's checksum of it (what its file holds)."""
    masks = []
    for block, a, b in zip(blocks, now, before, strict=True):
        units = np.frombuffer(bytes(a), dtype=_DIGEST) != np.frombuffer(b, dtype=_DIGEST)
        masks.append(np.repeat(units, UNIT_PAGES)[: block.pages])
    return masks


def invalidate_end(job: Job, layout: format.SaveLayout, fd: int) -> None:
    """Before the first page is rewritten: the earlier save's end section is cut, so that
    an update that fails or is cut off by a crash leaves a file that reads as incomplete,
    as an interrupted save does, never as complete with some units changed."""
    save.pwrite_all(fd, b"\0", layout.end_offset, job.target.name)
    save.fdatasync(fd, job.target.name)
