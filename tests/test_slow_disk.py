"""Stopping on a slow disk: SIGTERM ends the daemon and migrate_cancel answers promptly.

The disk is test_faults' FUSE filesystem made slow: its server takes size/rate seconds per
WRITE, as a disk of `rate` bytes/s would (it is the disk model, not a synchronisation).
With FUSE's writeback cache on, buffered writes land in the page cache and reach the
"disk" later, so a final fdatasync has all of them to write, as on a real slow disk.
Before the fix an 8 MiB O_DIRECT write per call (four channels: 32 MiB in flight) and a
final fdatasync of the whole save kept SIGTERM waiting for many seconds.
"""

from __future__ import annotations

import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import RawClient, fill_random, start_daemon
from .test_faults import (
    _FUSE_BIG_WRITES,
    _INIT_OUT,
    _MAX_WRITE,
    F_INIT,
    FaultFS,
    is_complete,
    mounted_fuse,
)

MiB = 1 << 20
RATE = 4 * MiB  # bytes/s of the slow disk
_FUSE_WRITEBACK_CACHE = 1 << 16
STOP_BOUND = 5.0  # seconds; the target is 2 (migration.STOP_TIMEOUT is 1.5)


class SlowFS(FaultFS):
    """FaultFS whose WRITEs take size/RATE seconds; optionally with writeback caching."""

    def __init__(self, backing: Path, mountpoint: Path, writeback_cache: bool) -> None:
        super().__init__(backing, mountpoint)
        self.writeback_cache = writeback_cache

    def _write(self, body: memoryview) -> bytes:
        size = struct.unpack_from("<QQI", body)[2]
        time.sleep(size / RATE)
        return super()._write(body)

    def _handle(self, op: int, node: int, body: memoryview) -> bytes:
        if op == F_INIT and self.writeback_cache:
            readahead = struct.unpack_from("<III", body)[2]
            flags = _FUSE_BIG_WRITES | _FUSE_WRITEBACK_CACHE
            return _INIT_OUT.pack(7, 31, readahead, flags, 16, 12, _MAX_WRITE, 1, 32, 0, 0, 0, 0)
        return super()._handle(op, node, body)


def mounted(short_dir: Path, writeback_cache: bool) -> Iterator[SlowFS]:
    yield from mounted_fuse(short_dir, "slow", lambda b, m: SlowFS(b, m, writeback_cache))


@pytest.fixture
def slow_disk(short_dir: Path) -> Iterator[SlowFS]:
    yield from mounted(short_dir, writeback_cache=False)


@pytest.fixture
def slow_cached_disk(short_dir: Path) -> Iterator[SlowFS]:
    yield from mounted(short_dir, writeback_cache=True)


def start_save(client: RawClient, shm: Path, target: Path, size: int, direct_io: bool) -> None:
    fill_random(shm / "ram0", size, seed=9)
    client.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram0", "size": size,
                              "mem-path": str(shm / "ram0")})  # fmt: skip
    caps = [{"capability": c, "state": True} for c in ("mapped-ram", "multifd")]
    client.ok("migrate-set-capabilities", {"capabilities": caps})
    client.ok("migrate-set-parameters", {"multifd-channels": 4, "direct-io": direct_io})
    client.ok("migrate", {"uri": f"file:{target}"})


def seconds_to_stop(daemon) -> float:
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(60) == 0
    return time.monotonic() - started


def test_sigterm_mid_direct_io_save_on_a_slow_disk_exits_promptly(shm, short_dir, slow_disk):
    daemon = start_daemon(short_dir / "qmp.sock")
    target = slow_disk.mountpoint / "save.img"
    try:
        client = RawClient(daemon.socket_path).negotiate()
        start_save(client, shm, target, 64 * MiB, direct_io=True)
        client.poll_migrate(lambda i: i["status"] == "active" and i["ram"]["transferred"] >= MiB)
        assert seconds_to_stop(daemon) < STOP_BOUND
        client.close()
    finally:
        daemon.stop(signal.SIGKILL)
    assert not is_complete(target)


def test_sigterm_during_the_final_sync_of_a_buffered_save_exits_promptly(
    shm, short_dir, slow_cached_disk
):
    """The pages are all written (to the page cache) and the save is syncing them."""
    daemon = start_daemon(short_dir / "qmp.sock")
    target = slow_cached_disk.mountpoint / "save.img"
    size = 32 * MiB  # 8 s at RATE: the old final fdatasync
    try:
        client = RawClient(daemon.socket_path).negotiate()
        start_save(client, shm, target, size, direct_io=False)
        client.poll_migrate(lambda i: i["status"] == "active" and i["ram"]["remaining"] == 0)
        assert seconds_to_stop(daemon) < STOP_BOUND
        client.close()
    finally:
        daemon.stop(signal.SIGKILL)
    assert not is_complete(target)


def test_migrate_cancel_answers_at_once_on_a_slow_disk(shm, short_dir, slow_disk):
    daemon = start_daemon(short_dir / "qmp.sock")
    target = slow_disk.mountpoint / "save.img"
    try:
        client = RawClient(daemon.socket_path).negotiate()
        start_save(client, shm, target, 64 * MiB, direct_io=True)
        client.poll_migrate(lambda i: i["status"] == "active" and i["ram"]["transferred"] >= MiB)
        asked = time.monotonic()
        assert client.ok("migrate_cancel") == {}
        answered = time.monotonic() - asked
        assert client.ok("query-migrate")["status"] in ("cancelling", "cancelled")
        assert answered < 1.0  # it does not wait for the threads (it took 3.5 s at 8 MB/s)
        deadline = time.monotonic() + 30
        while (info := client.ok("query-migrate"))["status"] != "cancelled":
            assert info["status"] == "cancelling", info
            assert time.monotonic() < deadline, info
        assert not is_complete(target)
        assert "return" in client.execute("query-version")
        client.close()
        assert seconds_to_stop(daemon) < STOP_BOUND
    finally:
        daemon.stop(signal.SIGKILL)
