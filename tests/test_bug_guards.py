"""Tests aimed at bugs that once passed the whole suite (issue 13's mutation run).

Each test names the bug it exists to catch; `make mutants` (tests/mutants.py) plants
each of these bugs and checks that its test fails. The expectations here are independent
of the implementation: a page with one non-zero byte is never zero, a sibling directory
is never inside, every byte written reads back, a cap holds, `remaining` adds up.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError

from migd.io.zero_scan import BufferReader, runs_to_write, zero_pages
from migd.migration import engine as migration
from migd.pages import MIN_SKIP_PAGES
from migd.state.paths import PathNotAllowed, PathPolicy

from .conftest import (
    InProcessDaemon,
    RawClient,
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    parse_save,
    poll_until,
    qmp_error,
    read_pages,
    restore,
    save,
    start_daemon,
    wait_migration,
    wait_status,
)
from .test_faults import _IO_IN, F_WRITE, FaultFS, mounted_fuse

MiB = 1 << 20
PAGE = 4096
O_DIRECT = 0o40000  # x86-64 (and most architectures; arm64 differs, it is 0o200000)


# --- 1. the zero scan must read every byte of every page ------------------------------


def long_zero_runs(pages: np.ndarray, min_run: int) -> np.ndarray:
    """Reference: True for the pages of every all-zero run of at least min_run pages."""
    zero = ~pages.any(axis=1)
    padded = np.concatenate(([False], zero, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    out = np.zeros(zero.size, dtype=bool)
    for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
        if b - a >= min_run:
            out[a:b] = True
    return out


RUN_LENGTHS = [
    MIN_SKIP_PAGES - 1,
    MIN_SKIP_PAGES,
    MIN_SKIP_PAGES + 1,
    2 * MIN_SKIP_PAGES,
    2 * MIN_SKIP_PAGES + 3,
    4 * MIN_SKIP_PAGES - 1,
]


# kernel: a mapping read through process_vm_readv (MemoryReader); buffer: a staged save's
# buffer read in place (BufferReader).
@pytest.mark.parametrize("reader", ["kernel", "buffer"])
@settings(max_examples=250, deadline=None, derandomize=True)
@given(
    run=st.sampled_from(RUN_LENGTHS),
    before=st.integers(0, 140),  # moves the run against the scan's sampling grid
    after=st.integers(0, 70),
    where=st.floats(0, 1, exclude_max=True),  # which page of the run holds the byte
    offset=st.integers(0, PAGE - 1),
    value=st.integers(1, 255),
    filler_offset=st.integers(0, PAGE - 1),
)
@example(2 * MIN_SKIP_PAGES, 0, 0, 0.5, PAGE - 1, 1, 0)
@example(2 * MIN_SKIP_PAGES, 5, 5, 0.5, PAGE // 2, 0x80, PAGE - 1)
@example(MIN_SKIP_PAGES, 1, 0, 0.0, 8, 1, 0)
@example(4 * MIN_SKIP_PAGES - 1, 64, 1, 0.999, PAGE - 8, 1, 4000)
def test_a_page_with_one_nonzero_byte_anywhere_is_never_called_zero(
    reader, run, before, after, where, offset, value, filler_offset
):
    """Bug caught: a scan reading part of each page (its first half, its first words)."""
    pages = np.zeros((before + run + after, PAGE), dtype=np.uint8)
    pages[:before, filler_offset] = 0xA5  # data pages around the run, data anywhere
    pages[before + run :, filler_offset] = 0xA5
    hit = before + int(where * run)
    pages[hit, offset] = value
    memory = memoryview(bytearray(pages.tobytes()))
    found = zero_pages(memory, reader=BufferReader(memory) if reader == "buffer" else None)
    assert not found[hit], f"page {hit} with byte {value:#x} at offset {offset} called zero"
    assert found.tolist() == long_zero_runs(pages, MIN_SKIP_PAGES).tolist()
    written = runs_to_write(found)
    assert any(first <= hit < first + count for first, count in written)


# Pages of a 16 MiB backend that hold one byte each, inside zero runs many times longer
# than the skip threshold: (page, offset in the page, value).
LONE_BYTES = [(300, PAGE - 1, 1), (1000, PAGE // 2, 0x80), (1001, 2049, 7), (2047, 3000, 9),
              (2048, 1, 0xFF), (3000, 8, 2), (4095, PAGE - 8, 3)]  # fmt: skip


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct-io", "buffered"])
async def test_lone_bytes_in_long_zero_runs_survive_save_and_restore(
    qmp, shm, short_dir, direct_io
):
    size = 16 * MiB
    memory = bytearray(size)  # written out in full: zeros in memory, not file holes
    for page, offset, value in LONE_BYTES:
        memory[page * PAGE + offset] = value
    (shm / "src").write_bytes(memory)
    await add_file_backend(qmp, "ram0", shm / "src", size)
    await enable_mapped_ram(qmp, channels=2, direct_io=direct_io)
    assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
    await qmp.execute("object-del", {"id": "ram0"})
    fill_random(shm / "dst", size, seed=13)
    await add_file_backend(qmp, "ram0", shm / "dst", size)
    assert (await restore(qmp, short_dir / "save.img"))["status"] == "completed"
    restored = (shm / "dst").read_bytes()
    for page, offset, value in LONE_BYTES:
        assert restored[page * PAGE + offset] == value, f"page {page} lost its byte"
    assert restored == bytes(memory)


# --- 2. allowed-dirs: a sibling or a prefix of an allowed directory is outside --------

NAME = st.text("abz09-_.", min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(base=NAME, suffix=st.text("-_.x0 ~", min_size=1, max_size=5), cut=st.integers(1, 7))
def test_siblings_and_prefixes_of_an_allowed_dir_are_outside(base, suffix, cut):
    """Bug caught: allowed-dirs matched as a bare string prefix ('/srv/allowed-evil')."""
    root = Path(tempfile.mkdtemp(prefix="migd-pp-", dir="/tmp"))
    try:
        allowed = root / base
        sibling = root / (base + suffix)
        others = [sibling]
        if cut < len(base) and base[:-cut] not in (".", ".."):
            others.append(root / base[:-cut])  # a prefix of the allowed name
        allowed.mkdir()
        policy = PathPolicy([str(allowed)])
        policy.check(str(allowed / "vm.sav"))
        os.close(policy.open(str(allowed / "vm.sav"), os.O_WRONLY | os.O_CREAT))
        for other in others:
            other.mkdir(exist_ok=True)
            with pytest.raises(PathNotAllowed):
                policy.check(str(other / "vm.sav"))
            with pytest.raises(PathNotAllowed):
                policy.check(str(other))
            with pytest.raises(PathNotAllowed):
                policy.open(str(other / "vm.sav"), os.O_WRONLY | os.O_CREAT)
            assert not (other / "vm.sav").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def confined_to_allowed(short_dir: Path, shm: Path):
    (short_dir / "allowed").mkdir()
    d = InProcessDaemon(short_dir / "qmp.sock", allowed_dirs=[str(short_dir / "allowed"), str(shm)])
    await d.start()
    client = await d.client()
    yield client
    await client.disconnect()
    await d.stop()


@pytest.mark.parametrize("name", ["allowed-evil", "allowedx", "allowed.d", "allowe", "allow"])
async def test_a_daemon_refuses_siblings_and_prefixes_of_an_allowed_dir(
    confined_to_allowed, short_dir, shm, name
):
    client, other = confined_to_allowed, short_dir / name
    other.mkdir()
    (other / "old.sav").write_bytes(b"not a save")
    with pytest.raises(ExecuteError, match="outside the allowed directories"):
        await add_file_backend(client, "bad", other / "ram", MiB)
    assert not (other / "ram").exists()
    fill_random(shm / "ram0", MiB)
    await add_file_backend(client, "ram0", shm / "ram0", MiB)
    await enable_mapped_ram(client)
    text = await qmp_error(client, "migrate", {"uri": f"file:{other}/vm.sav"})
    assert text.startswith(f"'{other}/vm.sav' is outside the allowed directories"), text
    assert not (other / "vm.sav").exists()
    text = await qmp_error(client, "migrate-incoming", {"uri": f"file:{other}/old.sav"})
    assert "outside the allowed directories" in text
    # and the allowed directory itself works
    assert (await save(client, short_dir / "allowed" / "vm.sav"))["status"] == "completed"


# --- 3. a short write is continued, never taken as complete ---------------------------


class ShortWriteFS(FaultFS):
    """FaultFS whose WRITE takes only half of each request (page aligned), like a
    filesystem that is running short: pwritev then returns less than it was given."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        super().__init__(backing, mountpoint)
        self.short_writes = 0

    def _write(self, body: memoryview) -> bytes:
        fh, offset, size = _IO_IN.unpack_from(body)[:3]
        if size < 2 * PAGE:
            return super()._write(body)
        take = (size // 2) & ~(PAGE - 1)
        done = os.pwrite(self._fhs[fh], body[_IO_IN.size : _IO_IN.size + take], offset)
        self.written += done
        self.short_writes += 1
        return struct.pack("<II", done, 0)

    def _handle(self, op: int, node: int, body: memoryview) -> bytes:
        return self._write(body) if op == F_WRITE else super()._handle(op, node, body)


@pytest.fixture
def short_write_fs(short_dir: Path) -> Iterator[ShortWriteFS]:
    yield from mounted_fuse(short_dir, "short", ShortWriteFS)


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct-io", "buffered"])
async def test_a_save_onto_a_filesystem_that_writes_short_keeps_every_byte(
    qmp, shm, short_write_fs, direct_io
):
    """Bug caught: a short pwritev taken as a complete write (the rest never written)."""
    size = 8 * MiB
    data = fill_random(shm / "ram0", size, seed=21)
    await add_file_backend(qmp, "ram0", shm / "ram0", size)
    await enable_mapped_ram(qmp, channels=2, direct_io=direct_io)
    target = short_write_fs.mountpoint / "save.img"
    info = await save(qmp, target)
    assert info["status"] == "completed", info
    assert short_write_fs.short_writes > 0  # the filesystem did cut writes short
    block = parse_save(target).blocks[0]
    assert read_pages(target, block) == data
    await qmp.execute("object-del", {"id": "ram0"})
    fill_random(shm / "dst", size, seed=22)
    await add_file_backend(qmp, "ram0", shm / "dst", size)
    assert (await restore(qmp, target))["status"] == "completed"
    assert (shm / "dst").read_bytes() == data


# --- 4. a channel open that fails closes the channels opened before it ------------------


def _fd_numbers(pid: int) -> set[int]:
    return {int(n) for n in os.listdir(f"/proc/{pid}/fd")}


def test_a_failed_channel_open_leaves_no_fd_open_in_the_daemon(shm, short_dir):
    """Bug caught: the first channels' fds left open when a later channel's open fails.

    RLIMIT_NOFILE on the real daemon makes the k-th open of the save fail with EMFILE
    (a new fd takes the lowest free number, so a limit of highest fd + k lets k opens
    through). k climbs from 1 until the save completes, so every open of the save fails
    once: the main file's, the first channel's, and each later channel's."""
    channels, size = 4, 4 * MiB
    fill_random(shm / "ram0", size)
    d = start_daemon(short_dir / "qmp.sock")
    client = RawClient(d.socket_path).negotiate()
    try:
        for command, arguments in [
            ("object-add", {"qom-type": "memory-backend-file", "id": "ram0", "size": size,
                            "mem-path": str(shm / "ram0")}),
            ("migrate-set-capabilities", {"capabilities": [
                {"capability": "mapped-ram", "state": True},
                {"capability": "multifd", "state": True}]}),
            ("migrate-set-parameters", {"multifd-channels": channels}),
        ]:  # fmt: skip
            assert "return" in client.execute(command, arguments)
        soft, hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
        emfile = 0
        for k in range(1, channels + 8):
            before = _fd_numbers(d.pid)
            resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (max(before) + k, hard))
            try:
                reply = client.execute("migrate", {"uri": f"file:{short_dir}/save{k}.img"})
                if "error" not in reply:
                    info = client.wait_final(30)
                    if info["status"] == "completed":
                        break
                    emfile += "Too many open files" in info.get("error-desc", "")
            finally:
                resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (soft, hard))
            assert _fd_numbers(d.pid) == before, f"fds leaked when open {k} failed"
        else:
            raise AssertionError("the save never completed, whatever the fd limit")
        assert emfile >= channels  # the main file's open and each channel's failed once
    finally:
        client.close()
        d.stop()


