"""A save that does not end `completed` must not leave a file that reads as a complete save.

The README's promise for every fault ("nothing left": `migd inspect` exits 1, no reader
takes the file for a complete save) and docs/jobs.md's for a stop ("every save it
interrupted has no RAM end section") also hold when the fault comes during the save's
last step, after its end section was written: a final fdatasync that fails with EIO, or a
cancel (migrate_cancel, job-cancel, SIGTERM) answered while the bitmaps and end section
are being written. The filesystem is test_faults' FUSE server, with its fsync held or
failed on command after a given write: the test decides where the save is, no sleeps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from migd.migration.mapped_ram import format

from .conftest import (
    RawClient,
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    poll_until,
    reached,
    save,
    start_daemon,
    wait_migration,
)
from .test_faults import F_FSYNC, FaultFS, inspect_cli, is_complete, mounted_fuse

MiB = 1 << 20
SIZE = 16 * MiB
LAYOUT = format.plan_save([("ram0", SIZE)])
BITMAP_AT = LAYOUT.blocks[0].bitmap_offset
END_AT = LAYOUT.end_offset


class FinishFS(FaultFS):
    """FaultFS that, once a WRITE touched `armed_at`, fails (`fail`) or holds (`hold`) every
    later fsync: the save's syncs after its bitmaps or after its end section."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        super().__init__(backing, mountpoint)
        self.armed_at: int | None = None
        self.armed = False
        self.fail = False
        self.held = threading.Event()  # an fsync is waiting in the server
        self.release = threading.Event()

    def _write(self, body: memoryview) -> bytes:
        offset, size = struct.unpack_from("<QQI", body)[1:3]
        if self.armed_at is not None and offset <= self.armed_at < offset + size:
            self.armed = True
        return super()._write(body)

    def _handle(self, op: int, node: int, body: memoryview) -> bytes:
        if op == F_FSYNC and self.armed:
            if self.fail:
                self.failures += 1
                raise OSError(5, "EIO")  # the server answers -EIO
            self.held.set()
            # Bounded: a test that fails must not hang the mount for ever.
            self.release.wait(30)
        return super()._handle(op, node, body)


@pytest.fixture
def finishfs(short_dir: Path) -> Iterator[FinishFS]:
    fs_iter = mounted_fuse(short_dir, "finish", FinishFS)
    fs = next(fs_iter)
    try:
        yield fs
    finally:
        fs.release.set()
        with contextlib.suppress(StopIteration):
            next(fs_iter)


def assert_not_a_complete_save(target: Path) -> None:
    assert not is_complete(target)
    result = inspect_cli(target)
    assert result.returncode == 1, result
    assert "incomplete" in result.stdout.lower(), result


async def test_a_save_whose_final_sync_fails_leaves_no_complete_file(qmp, shm, finishfs):
    """EIO from the fdatasync after the end section: the save is `failed`, and the end
    section it wrote must not make the file read as complete (before: `migd inspect`
    exit 0 and a file any restore takes, of a save reported failed, whose data the disk
    said it could not keep)."""
    fill_random(shm / "ram0", SIZE, seed=3)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    target = finishfs.mountpoint / "save.img"
    finishfs.armed_at, finishfs.fail = END_AT, True

    info = await save(qmp, target)

    assert info["status"] == "failed", info
    assert info["error-desc"] == f"Could not sync '{target}': Input/output error"
    assert finishfs.failures > 0
    assert_not_a_complete_save(target)


