"""`migd verify FILE[,offset=N]`: a save file checked without a daemon (docs/checksums.md).

Saves are made by a real daemon (in-process) into real files; the flip loop calls the
tool's function in this process, and a handful of cases run the real `migd verify` for
its exit codes and output.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash

from migd.errors import MigrationError
from migd.io.target import parse_uri
from migd.migration.mapped_ram import format
from migd.tools.verify import CorruptError, FileInUse, NotASaveError, verify_save

from .conftest import (
    add_file_backend,
    enable_mapped_ram,
    parse_save,
    poll_until,
    read_bitmap,
    wait_migration,
)
from .qemu_vm import requires_qemu
from .test_faults import _IO_IN, F_READ, FaultFS, mounted_fuse
from .test_interop_qemu import none_machine_args, qemu_save

MiB = 1 << 20
PAGE = format.PAGE_SIZE
UNIT_PAGES = MiB // PAGE
# Two backends: ram0 with a whole zero MiB (a hole: a unit of absent pages) and scattered
# zero pages; extra not a whole number of MiBs (its last unit is 3 pages).
SIZES = {"ram0": 8 * MiB, "extra": 3 * MiB + 3 * PAGE}
# Units a verify checks: one per MiB of each block, a part MiB counting as one.
UNITS = 8 + 4
READ_RATE = 8 * MiB  # bytes/s of the slow disk under the Ctrl-C test


def migd(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migd", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def content(size: int, seed: int) -> bytes:
    """Random pages, every 5th page zero, and MiB 2 (if the block has one) all zero."""
    rng = np.random.default_rng(seed)
    pages = np.frombuffer(bytearray(rng.bytes(size)), dtype=np.uint8).reshape(-1, PAGE)
    pages[::5] = 0
    pages[2 * UNIT_PAGES : 3 * UNIT_PAGES] = 0
    return pages.tobytes()


async def migd_save(
    qmp,
    shm: Path,
    path: Path,
    *,
    channels: int = 4,
    offset: int = 0,
    checksums: bool = True,
    sizes: dict[str, int] = SIZES,
) -> dict[str, bytes]:
    data = {name: content(size, seed) for seed, (name, size) in enumerate(sizes.items())}
    for name, memory in data.items():
        (shm / name).write_bytes(memory)
        await add_file_backend(qmp, name, shm / name, len(memory), share=True)
    await enable_mapped_ram(qmp, channels=channels)
    uri = f"file:{path}" + (f",offset={offset}" if offset else "")
    await qmp.execute("migrate", {"uri": uri, "checksums": checksums})
    info = await wait_migration(qmp)
    assert info["status"] == "completed", info
    return data


@pytest.fixture
async def saved(qmp, shm, short_dir) -> Path:
    """A checksummed save of both backends made with 4 channels."""
    path = short_dir / "save.img"
    await migd_save(qmp, shm, path)
    return path


def present_pages(path: Path, offset: int = 0) -> int:
    return sum(int(read_bitmap(path, b).sum()) for b in parse_save(path, offset).blocks)


def flip_bit(path: Path, at: int, bit: int) -> None:
    with open(path, "r+b") as f:
        byte = os.pread(f.fileno(), 1, at)[0]
        os.pwrite(f.fileno(), bytes([byte ^ (1 << bit)]), at)


def corrupt_text(path: Path, offset: int = 0, threads: int = 2) -> str:
    with pytest.raises(CorruptError) as error:
        verify_save(str(path), offset, threads)
    text = str(error.value)
    assert text.startswith(f"'{path}': "), text
    return text


# -- good files ----------------------------------------------------------------------------


def test_a_good_save_exits_0_with_a_summary_and_its_json_gives_the_identity(saved):
    result = migd("verify", saved, "-q")
    assert result.returncode == 0, result.stderr
    present = present_pages(saved)
    out = result.stdout
    assert f"{saved}: good: structure and all {UNITS} checksums verified" in out
    assert "blocks:    2" in out
    assert f"pages:     {present} present of {sum(SIZES.values()) // PAGE}" in out
    assert f"units:     {UNITS} of {UNITS} checked" in out
    assert f"({present * PAGE} bytes)" in out and "GiB/s" in out and "O_DIRECT" in out

    result = migd("verify", saved, "--json", "--threads", "3")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["status"] == "good" and info["checksums"] is True
    assert info["units"] == info["units_checked"] == UNITS
    assert info["bytes_read"] == present * PAGE
    assert info["threads"] == 3 and info["direct_io"] is True
    # The identity, read independently: the vmdescription's save id, and the xxh3-128 of
    # the table, which is the last 16 bytes per unit of the file.
    parsed = parse_save(saved)
    assert parsed.migd is not None and info["save_id"] == parsed.migd["save-id"]
    table = saved.read_bytes()[-UNITS * 16 :]
    assert info["table_digest"] == xxhash.xxh3_128_hexdigest(table)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_save_made_with_4_channels_verifies_with_other_thread_counts(saved, threads):
    report = verify_save(str(saved), 0, threads)
    assert report.threads == threads
    assert report.units_checked == UNITS and report.bytes_read == present_pages(saved) * PAGE


async def test_a_save_without_checksums_is_checked_for_structure_only(qmp, shm, short_dir):
    path = short_dir / "plain.img"
    await migd_save(qmp, shm, path, checksums=False)
    result = migd("verify", path)
    assert result.returncode == 0, result.stderr
    assert f"{path}: structure good; no checksums: structure only" in result.stdout
    report = verify_save(str(path), 0, 2)
    assert not report.checksums and report.units_checked == report.bytes_read == 0
    # Its structure is still checked: a bitmap that disagrees with the description.
    block = parse_save(path).blocks[0]
    present = np.flatnonzero(read_bitmap(path, block))
    flip_bit(path, block.bitmap_offset + int(present[0]) // 8, int(present[0]) % 8)
    assert f"bitmap of ramblock {block.name} is corrupt" in corrupt_text(path)


@requires_qemu
@pytest.mark.timeout(120)
async def test_qemus_own_mapped_ram_save_exits_0_structure_only(shm, short_dir):
    memory = shm / "qemu-ram0"
    memory.write_bytes(content(16 * MiB, seed=9))
    path = short_dir / "qemu.img"
    await qemu_save(short_dir, none_machine_args(memory, 16 * MiB), path)
    result = migd("verify", path)
    assert result.returncode == 0, result.stderr
    assert "no checksums: structure only" in result.stdout
    assert f"{int(read_bitmap(path, parse_save(path).blocks[0]).sum())} present" in result.stdout


async def test_a_save_at_an_offset_verifies_with_the_offset_form(qmp, shm, short_dir):
    path = short_dir / "with-header.img"
    path.write_bytes(b"HEADER" * 12000)
    offset = 0x11921  # inside the header, not page aligned
    await migd_save(qmp, shm, path, offset=offset)
    result = migd("verify", f"{path},offset={offset:#x}", "-q")
    assert result.returncode == 0, result.stderr
    assert f"{path},offset={offset}: good" in result.stdout
    report = verify_save(str(path), offset, 4)
    assert report.units_checked == UNITS and report.direct_io
    with pytest.raises(NotASaveError, match="no QEVM magic at offset 0"):
        verify_save(str(path), 0, 1)  # the application's header is not a save


async def test_the_file_argument_is_split_as_a_file_uri_is(qmp, shm, short_dir):
    """At the first `,offset=`, as QEMU and migrate-incoming split `file:TEXT`, and the
    offset read with QEMU's size syntax: what verifies is what a restore of TEXT reads."""
    path = short_dir / "a.img"
    path.write_bytes(b"H" * 4096)
    await migd_save(qmp, shm, path, offset=4096)
    result = migd("verify", f"{path},offset=4k", "-q")
    assert result.returncode == 0, result.stderr
    odd = path.rename(short_dir / "a,offset=0")  # a name no file: URI with an offset gives
    result = migd("verify", f"{odd},offset=4k", "-q")
    assert result.returncode == 2 and "'0,offset=4k' is not an offset" in result.stderr
    with pytest.raises(MigrationError, match="bad offset 0,offset=4k"):
        parse_uri(f"file:{odd},offset=4k")