# --- 5. a restore holds max-bandwidth ---------------------------------------------------


async def test_a_restore_holds_max_bandwidth(qmp, shm, short_dir):
    """Bug caught: a restore that ignores max-bandwidth (the save side has its own test)."""
    size, rate = 128 * MiB, 64 * MiB
    data = fill_random(shm / "ram0", size, seed=31)
    await add_file_backend(qmp, "ram0", shm / "ram0", size)
    await enable_mapped_ram(qmp, channels=4, direct_io=True)
    assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
    await qmp.execute("object-del", {"id": "ram0"})
    fill_random(shm / "dst", size, seed=32)
    await add_file_backend(qmp, "ram0", shm / "dst", size)
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": rate})
    info = await restore(qmp, short_dir / "save.img")
    assert info["status"] == "completed", info
    seconds = (info["total-time"] - info["setup-time"]) / 1000
    achieved = info["ram"]["multifd-bytes"] / seconds
    # Loose below (a loaded machine may be slower), tight above: the cap is the point.
    assert 0.5 * rate <= achieved <= 1.1 * rate, f"{achieved / MiB:.1f} MiB/s"
    assert (shm / "dst").read_bytes() == data


# --- 6. `remaining` is computed from the counters of the same moment ---------------------


@pytest.mark.parametrize("direction", ["save", "restore"])
async def test_remaining_adds_up_with_the_counters_of_the_same_reply(
    qmp, shm, short_dir, monkeypatch, direction
):
    """Bug caught: `remaining` taken from the throughput sample (up to 100 ms old).

    The sampler is slowed to one sample per hour, so a stale `remaining` would still be
    the one of the job's first moment (nothing done). A job held half-way (max-bandwidth
    1 byte/s: each channel waits an hour before its next page) has counters that no
    longer move, and remaining must be exactly total - (normal + duplicate) pages, with
    both sides of the sum in the same reply. (A cancelled save shows only its status,
    as QEMU's does, so the job is held rather than cancelled.)"""
    monkeypatch.setattr(migration, "SAMPLE_PERIOD", 3600.0)
    size = 32 * MiB
    fill_random(shm / "ram0", size, seed=41)
    await add_file_backend(qmp, "ram0", shm / "ram0", size)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    if direction == "save":
        command, uri = "migrate", {"uri": f"file:{short_dir}/save.img"}
    else:
        assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
        command, uri = "migrate-incoming", {"uri": f"file:{short_dir}/save.img"}
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 8 * MiB})
    await qmp.execute(command, uri)
    # Both directions count pages at each I/O call.
    await poll_until(
        lambda: qmp.execute("query-migrate"),
        lambda info: info["status"] == "active" and info["ram"]["normal"] >= 2048,
        "some pages counted",
    )
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 1})
    previous: dict = {}

    def held(info: dict) -> bool:
        nonlocal previous
        ram = info["ram"]
        still = info["status"] == "active" and ram["transferred"] == previous.get("transferred")
        previous = ram
        return still

    # 0.3 s between polls: longer than an I/O call at 8 MiB/s (0.1 s of the rate), the
    # last call a channel makes before the new rate holds it.
    info = await poll_until(
        lambda: qmp.execute("query-migrate"), held, "the channels held", interval=0.3
    )
    ram = info["ram"]
    done = ram["normal"] + ram["duplicate"]
    assert 0 < done < size // PAGE
    assert ram["remaining"] == size - done * PAGE, ram
    await qmp.execute("migrate_cancel")
    assert (await wait_migration(qmp))["status"] == "cancelled"
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 0})