@pytest.mark.parametrize("command", ["migrate_cancel", "job-cancel"])
async def test_a_save_cancelled_while_it_writes_its_end_leaves_no_complete_file(
    qmp, shm, finishfs, command
):
    """A cancel answered while the save synced its bitmaps, after its last cancel check:
    the job ends `cancelled` (docs/jobs.md), and its file must read as incomplete, as
    every cancelled save's does (before: complete, inspect exit 0)."""
    fill_random(shm / "ram0", SIZE, seed=4)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    target = finishfs.mountpoint / "save.img"
    finishfs.armed_at = BITMAP_AT  # the sync after the bitmaps waits

    if command == "migrate_cancel":
        await qmp.execute("migrate", {"uri": f"file:{target}"})
    else:
        await qmp.execute("memory-save", {"job-id": "s0", "uri": f"file:{target}"})
    assert await asyncio_wait(finishfs.held)
    if command == "migrate_cancel":
        await qmp.execute("migrate_cancel")
    else:
        await qmp.execute("job-cancel", {"id": "s0"})
    finishfs.release.set()

    if command == "migrate_cancel":
        info = await wait_migration(qmp)
        assert info["status"] == "cancelled", info
    else:
        jobs = await poll_until(
            lambda: qmp.execute("query-jobs"),
            lambda js: js[0]["status"] == "concluded",
            "job s0 concluded",
        )
        assert jobs[0]["error"] == "Operation canceled", jobs
    assert_not_a_complete_save(target)


async def asyncio_wait(event: threading.Event, timeout: float = 30.0) -> bool:
    import asyncio

    return await asyncio.to_thread(event.wait, timeout)


async def test_a_save_that_completes_after_a_held_sync_is_whole(qmp, shm, finishfs):
    """The control: the same held sync, released without a cancel, completes a file that
    inspects complete and holds the memory."""
    data = fill_random(shm / "ram0", SIZE, seed=5)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    target = finishfs.mountpoint / "save.img"
    finishfs.armed_at = BITMAP_AT
    await qmp.execute("migrate", {"uri": f"file:{target}"})
    assert await asyncio_wait(finishfs.held)
    finishfs.release.set()
    info = await wait_migration(qmp)
    assert reached(info, "completed")
    assert is_complete(target) and inspect_cli(target).returncode == 0
    with open(target, "rb") as f:
        assert os.pread(f.fileno(), SIZE, LAYOUT.blocks[0].pages_offset) == data


def test_sigterm_while_a_save_writes_its_end_leaves_no_complete_file(shm, short_dir, finishfs):
    """SIGTERM while the save's bitmap sync is held past the daemon's 1.5 s stop wait:
    the daemon gives up waiting; the save's thread, let go only then, must not finish
    a file that reads as complete (docs/jobs.md: every save a stop interrupted has no
    RAM end section; before: complete, inspect exit 0)."""
    fill_random(shm / "ram0", SIZE, seed=6)
    target = finishfs.mountpoint / "save.img"
    finishfs.armed_at = BITMAP_AT
    daemon = start_daemon(short_dir / "t.sock")
    try:
        client = RawClient(daemon.socket_path).negotiate()
        client.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram0",
                                 "size": SIZE, "mem-path": str(shm / "ram0")})  # fmt: skip
        caps = [{"capability": c, "state": True} for c in ("mapped-ram", "multifd")]
        client.ok("migrate-set-capabilities", {"capabilities": caps})
        client.ok("migrate-set-parameters", {"multifd-channels": 2, "direct-io": True})
        client.ok("migrate", {"uri": f"file:{target}"})
        assert finishfs.held.wait(30)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.stderr is not None
        for line in daemon.proc.stderr:  # the stop has cancelled the job and given up
            if b"still stopping" in line:
                break
        else:
            raise AssertionError("migd did not say it stopped waiting for the save")
        finishfs.release.set()
        assert daemon.proc.wait(30) == 0
        rest = daemon.proc.stderr.read().decode()
        # The thread ended before the job's fds were closed (none closed under it).
        assert "Bad file descriptor" not in rest and "Traceback" not in rest, rest
        client.close()
    finally:
        finishfs.release.set()
        daemon.stop(signal.SIGKILL)
        if daemon.proc.stderr:
            daemon.proc.stderr.close()
    assert_not_a_complete_save(target)