# -- corrupt files -------------------------------------------------------------------------


def test_every_single_bit_flip_in_page_data_is_refused_naming_block_and_offset(saved):
    rng = np.random.default_rng(16)
    blocks = parse_save(saved).blocks
    present = {b.name: np.flatnonzero(read_bitmap(saved, b)) for b in blocks}
    for flip in range(24):
        block = blocks[int(rng.integers(len(blocks)))]
        page = int(rng.choice(present[block.name]))
        at = block.pages_offset + page * PAGE + int(rng.integers(PAGE))
        bit = int(rng.integers(8))
        flip_bit(saved, at, bit)
        text = corrupt_text(saved, threads=1 + flip % 4)
        unit_at = block.pages_offset + page // UNIT_PAGES * MiB
        assert f"checksum mismatch in ramblock '{block.name}'" in text, text
        assert f"at file offset {unit_at:#x}" in text, (text, at)
        flip_bit(saved, at, bit)  # back: the next flip is the only one
    assert verify_save(str(saved), 0, 4).units_checked == UNITS


def test_a_flip_in_the_checksum_table_or_the_padding_before_it_exits_1(saved):
    parsed = parse_save(saved)
    table_at = os.path.getsize(saved) - UNITS * 16
    assert parsed.description_end < table_at, "no padding before the table to flip"
    flip_bit(saved, table_at + 7 * 16 + 5, 3)
    result = migd("verify", saved)
    assert result.returncode == 1 and result.stdout == ""
    assert f"migd verify: '{saved}': the checksum table at offset {table_at:#x}" in result.stderr
    assert "the table is corrupt" in result.stderr and "Traceback" not in result.stderr
    flip_bit(saved, table_at + 7 * 16 + 5, 3)
    flip_bit(saved, table_at - 1, 0)
    assert "the padding before the checksum table" in corrupt_text(saved)


