"""Memory backends on real files: tmpfs (/dev/shm) and ext4 (/tmp)."""

from __future__ import annotations

import errno
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from migd.errors import BackendError
from migd.state import memory
from migd.state.memory import (
    PAGE_SIZE,
    MemoryRegistry,
    create_file_backend,
    create_ram_backend,
)

MiB = 1 << 20
FILESYSTEMS = ["/dev/shm", "/tmp"]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(params=FILESYSTEMS, ids=["tmpfs", "ext4"])
def fsdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir=request.param, prefix="migd-test-") as d:
        yield Path(d)


@pytest.fixture
def ext4dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="migd-test-") as d:
        yield Path(d)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


def test_a_missing_file_is_created_with_mode_0600_and_extended_to_size(fsdir: Path) -> None:
    path = fsdir / "ram"
    b = create_file_backend("ram0", 2 * MiB, str(path))
    try:
        st = path.stat()
        assert st.st_size == 2 * MiB
        assert st.st_mode & 0o777 == 0o600
        assert (b.id, b.block_name, b.size) == ("ram0", "ram0", 2 * MiB)
        assert b.qom_type == "memory-backend-file"
        assert b.mem_path == str(path) and b.share is True and b.in_use == 0
        assert bytes(b.view(0, 2 * MiB)) == bytes(2 * MiB)
    finally:
        b.close()


def test_a_smaller_file_is_refused_unchanged_and_a_larger_one_is_never_shrunk(
    fsdir: Path,
) -> None:
    small, large, empty = fsdir / "small", fsdir / "large", fsdir / "empty"
    small.write_bytes(b"x" * 100)
    large.write_bytes(b"y" * (3 * MiB))
    empty.write_bytes(b"")
    before = small.stat()
    with pytest.raises(BackendError) as refused:
        create_file_backend("a", MiB, str(small))
    assert refused.value.desc == (
        "a backing store size 0x64 is too small for 'size' option 0x100000 plus "
        "'offset' option 0x0"
    )
    after = small.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert small.read_bytes() == b"x" * 100
    b2 = create_file_backend("b", MiB, str(large))
    b3 = create_file_backend("c", MiB, str(empty))
    try:
        assert large.stat().st_size == 3 * MiB
        assert len(b2.view(0, MiB)) == MiB
        assert empty.stat().st_size == MiB
    finally:
        b2.close()
        b3.close()
    assert large.stat().st_size == 3 * MiB


def test_existing_file_data_is_visible_through_view(fsdir: Path) -> None:
    path = fsdir / "ram"
    data = pattern(MiB)
    path.write_bytes(data)
    b = create_file_backend("m", MiB, str(path))
    try:
        assert bytes(b.view(0, MiB)) == data
        assert bytes(b.view(8 * PAGE_SIZE, PAGE_SIZE)) == data[8 * PAGE_SIZE:9 * PAGE_SIZE]
    finally:
        b.close()


def test_writes_through_a_shared_view_land_in_the_file(fsdir: Path) -> None:
    path = fsdir / "ram"
    b = create_file_backend("m", MiB, str(path))
    try:
        data = pattern(4 * PAGE_SIZE, seed=3)
        b.view(4 * PAGE_SIZE, len(data))[:] = data
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, len(data), 4 * PAGE_SIZE) == data
        finally:
            os.close(fd)
    finally:
        b.close()


def test_a_view_is_usable_as_a_preadv_and_pwritev_buffer(fsdir: Path) -> None:
    src, dst = fsdir / "src", fsdir / "dst"
    data = pattern(MiB, seed=5)
    src.write_bytes(data)
    b = create_file_backend("m", MiB, str(dst))
    fd = os.open(src, os.O_RDWR)
    try:
        assert os.preadv(fd, [b.view(0, MiB)], 0) == MiB
        assert dst.read_bytes() == data
        assert os.pwritev(fd, [b.view(0, PAGE_SIZE)], MiB) == PAGE_SIZE
    finally:
        os.close(fd)
        b.close()


