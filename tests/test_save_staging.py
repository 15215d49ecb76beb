"""Direct-io saves of memory files go through each channel's staging buffer
(io/threads.py Staging): read from the file, zero-scanned and hashed in the buffer,
written from it. The memory is never mapped for it, and the file it makes is the one the
mapping makes, byte for byte.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from migd.io.threads import NewPages, Storer, StorerLoad
from migd.pages import PAGE_SIZE

from .conftest import (
    add_file_backend,
    enable_mapped_ram,
    parse_save,
    read_bitmap,
    restore,
    save,
)

MiB = 1 << 20
SIZE = 24 * MiB


def memory_with_zero_runs(path: Path, split: bool = False) -> bytes:
    """Random pages with zero runs that a save skips (>= 1 MiB) and that it writes inline
    (shorter), placed across the runs' 8 MiB boundaries, and a page with one byte set in
    the middle of a long zero run. With `split`, also a zero run that the staging
    buffer's 4 MiB cut leaves under 1 MiB on one side: that part is written (zeros)
    where the mapped way skips it whole, so the two files differ there."""
    data = np.frombuffer(np.random.default_rng(5).bytes(SIZE), dtype=np.uint8).copy()
    runs = [
        (4 * MiB + 512 * 1024, 3 * MiB),  # skipped, inside one 4 MiB piece
        (8 * MiB - 5 * PAGE_SIZE, 10 * PAGE_SIZE),  # inline, across a run boundary
        (11 * MiB, MiB),  # exactly the skip threshold
        (14 * MiB, 5 * MiB),  # skipped, across 16 MiB, with one lone byte below
    ]
    if split:
        runs.append((SIZE - 4 * MiB - 256 * 1024, 2 * MiB))
    for start, length in runs:
        data[start : start + length] = 0
    data[17 * MiB + 123] = 0x5A
    data[SIZE - 100 :] = 0  # part of the last page: a data page still
    path.write_bytes(data.tobytes())
    return data.tobytes()


def mapped_rss(path: Path) -> int:
    """Bytes of `path`'s mappings in this process that are in memory (smaps Rss)."""
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                inside = fields[-1] == str(path)
            elif inside and fields[0] == "Rss:":
                rss += int(fields[1]) * 1024
    return rss


def set_staging(migd_inproc, on: bool) -> None:
    migd_inproc.daemon.services.engine.staging = on