def test_a_truncated_or_extended_file_exits_1(saved):
    size = os.path.getsize(saved)
    blocks_end = max(b.end for b in parse_save(saved).blocks)
    with open(saved, "ab") as f:
        f.write(b"\0")
    result = migd("verify", saved, "--json")
    assert result.returncode == 1
    assert "goes on 1 byte after the end of the save" in result.stderr
    assert json.loads(result.stdout)["status"] == "corrupt"
    for cut in (1, 16, UNITS * 16 + 1):  # into the table, a whole entry, into the padding
        os.truncate(saved, size - cut)
        text = corrupt_text(saved)
        assert "cut short" in text and "truncated" in text, (cut, text)
    os.truncate(saved, blocks_end - MiB)  # inside the last block's pages
    assert "extends past the end of the file" in corrupt_text(saved)


# -- not save files, usage -----------------------------------------------------------------


def test_an_empty_file_and_a_foreign_file_exit_2(short_dir):
    empty = short_dir / "empty.img"
    empty.write_bytes(b"")
    result = migd("verify", empty)
    assert result.returncode == 2
    assert result.stderr == f"migd verify: '{empty}': the file is empty: not a save file\n"
    foreign = short_dir / "notes.txt"
    foreign.write_text("not pages\n" * 1000)
    result = migd("verify", foreign, "--json")
    assert result.returncode == 2 and "not a QEMU/migd save file" in result.stderr
    assert json.loads(result.stdout)["status"] == "not-a-save"


def test_a_directory_a_fifo_and_a_missing_file_are_not_save_files(short_dir):
    os.mkfifo(short_dir / "fifo")
    for name, why in (("", r"not a regular file \(it is a directory\)"),
                      ("fifo", r"not a regular file \(it is a FIFO\)"),
                      ("nope.img", "No such file or directory")):  # fmt: skip
        with pytest.raises(NotASaveError, match=why):
            verify_save(str(short_dir / name), 0, 1)


def test_usage_errors_exit_2(short_dir):
    result = migd("verify", f"{short_dir}/x.img,offset=zz")
    assert result.returncode == 2 and "'zz' is not an offset" in result.stderr
    result = migd("verify", "--threads", "0", short_dir / "x.img")
    assert result.returncode == 2 and "--threads 0 is out of range" in result.stderr


# -- how it reads --------------------------------------------------------------------------