# --- 7. direct-io really opens the channels with O_DIRECT -------------------------------


def _flags_of_fds_on(path: Path) -> list[int]:
    """The open flags (fdinfo) of every fd of this process open on `path`."""
    flags = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                with open(f"/proc/self/fdinfo/{name}") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                flags.append(int(fields["flags"].strip(), 8))
    return flags


def _cached_bytes(path: Path) -> int:
    """Bytes of the file in the page cache, by util-linux's fincore (mincore(2))."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return int(out.stdout.strip())


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct-io", "buffered"])
async def test_direct_io_opens_every_channel_with_o_direct(qmp, shm, short_dir, direct_io):
    """Bug caught: channel fds opened without O_DIRECT while direct-io is set."""
    channels, size = 3, 32 * MiB
    fill_random(shm / "ram0", size, seed=51)
    await add_file_backend(qmp, "ram0", shm / "ram0", size)
    await enable_mapped_ram(qmp, channels=channels, direct_io=direct_io)
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 8 * MiB})
    target = short_dir / "save.img"
    await qmp.execute("migrate", {"uri": f"file:{target}"})
    await wait_status(qmp, "active")
    flags = _flags_of_fds_on(target)
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 0})
    assert (await wait_migration(qmp))["status"] == "completed"
    direct = [f for f in flags if f & O_DIRECT]
    writers = [f for f in flags if f & os.O_ACCMODE != os.O_RDONLY]
    assert len(writers) == channels + 1, flags  # the main fd, and one per channel
    # A buffered save also reads its own file back for the checksums (docs/checksums.md).
    assert len(flags) - len(writers) == (0 if direct_io else 1), flags
    assert len(direct) == (channels if direct_io else 0), [oct(f) for f in flags]
    if direct_io and shutil.which("fincore"):
        # The pages went around the page cache: only the head, bitmap and end section
        # (written through the main fd, a few KiB) may be cached, never the 32 MiB.
        assert _cached_bytes(target) < MiB, _cached_bytes(target)


# --- 8. every channel fd is the file the migration opened ------------------------------


async def test_an_fdset_whose_o_direct_fd_is_another_file_is_refused(qmp, shm, short_dir):
    """Bug caught: the channel identity check removed (pages written into another file)."""
    size = 4 * MiB
    fill_random(shm / "src", size)
    await add_file_backend(qmp, "ram0", shm / "src", size)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    target, other = short_dir / "vm.sav", short_dir / "other.sav"
    other.write_bytes(b"someone else's file")
    main = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    twin = os.open(other, os.O_WRONLY | O_DIRECT)
    try:
        for fd in (main, twin):
            qmp.send_fd_scm(fd)
            await qmp.execute("add-fd", {"fdset-id": 0})
    finally:
        os.close(main)
        os.close(twin)
    await qmp.execute("migrate", {"uri": "file:/dev/fdset/0"})
    info = await wait_migration(qmp)
    assert info["status"] == "failed", info
    assert "a channel's fd is not the file the migration opened" in info["error-desc"]
    assert other.read_bytes() == b"someone else's file"


# --- 9. a memory file cut where no channel goes any more still fails the restore --------


async def test_a_memory_file_cut_after_its_pages_were_restored_fails_the_restore(
    qmp, shm, short_dir
):
    """Bug caught: the final shrink check removed. The cut falls in the tail the restore
    zeroed first (absent pages go first), so no channel faults on it: only the check
    after the channels sees that the memory restored there is gone."""
    size, tail = 32 * MiB, 8 * MiB
    data = bytearray(fill_random(shm / "src", size, seed=61))
    data[size - tail :] = bytes(tail)
    (shm / "src").write_bytes(data)
    await add_file_backend(qmp, "ram0", shm / "src", size)
    await enable_mapped_ram(qmp, channels=2)
    assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
    await qmp.execute("object-del", {"id": "ram0"})
    fill_random(shm / "dst", size, seed=62)
    await add_file_backend(qmp, "ram0", shm / "dst", size, share=True)
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 8 * MiB})
    await qmp.execute("migrate-incoming", {"uri": f"file:{short_dir}/save.img"})
    info = await poll_until(
        lambda: qmp.execute("query-migrate"),
        lambda i: i["status"] not in ("setup", "active") or i["ram"]["duplicate"] >= tail // PAGE,
        "the zero tail restored",
    )
    assert info["status"] == "active" and info["ram"]["normal"] < (size - tail) // PAGE, info
    os.truncate(shm / "dst", size - tail)
    info = await wait_migration(qmp)
    assert info["status"] == "failed", info
    assert info["error-desc"] == (
        f"Memory backend 'ram0' file '{shm}/dst' shrank from {size} to {size - tail} bytes "
        "during the restore; memory backends 'ram0' hold partial data"
    )
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 0})