@pytest.mark.parametrize(
    "staging, huge", [(True, False), (False, False), (True, True)],
    ids=["staged", "mapped", "huge-pages"],
)  # fmt: skip
async def test_a_direct_io_save_maps_none_of_the_memory_only_through_staging(
    migd_inproc, qmp, shm, short_dir, request, staging, huge
):
    """The assertion can fail: the mapped way populates the mapping. Memory on huge pages
    (a huge=always tmpfs) is saved from the mapping even with staging on."""
    set_staging(migd_inproc, staging)
    where = request.getfixturevalue("huge_tmpfs") if huge else shm
    memory_with_zero_runs(where / "ram0")
    await add_file_backend(qmp, "ram0", where / "ram0", SIZE, share=True)
    await enable_mapped_ram(qmp, channels=4, direct_io=True)
    assert mapped_rss(where / "ram0") == 0
    info = await save(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    rss = mapped_rss(where / "ram0")
    if staging and not huge:
        assert rss == 0
    else:
        assert rss > SIZE // 2


async def test_staged_and_mapped_saves_make_the_same_file_and_it_restores_verified(
    migd_inproc, qmp, shm, short_dir
):
    data = memory_with_zero_runs(shm / "ram0")
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    await enable_mapped_ram(qmp, channels=3, direct_io=True)
    infos = {}
    for staging in (True, False):
        set_staging(migd_inproc, staging)
        infos[staging] = await save(qmp, short_dir / f"{staging}.img")
        assert infos[staging]["status"] == "completed", infos[staging]
    staged, mapped = short_dir / "True.img", short_dir / "False.img"
    assert infos[True]["ram"]["normal"] == infos[False]["ram"]["normal"]
    assert infos[True]["ram"]["duplicate"] == infos[False]["ram"]["duplicate"] > 0
    block = parse_save(staged).blocks[0]
    assert read_bitmap(staged, block).tolist() == read_bitmap(mapped, block).tolist()
    assert not read_bitmap(staged, block)[(14 * MiB) // PAGE_SIZE]  # a skipped zero page
    assert read_bitmap(staged, block)[(17 * MiB) // PAGE_SIZE]  # the lone byte's page
    # Byte for byte, pages, bitmaps and checksum table, but for each save's random id and
    # the time it was made (to the second; same length).
    made = [parse_save(path).migd for path in (staged, mapped)]
    same = staged.read_bytes()
    for key in ("save-id", "time"):
        same = same.replace(made[0][key].encode(), made[1][key].encode())
    assert same == mapped.read_bytes()

    # The staged file restores, every unit verified against its recorded checksum.
    (shm / "ram0").write_bytes(b"\xee" * SIZE)
    info = await restore(qmp, staged)
    assert info["status"] == "completed", info
    assert (shm / "ram0").read_bytes() == data


async def test_a_save_of_a_huge_page_memory_file_restores_exactly(
    migd_inproc, qmp, huge_tmpfs, short_dir
):
    data = memory_with_zero_runs(huge_tmpfs / "ram0")
    await add_file_backend(qmp, "ram0", huge_tmpfs / "ram0", SIZE, share=True)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    info = await save(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    os.truncate(huge_tmpfs / "ram0", 0)
    os.truncate(huge_tmpfs / "ram0", SIZE)
    assert (await restore(qmp, short_dir / "save.img"))["status"] == "completed"
    assert (huge_tmpfs / "ram0").read_bytes() == data


async def test_a_zero_run_cut_by_the_staging_buffer_is_saved_and_restores_verified(
    qmp, shm, short_dir
):
    data = memory_with_zero_runs(shm / "ram0", split=True)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    info = await save(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    bitmap = read_bitmap(short_dir / "save.img", parse_save(short_dir / "save.img").blocks[0])
    cut = (SIZE - 4 * MiB) // PAGE_SIZE
    assert bitmap[cut - 64 : cut].all()  # the 256 KiB before the cut: written as zeros
    assert not bitmap[cut : cut + 256].any()  # the MiB and more after it: skipped
    (shm / "ram0").write_bytes(b"\xee" * SIZE)
    assert (await restore(qmp, short_dir / "save.img"))["status"] == "completed"
    assert (shm / "ram0").read_bytes() == data


def test_which_memory_files_count_as_on_huge_pages(shm, huge_tmpfs, short_dir):
    from migd.state.memory import _system_shmem_huge, pages_are_huge

    system = _system_shmem_huge()
    cases = {
        short_dir / "ext4": False,  # not tmpfs: 4 KiB page cache
        shm / "plain": system == "force",  # a tmpfs mounted without huge=
        huge_tmpfs / "huge": system != "deny",  # huge=always
    }
    for path, expected in cases.items():
        path.write_bytes(bytes(PAGE_SIZE))
        fd = os.open(path, os.O_RDONLY)
        try:
            assert pages_are_huge(fd) is expected, path
        finally:
            os.close(fd)
    memfd = os.memfd_create("migd-test")
    try:  # no mount of its own: the system's setting
        assert pages_are_huge(memfd) is (system in ("always", "within_size", "force"))
    finally:
        os.close(memfd)


# --- restores ---------------------------------------------------------------------------


@pytest.mark.parametrize("used", [True, False], ids=["used-memory", "empty-file"])
async def test_a_restore_into_used_memory_maps_none_of_it(
    migd_inproc, qmp, shm, short_dir, used, monkeypatch
):
    """A restore into a memory file goes through the staging buffers and pwrite, into
    pages that held data as into its holes (allocated ahead with fallocate): none of the
    memory is mapped (a restore into the mapping faults in more than half of it). New
    pages are taken as cheap, whatever this machine's are now (the next test: dear)."""
    monkeypatch.setattr(NewPages, "DEAR_SECONDS_PER_GIB", float("inf"))
    data = memory_with_zero_runs(shm / "ram0")
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    await enable_mapped_ram(qmp, channels=4, direct_io=True)
    assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
    await qmp.execute("object-del", {"id": "ram0"})
    if used:
        (shm / "ram0").write_bytes(b"\xee" * SIZE)
    else:
        os.truncate(shm / "ram0", 0)
        os.truncate(shm / "ram0", SIZE)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    assert mapped_rss(shm / "ram0") == 0
    info = await restore(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    assert mapped_rss(shm / "ram0") == 0
    assert (shm / "ram0").read_bytes() == data


async def test_once_new_pages_are_dear_the_rest_is_read_into_the_mapping(
    migd_inproc, qmp, shm, short_dir, monkeypatch
):
    """Where writing into new pages is dear (each write's CPU time over the bound: here
    every write's), the channel reads the runs it has not staged yet straight into the
    mapping and the populator maps them ahead, and the restore is whole, its checksums
    verified, as the staged way's. One channel, six 4 MiB runs of random data: the
    first write into the file frees the buffer the third run waits for, so the fourth to
    sixth at least are read into the mapping."""
    monkeypatch.setattr(NewPages, "DEAR_SECONDS_PER_GIB", -1.0)
    monkeypatch.setattr(NewPages, "WINDOW", 1)  # judged at every write
    data = np.random.default_rng(7).bytes(SIZE)
    (shm / "ram0").write_bytes(data)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    await enable_mapped_ram(qmp, channels=1, direct_io=True)
    assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
    await qmp.execute("object-del", {"id": "ram0"})
    os.truncate(shm / "ram0", 0)
    os.truncate(shm / "ram0", SIZE)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    info = await restore(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    assert info["x-checksums"]["state"] == "verified", info
    assert mapped_rss(shm / "ram0") >= 3 * 4 * MiB
    assert (shm / "ram0").read_bytes() == data


def channels_store_their_own_runs(monkeypatch) -> dict[str, Any]:
    """Make every staged restore's Storer judge itself the bound at its third run (the
    second is the warm-up window; idle under twice its time), so that the channels check
    and store the runs after it (with one channel: from the fifth run on, read into the
    buffer the third run frees);
    the threads that ran Storer.run ("storer") and that stored each run, by its first
    page ("stored")."""
    monkeypatch.setattr(StorerLoad, "IDLE", 2.0)
    monkeypatch.setattr(StorerLoad, "WINDOW", 1)
    seen: dict[str, Any] = {"storer": set(), "stored": {}}
    run, store = Storer.run, Storer.store

    def spied_run(self, cancel):
        seen["storer"].add(threading.get_ident())
        return run(self, cancel)

    def spied_store(self, page_run, data):
        seen["stored"][page_run.first_page] = threading.get_ident()
        return store(self, page_run, data)

    monkeypatch.setattr(Storer, "run", spied_run)
    monkeypatch.setattr(Storer, "store", spied_store)
    return seen


async def test_channels_that_store_their_own_runs_restore_whole_and_verified(
    migd_inproc, qmp, shm, short_dir, monkeypatch
):
    """Once the Storer is found to bound a restore (StorerLoad), the channels check and
    write their own runs: the memory is the saved one, its checksums verified, none of it
    mapped; the first runs were stored by the Storer, the last ones by the channel."""
    monkeypatch.setattr(NewPages, "DEAR_SECONDS_PER_GIB", float("inf"))
    seen = channels_store_their_own_runs(monkeypatch)
    data = np.random.default_rng(11).bytes(SIZE)
    (shm / "ram0").write_bytes(data)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    await enable_mapped_ram(qmp, channels=1, direct_io=True)
    assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
    await qmp.execute("object-del", {"id": "ram0"})
    (shm / "ram0").write_bytes(b"\xee" * SIZE)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    info = await restore(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    assert info["x-checksums"]["state"] == "verified", info
    assert mapped_rss(shm / "ram0") == 0
    assert (shm / "ram0").read_bytes() == data
    stored = [seen["stored"][first] for first in sorted(seen["stored"])]
    assert len(stored) == SIZE // (4 * MiB), seen
    assert stored[0] in seen["storer"] and stored[-1] not in seen["storer"], seen


def test_the_storer_is_the_bound_only_when_it_is_seldom_idle():
    """StorerLoad: the first window decides nothing (the job's start, the first reads, the
    backlog of the channels' buffers filled at once); a window in which the Storer waited
    under IDLE of its time switches the job for good, one in which it waited more does
    not."""
    window = StorerLoad.WINDOW // (4 * MiB)
    load = StorerLoad()
    load.stored(4 * MiB, 100.0)  # the first run: the first read's wait, not the Storer's
    for _ in range(window - 1):
        load.stored(4 * MiB, 0.0)
    assert not load.inline  # the warm-up window
    for _ in range(window):
        load.stored(4 * MiB, 0.0)
    assert load.inline
    for _ in range(3 * window):
        load.stored(4 * MiB, 10.0)
    assert load.inline  # for good
    idle = StorerLoad()
    idle.stored(4 * MiB, 0.0)
    for _ in range(window):
        idle.stored(4 * MiB, 0.0)  # busy while warming up only
    for _ in range(3 * window):
        idle.stored(4 * MiB, 10.0)  # waited far longer than it stored
    assert not idle.inline


@pytest.mark.parametrize(
    ("channels", "own_runs"),
    [(1, False), (4, False), (1, True)],
    ids=["1-storer", "4-storer", "1-channel-stores"],
)
async def test_a_corrupt_unit_never_reaches_used_memory(
    qmp, shm, short_dir, channels, own_runs, monkeypatch
):
    """A staged restore checks each whole unit in its buffer before it writes it, the
    Storer as a channel that stores its own runs (the unit flipped then lies in the last
    run, which the channel stores): the unit whose byte was flipped in the file fails the
    job, and that unit of memory keeps what it held (a restore into the mapping would
    have landed it, then failed)."""
    seen = channels_store_their_own_runs(monkeypatch) if own_runs else None
    memory_with_zero_runs(shm / "ram0")
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    await enable_mapped_ram(qmp, channels=channels, direct_io=True)
    assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
    block = parse_save(short_dir / "save.img").blocks[0]
    # random data, saved in full; with 4 channels, runs after it are in flight
    unit = 21 if own_runs else 2
    with open(short_dir / "save.img", "r+b") as f:
        at = block.pages_offset + unit * MiB + 4000
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))
    (shm / "ram0").write_bytes(b"\xee" * SIZE)
    info = await restore(qmp, short_dir / "save.img")
    assert info["status"] == "failed"
    assert "checksum mismatch in ramblock 'ram0'" in info["error-desc"], info
    with open(shm / "ram0", "rb") as f:
        assert os.pread(f.fileno(), MiB, unit * MiB) == b"\xee" * MiB
    if seen is not None:  # the channel's thread met the flipped unit: in its last run
        last = max(seen["stored"])
        assert last <= unit * MiB // PAGE_SIZE, seen
        assert seen["stored"][last] not in seen["storer"], seen


def test_pages_lost_from_a_file_written_through_are_found_after_the_restore(shm):
    """A memory file cut short and grown back during a staged restore keeps its size but
    lost the pages between, as holes: check_sizes reports them (the size alone passes)."""
    from migd.errors import MemoryFault
    from migd.io.engine import BlockIO, check_sizes

    path = shm / "lost"
    path.write_bytes(b"\x01" * (4 * MiB))
    os.truncate(path, MiB)
    os.truncate(path, 4 * MiB)  # [1 MiB, 4 MiB) are holes now
    fd = os.open(path, os.O_RDWR)
    try:
        pages = 4 * MiB // PAGE_SIZE
        present = np.ones(pages, dtype=bool)
        block = BlockIO("ram0", 0, pages, memoryview(bytearray(0)), present, content_fd=fd,
                        store=lambda data, offset: None)  # fmt: skip
        with pytest.raises(MemoryFault, match="lost restored pages at byte 0x100000"):
            check_sizes([block], "restore")
        present[MiB // PAGE_SIZE :] = False  # those pages were zero pages: no loss
        check_sizes([block], "restore")
    finally:
        os.close(fd)


def _stored_block(backend: Any) -> Any:
    """The BlockIO a staged restore has of `backend` (plan_restore_runs), all pages present."""
    from migd.io.engine import BlockIO

    pages = backend.size // PAGE_SIZE
    return BlockIO("ram0", 0, pages, memoryview(bytearray(0)), np.ones(pages, dtype=bool),
                   content_fd=backend.shared_fd, store=backend.write_at,
                   holds_every_page=backend.holds_every_page)  # fmt: skip


def _record_seeks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The `whence` of every os.lseek from now on (until monkeypatch.undo), in order."""
    seeks: list[int] = []
    real = os.lseek

    def spy(fd: int, pos: int, how: int) -> int:
        seeks.append(how)
        return real(fd, pos, how)

    monkeypatch.setattr(os, "lseek", spy)
    return seeks


@pytest.mark.parametrize("where", ["tmpfs", "ext4"])
def test_pages_lost_from_a_memory_backend_are_found_where_its_blocks_count_too(
    shm: Path, where: str
) -> None:
    """check_stored trusts a tmpfs file's block count instead of walking its pages: a
    file cut short and grown back by a later write has holes, fewer blocks than bytes,
    and the walk finds them; on ext4 (whose blocks count its metadata too) it always
    walks."""
    import tempfile

    from migd.errors import MemoryFault
    from migd.io.engine import check_sizes
    from migd.state.memory import create_file_backend

    with tempfile.TemporaryDirectory(dir=shm if where == "tmpfs" else "/tmp") as d:
        path = Path(d) / "ram0"
        path.write_bytes(b"\x01" * (4 * MiB))
        backend = create_file_backend("m", 4 * MiB, str(path))
        try:
            assert backend.holds_every_page() is (where == "tmpfs")
            check_sizes([_stored_block(backend)], "restore")
            os.truncate(path, MiB)
            os.pwrite(backend.shared_fd, b"\x02" * PAGE_SIZE, 4 * MiB - PAGE_SIZE)
            assert os.path.getsize(path) == 4 * MiB
            assert not backend.holds_every_page()
            with pytest.raises(MemoryFault, match="lost restored pages at byte 0x100000"):
                check_sizes([_stored_block(backend)], "restore")
        finally:
            backend.close()


def test_a_whole_tmpfs_memory_file_is_checked_without_walking_its_pages(
    shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore through a tmpfs file with no hole ends with one fstat, not a SEEK_HOLE
    walk over every page (8 ms per GiB, docs/bench/fast-disk "Session 27"); one with a
    hole anywhere is walked."""
    from migd.io.engine import check_sizes
    from migd.state.memory import create_file_backend

    path = shm / "ram0"
    path.write_bytes(b"\x01" * (4 * MiB))
    backend = create_file_backend("m", 4 * MiB, str(path))
    try:
        seeks = _record_seeks(monkeypatch)
        check_sizes([_stored_block(backend)], "restore")
        assert os.SEEK_HOLE not in seeks
        backend.zero_range(3 * MiB, PAGE_SIZE)  # a hole outside the present pages
        block = _stored_block(backend)
        block.present[3 * MiB // PAGE_SIZE] = False
        check_sizes([block], "restore")
        assert os.SEEK_HOLE in seeks
    finally:
        monkeypatch.undo()
        backend.close()


async def test_a_restore_into_a_whole_tmpfs_file_ends_without_walking_its_pages(
    migd_inproc, qmp, shm, short_dir, monkeypatch
):
    """The daemon's staged restores hand check_stored the backend's holds_every_page: a
    restore of memory without zero pages into a used tmpfs file seeks no hole."""
    data = np.random.default_rng(11).bytes(SIZE)
    (shm / "ram0").write_bytes(data)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
    (shm / "ram0").write_bytes(b"\xee" * SIZE)
    seeks = _record_seeks(monkeypatch)
    info = await restore(qmp, short_dir / "save.img")
    monkeypatch.undo()
    assert info["status"] == "completed", info
    assert os.SEEK_HOLE not in seeks
    assert (shm / "ram0").read_bytes() == data


async def test_a_memory_file_whose_data_starts_pages_in_saves_staged_and_restores_verified(
    migd_inproc, qmp, shm, short_dir
):
    """A staged run starts where the memory file's data starts (SEEK_DATA), here 3 pages
    in, after holes, and the 4 MiB buffers are cut from there: none starts on a unit's
    first page. Only the units a buffer covers whole may be hashed from it. Counting from
    the unit a buffer begins in hashed that unit from the wrong bytes (unit 4, of the
    buffer from page 1027), and the restore of a good save failed with "checksum mismatch
    ... the file is corrupt"."""
    set_staging(migd_inproc, True)
    path = shm / "ram0"
    rest = np.random.default_rng(7).bytes(SIZE - 3 * PAGE_SIZE)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        os.pwrite(f.fileno(), rest, 3 * PAGE_SIZE)  # pages 0-2 stay holes
    data = bytes(3 * PAGE_SIZE) + rest
    await add_file_backend(qmp, "ram0", path, SIZE, share=True)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    info = await save(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    assert mapped_rss(path) == 0  # saved through the staging buffers, not the mapping
    path.write_bytes(b"\xee" * SIZE)
    info = await restore(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    assert path.read_bytes() == data