def test_on_ramfs_it_falls_back_to_the_page_cache_and_says_so_once(saved, ramfs):
    copy = ramfs / "save.img"
    shutil.copyfile(saved, copy)
    with pytest.raises(OSError):  # ramfs does refuse O_DIRECT
        os.close(os.open(copy, os.O_RDONLY | os.O_DIRECT))
    result = migd("verify", copy, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["direct_io"] is False and info["threads"] == 4
    assert info["units_checked"] == UNITS
    assert result.stderr.count("refuses O_DIRECT") == 1, result.stderr
    os.unlink(copy)


def terminal() -> tuple[int, int]:
    """A pseudo-terminal of 80 columns (tqdm draws nothing on one of 0): (ours, theirs)."""
    ours, theirs = pty.openpty()
    fcntl.ioctl(theirs, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    return ours, theirs


def run_on_a_terminal(command: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """`command` with its stderr on a pseudo-terminal: (process, the pty's end)."""
    ours, theirs = terminal()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=theirs)
    os.close(theirs)
    return proc, ours


def read_terminal(fd: int, until: bytes = b"", timeout: float = 30.0) -> bytes:
    """What the process wrote to the terminal: until `until` shows, or until it closes."""
    got = b""
    deadline = time.monotonic() + timeout
    while not (until and until in got):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{until!r} not on the terminal after {timeout}s: {got!r}")
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the other end is closed
            break
        if not data:
            break
        got += data
    return got


def test_a_terminal_gets_a_progress_bar_and_the_summary_stays_on_stdout(saved):
    proc, ours = run_on_a_terminal([sys.executable, "-m", "migd", "verify", str(saved)])
    try:
        drawn = read_terminal(ours)
        out, _ = proc.communicate(timeout=30)
    finally:
        os.close(ours)
    assert proc.returncode == 0
    assert b"verify: 100%|" in drawn, drawn  # tqdm's bar, full at the end
    assert b"good" in out and b"verify:" not in out


class SlowReadFS(FaultFS):
    """test_faults' FUSE filesystem whose READs take size/READ_RATE seconds, as a disk of
    READ_RATE bytes/s would (the disk model, not a synchronisation)."""

    served = 0  # bytes READ

    def _handle(self, op: int, node: int, body: memoryview) -> bytes:
        if op == F_READ:
            size = _IO_IN.unpack_from(body)[2]
            time.sleep(size / READ_RATE)
            self.served += size
        return super()._handle(op, node, body)


@pytest.fixture
def slow_disk(short_dir: Path) -> Iterator[SlowReadFS]:
    yield from mounted_fuse(short_dir, "slow", SlowReadFS)


@pytest.fixture
async def saved_large(qmp, shm, short_dir) -> Path:
    """A save of 64 MiB: many times what the readers have in flight (READ_UNITS each)."""
    path = short_dir / "large.img"
    await migd_save(qmp, shm, path, sizes={"big": 64 * MiB})
    return path


def test_ctrl_c_stops_the_readers_and_exits_130_without_a_traceback(saved_large, slow_disk):
    saved = saved_large
    shutil.copyfile(saved, slow_disk.backing / "save.img")
    # Its 64 MiB of pages take seconds to read at READ_RATE: Ctrl-C comes mid-file.
    proc, ours = run_on_a_terminal(
        [sys.executable, "-m", "migd", "verify", "--threads", "2",
         str(slow_disk.mountpoint / "save.img")]
    )  # fmt: skip
    try:
        said = read_terminal(ours, until=b"%|")  # the bar: the readers have started
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        said += read_terminal(ours)
    finally:
        os.close(ours)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, said
    assert b"migd verify: interrupted" in said and b"Traceback" not in said, said
    assert out == b""
    # The readers stopped: far from every page was read (the read each had in flight,
    # READ_UNITS MiB, and little more).
    assert slow_disk.served < present_pages(saved) * PAGE // 2, slow_disk.served


# -- a file a running save writes (red-team, session 17) ----------------------------------


async def test_a_file_a_running_save_writes_is_said_to_be_written_not_interrupted(
    saved, qmp, short_dir
):
    """While a save rewrites a file it is half a save: verify and inspect said "the save
    was interrupted or the file is truncated" (or, at its last write, corrupt) about a
    save still running. The job holds the file (state/paths.hold_for_job); they say so,
    without taking anything that would keep the save out."""
    await qmp.execute(
        "memory-save", {"job-id": "s", "uri": f"file:{saved}", "max-bandwidth": 1 << 18}
    )
    # Pages going out: its head is written, the file cut. A cancel before that leaves
    # the earlier, complete save as it was (one run in three of `make test` got there
    # first, and the end below found that save whole).
    await poll_until(
        lambda: qmp.execute("query-jobs"),
        lambda jobs: jobs[0]["status"] == "running" and jobs[0]["current-progress"] > 0,
        "the save's pages going out",
    )
    with pytest.raises(FileInUse) as in_use:
        verify_save(str(saved), 0, 2)
    writing = (
        "a migd job is writing it now (a save or an update holds the file): what it holds "
        "is half a save until that job ends"
    )
    assert str(in_use.value) == f"'{saved}': {writing}"
    done = migd("verify", saved)
    assert (done.returncode, done.stderr) == (1, f"migd verify: '{saved}': {writing}\n")
    done = migd("inspect", saved)
    assert (done.returncode, done.stderr) == (1, f"migd inspect: {saved}: {writing}\n")
    await qmp.execute("job-cancel", {"id": "s"})
    await poll_until(
        lambda: qmp.execute("query-jobs"),
        lambda jobs: jobs[0]["status"] == "concluded",
        "the save cancelled",
    )
    # Once the job has ended, the file is what it left: a save that did not finish.
    assert "save file is incomplete" in corrupt_text(saved)
