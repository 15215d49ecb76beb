"""Updating a save in place: what must hold before only some pages are written again.

`memory-save` with `x-dirty-pages` (docs/vm-image.md, live save) rewrites the pages a
caller reports dirty since an earlier save to the same file and keeps every other page's
slot and bit. That is only right if the file holds a complete migd save of the same
blocks at the same offset, with its checksums (the update hashes every unit again and
compares the kept ones with them: io/checksums.py). All of it is checked here, before
any byte of the file changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import MigrationError
from ...io.target import Target
from ..job import Job
from . import format, restore


@dataclass(frozen=True)
class Previous:
    """The earlier save an update builds on: per block, its bitmap and unit digests."""

    bitmaps: list[np.ndarray]
    digests: list[bytes]
    save_id: str | None


def read_previous(job: Job, layout: format.SaveLayout, fd: int) -> Previous:
    """The save already in the file, which must be laid out exactly as `layout`."""
    target: Target = job.target
    path = target.path
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


def dirty_masks(
    job: Job, layout: format.SaveLayout, bitmaps: Mapping[str, bytes]
) -> list[np.ndarray]:
    """Each block's dirty pages from the request's bitmaps (by backend id; a backend
    not named has none), each exactly one bit per page, least significant bit first."""
    ids = {b.id for b in job.backends}
    unknown = sorted(set(bitmaps) - ids)
    if unknown:
        raise MigrationError(
            f"'x-dirty-pages' names {', '.join(repr(i) for i in unknown)}: "
            "not a backend of this job"
        )
    masks: list[np.ndarray] = []
    for backend, block in zip(job.backends, layout.blocks, strict=True):
        raw = bitmaps.get(backend.id)
        if raw is None:
            masks.append(np.zeros(block.pages, dtype=bool))
            continue
        want = -(-block.pages // 8)
        if len(raw) != want:
            raise MigrationError(
                f"'x-dirty-pages' of '{backend.id}' has {len(raw)} bytes; its {block.pages} "
                f"pages need {want}"
            )
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        if bits[block.pages :].any():
            raise MigrationError(f"'x-dirty-pages' of '{backend.id}' marks pages past its end")
        masks.append(bits[: block.pages].astype(bool))
    return masks


def invalidate_end(job: Job, layout: format.SaveLayout, fd: int) -> None:
    """Before the first page is rewritten: the earlier save's end section is cut, so that
    an update that fails or is cut off by a crash leaves a file that reads as incomplete,
    as an interrupted save does, never as complete with some units changed."""
    path = job.target.path
    try:
        os.pwrite(fd, b"\0", layout.end_offset)
        os.fdatasync(fd)
    except OSError as exc:
        raise MigrationError(f"Could not write '{path}': {exc.strerror}") from None


def truncate_to(fd: int, end: int, path: str) -> None:
    """An update's end section may be shorter than the one it replaces: cut the rest,
    since the checksum table must end the file."""
    try:
        os.ftruncate(fd, end)
    except OSError as exc:
        raise MigrationError(f"Could not truncate '{path}' to {end}: {exc.strerror}") from None


def pages_totals(blocks: Sequence[np.ndarray]) -> tuple[int, int]:
    """(normal, zero) pages of the updated save, from its bitmaps."""
    normal = sum(int(np.count_nonzero(b)) for b in blocks)
    return normal, sum(b.size for b in blocks) - normal