def test_a_private_file_mapping_never_writes_to_the_file(fsdir: Path) -> None:
    path = fsdir / "ram"
    data = pattern(MiB)
    path.write_bytes(data)
    b = create_file_backend("m", MiB, str(path), share=False)
    try:
        b.view(0, PAGE_SIZE)[:] = bytes(PAGE_SIZE)
        b.zero_range(PAGE_SIZE, 2 * PAGE_SIZE)
        assert bytes(b.view(0, 3 * PAGE_SIZE)) == bytes(3 * PAGE_SIZE)
        assert bytes(b.view(3 * PAGE_SIZE, PAGE_SIZE)) == data[3 * PAGE_SIZE:4 * PAGE_SIZE]
        assert path.read_bytes() == data
        assert b.data_ranges() is None
    finally:
        b.close()


def test_zero_range_zeroes_a_shared_file_backend_and_keeps_its_size(fsdir: Path) -> None:
    path = fsdir / "ram"
    data = pattern(4 * MiB, seed=9)
    path.write_bytes(data)
    b = create_file_backend("m", 4 * MiB, str(path))
    try:
        blocks_before = path.stat().st_blocks
        b.zero_range(MiB, 2 * MiB)
        # Checked before reading: a read fault on a tmpfs hole allocates the page again.
        assert path.stat().st_blocks < blocks_before  # a hole was punched, not zeros written
        expected = data[:MiB] + bytes(2 * MiB) + data[3 * MiB:]
        assert bytes(b.view(0, 4 * MiB)) == expected
        assert path.read_bytes() == expected
        assert path.stat().st_size == 4 * MiB
    finally:
        b.close()


def test_zero_range_writes_zeros_when_neither_punching_nor_madv_remove_work(
        fsdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "fallocate", lambda *args: errno.EOPNOTSUPP)
    monkeypatch.setattr(memory.mmap, "MADV_REMOVE", 0x7FFF, raising=False)  # invalid: EINVAL
    path = fsdir / "ram"
    data = pattern(12 * MiB, seed=2)
    path.write_bytes(data)
    b = create_file_backend("m", 12 * MiB, str(path))
    try:
        b.zero_range(PAGE_SIZE, 10 * MiB)  # more than one zero-buffer step
        expected = data[:PAGE_SIZE] + bytes(10 * MiB) + data[PAGE_SIZE + 10 * MiB:]
        assert bytes(b.view(0, 12 * MiB)) == expected
        assert path.read_bytes() == expected
    finally:
        b.close()


def test_zero_range_zeroes_an_anonymous_backend() -> None:
    b = create_ram_backend("r", 2 * MiB)
    try:
        data = pattern(2 * MiB, seed=4)
        b.view(0, 2 * MiB)[:] = data
        b.zero_range(PAGE_SIZE, 3 * PAGE_SIZE)
        expected = data[:PAGE_SIZE] + bytes(3 * PAGE_SIZE) + data[4 * PAGE_SIZE:]
        assert bytes(b.view(0, 2 * MiB)) == expected
        assert (b.qom_type, b.mem_path, b.share) == ("memory-backend-ram", None, False)
        assert b.data_ranges() is None
    finally:
        b.close()


def test_populate_keeps_contents_of_file_and_anonymous_backends(fsdir: Path) -> None:
    path = fsdir / "ram"
    data = pattern(2 * MiB, seed=6)
    path.write_bytes(data[:MiB])
    os.truncate(path, 2 * MiB)  # second half is a hole to be populated
    b = create_file_backend("m", 2 * MiB, str(path))
    r = create_ram_backend("r", 2 * MiB)
    try:
        b.populate(0, 2 * MiB)
        assert bytes(b.view(0, 2 * MiB)) == data[:MiB] + bytes(MiB)
        r.view(0, MiB)[:] = data[:MiB]
        r.populate(0, 2 * MiB)
        assert bytes(r.view(0, 2 * MiB)) == data[:MiB] + bytes(MiB)
    finally:
        b.close()
        r.close()


def test_populate_falls_back_to_posix_fallocate_and_keeps_contents(
        fsdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_MADV_POPULATE_WRITE", 0x7FFF)
    path = fsdir / "ram"
    data = pattern(MiB, seed=8)
    path.write_bytes(data)
    os.truncate(path, 2 * MiB)
    b = create_file_backend("m", 2 * MiB, str(path))
    try:
        b.populate(0, 2 * MiB)
        assert path.read_bytes() == data + bytes(MiB)
        assert path.stat().st_blocks * 512 >= 2 * MiB  # really allocated
    finally:
        b.close()


def test_data_ranges_finds_the_written_pages_of_a_sparse_file(fsdir: Path) -> None:
    path = fsdir / "ram"
    b = create_file_backend("m", 8 * MiB, str(path))
    try:
        assert b.data_ranges() == []
        b.view(0, PAGE_SIZE)[:] = b"\1" * PAGE_SIZE
        b.view(5 * PAGE_SIZE, 2 * PAGE_SIZE)[:] = b"\2" * 2 * PAGE_SIZE
        b.view(8 * MiB - PAGE_SIZE, PAGE_SIZE)[:] = b"\3" * PAGE_SIZE
        ranges = b.data_ranges()
        assert ranges == [(0, PAGE_SIZE), (5 * PAGE_SIZE, 2 * PAGE_SIZE),
                          (8 * MiB - PAGE_SIZE, PAGE_SIZE)]
    finally:
        b.close()


def test_data_ranges_stop_at_the_backend_size_of_a_larger_file(fsdir: Path) -> None:
    path = fsdir / "ram"
    path.write_bytes(b"z" * (2 * MiB))
    b = create_file_backend("m", MiB, str(path))
    try:
        assert b.data_ranges() == [(0, MiB)]
    finally:
        b.close()


def test_allocate_skips_a_file_without_holes_and_fills_one_with_holes(
        fsdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The Populator allocates a staged restore's pages ahead; over a file whose pages all
    # exist that fallocate walked every page under the inode lock the Storer's writes
    # need (docs/bench/fast-disk/README.md, "Session 23"): it must not run there.
    calls: list[tuple[int, int]] = []
    real = memory.fallocate

    def spy(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append((offset, length))
        return real(fd, mode, offset, length)

    monkeypatch.setattr(memory, "fallocate", spy)
    path = fsdir / "ram"
    data = pattern(2 * MiB, seed=9)
    path.write_bytes(data)
    b = create_file_backend("m", 2 * MiB, str(path))
    try:
        assert b.fully_allocated()
        b.allocate(0, 2 * MiB)
        assert calls == []
        b.zero_range(MiB, PAGE_SIZE)  # a hole now
        calls.clear()
        assert not b.fully_allocated()
        b.allocate(0, 2 * MiB)
        assert calls == [(0, 2 * MiB)]
        assert b.fully_allocated()
        assert path.read_bytes() == data[:MiB] + bytes(PAGE_SIZE) + data[MiB + PAGE_SIZE :]
    finally:
        b.close()


def test_a_file_longer_than_its_mapping_is_not_taken_as_fully_allocated(fsdir: Path) -> None:
    path = fsdir / "ram"
    with open(path, "wb") as f:  # a hole in the mapped first MiB, 3 MiB of data after it
        f.seek(MiB)
        f.write(b"z" * (3 * MiB))
    b = create_file_backend("m", 2 * MiB, str(path))
    try:
        assert not b.fully_allocated()
    finally:
        b.close()


def test_a_passed_fd_is_used_and_owned_by_the_backend() -> None:
    fd = os.memfd_create("migd-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, MiB)
    os.pwrite(fd, b"hello", 0)
    b = create_file_backend("m", MiB, "/dev/fdset/1", fd=fd)
    assert b.mem_path == "/dev/fdset/1"
    assert bytes(b.view(0, PAGE_SIZE))[:5] == b"hello"
    assert os.fstat(fd).st_size == MiB
    b.zero_range(0, PAGE_SIZE)
    assert os.pread(fd, 5, 0) == bytes(5)
    b.close()
    b.close()  # idempotent
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_passed_fd_is_closed_when_creation_fails() -> None:
    before = open_fds()
    fd = os.memfd_create("migd-test", os.MFD_CLOEXEC)
    with pytest.raises(BackendError):
        create_file_backend("m", 1000, "/dev/fdset/1", fd=fd)
    fd = os.open("/dev/null", os.O_RDWR)
    with pytest.raises(BackendError, match="'/dev/fdset/2'"):
        create_file_backend("m", MiB, "/dev/fdset/2", fd=fd)
    assert open_fds() == before


def test_a_hugetlbfs_file_needs_a_size_multiple_of_the_huge_page_size() -> None:
    try:
        fd = os.memfd_create("migd-test", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    except OSError as e:
        pytest.skip(f"no hugetlbfs memfd: {e}")
    huge = os.fstatvfs(fd).f_bsize
    with pytest.raises(BackendError, match=f"multiple of the huge page size {huge}"):
        create_file_backend("m", PAGE_SIZE, "/dev/fdset/0", fd=fd)


def test_a_directory_path_is_refused_by_name(fsdir: Path) -> None:
    before = open_fds()
    with pytest.raises(BackendError, match=f"Could not open '{fsdir}': Is a directory"):
        create_file_backend("m", MiB, str(fsdir))
    assert open_fds() == before


def test_an_unusable_path_is_refused_with_its_cause(fsdir: Path) -> None:
    before = open_fds()
    (fsdir / "file").write_bytes(b"")
    under_file = fsdir / "file" / "ram"
    text = f"^can't open backing store {under_file} for guest RAM: Not a directory$"
    with pytest.raises(BackendError, match=text):
        create_file_backend("m", MiB, str(under_file))
    missing = fsdir / "no" / "ram"
    text = f"^can't open backing store {missing} for guest RAM: No such file or dir"
    with pytest.raises(BackendError, match=text):
        create_file_backend("m", MiB, str(missing))
    assert open_fds() == before


def test_a_file_we_created_is_removed_when_extending_it_fails(ext4dir: Path) -> None:
    before = open_fds()
    path = ext4dir / "huge"
    with pytest.raises(BackendError, match=f"^Could not extend '{path}': File too large$"):
        create_file_backend("m", 1 << 50, str(path))  # beyond ext4's 16 TiB file limit
    assert not path.exists()
    assert open_fds() == before


def test_an_existing_file_is_kept_when_creation_fails(ext4dir: Path) -> None:
    path = ext4dir / "keep"
    path.write_bytes(b"data")
    with pytest.raises(BackendError):
        create_file_backend("m", 1 << 50, str(path))
    assert path.read_bytes() == b"data"


@pytest.mark.parametrize("size", [0, -PAGE_SIZE, 1000, PAGE_SIZE + 1, True, 4096.0])
def test_a_size_that_is_not_a_positive_multiple_of_4096_is_refused(size: int, fsdir: Path) -> None:
    before = open_fds()
    with pytest.raises(BackendError, match="Parameter 'size' expects a positive multiple of 4096"):
        create_file_backend("m", size, str(fsdir / "ram"))
    with pytest.raises(BackendError, match="Parameter 'size'"):
        create_ram_backend("m", size)
    assert not (fsdir / "ram").exists()
    assert open_fds() == before


@pytest.mark.parametrize("bad_id", ["", "1abc", "-x", "a b", "a/b", "é"])
def test_an_id_that_is_not_an_identifier_is_refused(bad_id: str) -> None:
    with pytest.raises(BackendError, match="Parameter 'id' expects an identifier"):
        create_ram_backend(bad_id, MiB)


@pytest.mark.parametrize("good_id", ["A-b.c_9", "z", "Z9", "x-", "x.", "x_", "a" * 64])
def test_ids_may_use_letters_digits_dash_dot_and_underscore(good_id: str) -> None:
    b = create_ram_backend(good_id, PAGE_SIZE)
    try:
        # kept exactly as given, and the block is named after it
        assert (b.id, b.block_name, b.size) == (good_id, good_id, PAGE_SIZE)
    finally:
        b.close()


@pytest.mark.parametrize("name", ["", "x" * 256, "é" * 128])
def test_a_ramblock_name_outside_1_to_255_bytes_is_refused(name: str) -> None:
    with pytest.raises(BackendError, match="ramblock-name"):
        create_ram_backend("m", MiB, ramblock_name=name)


def _mapped_bytes(backend: memory.MemoryBackend) -> int:
    """The bytes of the backend's mapping that have a page mapped, from the present bit of
    each of its pages in /proc/self/pagemap. Not smaps' Rss: the kernel merges an
    anonymous mapping with an adjacent one of the same flags (one of Python's arenas, say)
    into one area, whose Rss then counts the neighbour's pages too (a failure seen once
    in a full run)."""
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(backend._base // PAGE_SIZE * 8)
        entries = pagemap.read(backend.size // PAGE_SIZE * 8)
    present = sum(1 for (entry,) in struct.iter_unpack("<Q", entries) if entry >> 63)
    return present * PAGE_SIZE


def test_populate_maps_the_pages_so_the_reads_into_them_do_not_fault(shm: Path) -> None:
    """Allocating is not enough: an O_DIRECT read into unmapped pages faults each one."""
    b = create_file_backend("m", 8 * MiB, str(shm / "ram"))
    r = create_ram_backend("r", 8 * MiB)
    try:
        assert _mapped_bytes(b) == 0 and _mapped_bytes(r) == 0
        b.populate(0, 4 * MiB)
        r.populate(2 * MiB, 4 * MiB)
        assert _mapped_bytes(b) == 4 * MiB and _mapped_bytes(r) == 4 * MiB
        assert (shm / "ram").stat().st_blocks * 512 == 4 * MiB  # allocated, rest a hole
    finally:
        b.close()
        r.close()


def test_prefault_maps_a_range_for_reading_and_keeps_its_contents(shm: Path) -> None:
    data = pattern(4 * MiB, seed=3)
    (shm / "ram").write_bytes(data)
    os.truncate(shm / "ram", 8 * MiB)
    b = create_file_backend("m", 8 * MiB, str(shm / "ram"))
    try:
        b.prefault(0, 4 * MiB)
        assert _mapped_bytes(b) == 4 * MiB
        assert (shm / "ram").stat().st_blocks * 512 == 4 * MiB  # nothing allocated
        assert bytes(b.view(0, 4 * MiB)) == data
    finally:
        b.close()


def test_populate_reports_a_full_filesystem_with_the_backend_and_its_file(
    small_tmpfs: Path,
) -> None:
    path = small_tmpfs / "ram"
    b = create_file_backend("m", 16 * MiB, str(path))
    try:
        b.populate(0, 4 * MiB)  # fits
        expected = f"Could not allocate memory for memory backend 'm' in '{path}': No space"
        with pytest.raises(BackendError, match=re.escape(expected)):
            b.populate(4 * MiB, 12 * MiB)
    finally:
        b.close()


def test_a_ramblock_name_replaces_the_id_as_block_name() -> None:
    b = create_ram_backend("m", MiB, ramblock_name="pc.ram")
    assert b.block_name == "pc.ram"
    b.close()


def test_views_and_ranges_must_be_page_aligned_and_inside_the_backend() -> None:
    b = create_ram_backend("m", MiB)
    try:
        for offset, length in [(1, PAGE_SIZE), (0, 100), (MiB, PAGE_SIZE), (-PAGE_SIZE, PAGE_SIZE)]:
            with pytest.raises(ValueError):
                b.view(offset, length)
            with pytest.raises(ValueError):
                b.zero_range(offset, length)
            with pytest.raises(ValueError):
                b.populate(offset, length)
        assert len(b.view(MiB - PAGE_SIZE, PAGE_SIZE)) == PAGE_SIZE
    finally:
        b.close()


def test_a_closed_backend_refuses_views_and_closing_with_a_live_view_is_harmless() -> None:
    b = create_ram_backend("m", MiB)
    v = b.view(0, PAGE_SIZE)
    b.close()
    v[:4] = b"abcd"  # still mapped until the view goes away
    del v
    with pytest.raises(BackendError, match="closed"):
        b.view(0, PAGE_SIZE)


def test_creating_and_closing_backends_leaks_no_fds(fsdir: Path) -> None:
    before = open_fds()
    for i in range(5):
        create_file_backend(f"m{i}", MiB, str(fsdir / f"ram{i}")).close()
        create_ram_backend(f"r{i}", MiB).close()
    assert open_fds() == before


def test_the_registry_refuses_a_duplicate_id() -> None:
    reg = MemoryRegistry()
    reg.add(create_ram_backend("m", MiB))
    dup = create_ram_backend("m", MiB, ramblock_name="other")
    with pytest.raises(BackendError, match=r"^Memory backend 'm' already exists$"):
        reg.add(dup)
    dup.close()
    assert len(reg) == 1
    reg.close_all()


def test_the_registry_refuses_a_duplicate_block_name() -> None:
    reg = MemoryRegistry()
    reg.add(create_ram_backend("a", MiB, ramblock_name="pc.ram"))
    dup = create_ram_backend("b", MiB, ramblock_name="pc.ram")
    with pytest.raises(BackendError,
                       match=r"^RAM block name 'pc.ram' is already used by memory backend 'a'$"):
        reg.add(dup)
    dup.close()
    clash = create_ram_backend("pc.ram", MiB)  # an id doubles as a block name
    with pytest.raises(BackendError, match="already used by memory backend 'a'"):
        reg.add(clash)
    clash.close()
    reg.close_all()


def test_the_registry_finds_lists_and_removes_backends_in_insertion_order() -> None:
    reg = MemoryRegistry()
    for name in ["c", "a", "b"]:
        reg.add(create_ram_backend(name, MiB, ramblock_name=f"blk-{name}"))
    assert [b.id for b in reg] == ["c", "a", "b"]
    assert reg.get("a").block_name == "blk-a"
    assert reg.by_block_name("blk-b") is reg.get("b")
    assert reg.by_block_name("a") is None
    a = reg.get("a")
    reg.remove("a")
    with pytest.raises(BackendError, match="closed"):
        a.view(0, PAGE_SIZE)
    assert [b.id for b in reg] == ["c", "b"] and len(reg) == 2
    with pytest.raises(BackendError, match=r"^Memory backend 'a' not found$"):
        reg.get("a")
    with pytest.raises(BackendError, match=r"^Memory backend 'a' not found$"):
        reg.remove("a")
    reg.close_all()
    assert len(reg) == 0


def test_the_registry_refuses_to_remove_a_backend_in_use_by_a_migration() -> None:
    reg = MemoryRegistry()
    b = create_ram_backend("m", MiB)
    reg.add(b)
    b.in_use += 1
    with pytest.raises(BackendError, match=r"^Memory backend 'm' is in use by a migration$"):
        reg.remove("m")
    assert reg.get("m") is b and len(b.view(0, PAGE_SIZE)) == PAGE_SIZE
    b.in_use -= 1
    reg.remove("m")
    assert len(reg) == 0


def test_close_all_closes_file_backends_and_their_fds(fsdir: Path) -> None:
    before = open_fds()
    reg = MemoryRegistry()
    for i in range(3):
        reg.add(create_file_backend(f"m{i}", MiB, str(fsdir / f"ram{i}")))
    assert open_fds() > before
    reg.close_all()
    assert open_fds() == before and len(reg) == 0


async def test_two_object_adds_of_one_id_at_once_leave_one_file(migd_inproc, shm):
    """The id is held while the first one makes its backend off the event loop: the
    second is refused before it creates a file (it used to create one, be refused at the
    end, and leave it behind)."""
    import asyncio

    from qemu.qmp import ExecuteError

    a, b = await migd_inproc.client("a"), await migd_inproc.client("b")
    try:
        for round in range(10):
            paths = [shm / f"r{round}-a", shm / f"r{round}-b"]
            results = await asyncio.gather(
                *(
                    client.execute(
                        "object-add",
                        {
                            "qom-type": "memory-backend-file",
                            "id": f"vm{round}",
                            "size": 1 << 20,
                            "mem-path": str(path),
                        },
                    )
                    for client, path in zip((a, b), paths, strict=True)
                ),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, ExecuteError)]
            assert len(errors) == 1, results
            assert errors[0].error.error.desc == f"Memory backend 'vm{round}' already exists"
            assert sum(path.exists() for path in paths) == 1
    finally:
        await a.disconnect()
        await b.disconnect()
