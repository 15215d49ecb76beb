"""A daemon that runs for months: cycles of everything a client does (backends, saves,
restores, cancels, dismissals, fd sets, clients vanishing mid-request), by root and by
uids seen once, leave its fds, threads and mappings and its tables where they were."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from migd.io.blocking import UID_WORKER_THREADS
from migd.io.threads import StagingPool

from .conftest import RawClient, open_fds, start_daemon, wait_job_concluded
from .test_faults import _connect_as, send_with_fd
from .test_serving import LogWatcher

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as other uids")

CYCLES = 120
MiB = 1 << 20
# Bounds on what may still be going away when the cycles end, never a timing: the last
# cycles' uid pools' threads (let go, ending), and the staging buffers kept for the next
# job (io/threads.py StagingPool.KEEP, unmapped once idle). Without the reclaim of
# io/blocking.py each cycle of a uid seen once left two threads (its pools of calls and
# of cleanups) for ever, 120 in all, and two mappings each (a stack and its guard).
THREAD_SLACK = 2 * UID_WORKER_THREADS
MAP_SLACK = StagingPool.KEEP + 16  # the staging buffers, and the allocator's arenas
# The last cycle's vanished client's socket and its closer's, closed after they left.
VANISHING_FDS = 2


def counts(pid: int) -> tuple[int, int]:
    """Threads and mappings of the daemon."""
    threads = len(os.listdir(f"/proc/{pid}/task"))
    with open(f"/proc/{pid}/maps") as maps:
        return threads, sum(1 for _ in maps)


def one_cycle(daemon: Any, work: Path, uid: int, n: int) -> None:
    """As `uid`: a file backend saved, restored, a save cancelled, each job dismissed, an
    fd set added and removed, the backend deleted; then a client passing an fd and
    leaving in the middle of a request."""
    client = _connect_as(uid, daemon.socket_path, timeout=60)
    mem, sav, cancelled = work / f"m{n}", work / f"s{n}.sav", work / f"c{n}.sav"
    client.ok("object-add", {"qom-type": "memory-backend-file", "id": "b", "size": MiB,
                             "mem-path": str(mem), "share": True})  # fmt: skip
    # Pages to write: a backend of zeros has none, and its save at 1 byte/s concluded
    # before the job-cancel could reach it (about one run in ten).
    with open(mem, "r+b") as ram:  # not truncated: migd maps it
        ram.write(b"\x01" * MiB)
    for job, verb, path, extra in (
        ("s", "memory-save", sav, {}),
        ("r", "memory-restore", sav, {}),
        ("c", "memory-save", cancelled, {"max-bandwidth": 1}),
    ):
        client.ok(verb, {"job-id": job, "uri": f"file:{path}", "backends": ["b"], **extra})
        if job == "c":
            client.ok("job-cancel", {"id": job})
        status = wait_job_concluded(client, job)
        assert (status.get("error") is None) == (job != "c"), status
        client.ok("job-dismiss", {"id": job})
    fd = os.open(mem, os.O_RDWR)
    try:
        send_with_fd(client, {"execute": "add-fd", "arguments": {"fdset-id": 7}}, fd)
    finally:
        os.close(fd)
    assert "return" in client.recv_reply()
    client.ok("remove-fd", {"fdset-id": 7})
    client.ok("object-del", {"id": "b"})
    client.close()
    for path in (mem, sav, cancelled):
        path.unlink(missing_ok=True)

    vanishing = _connect_as(uid, daemon.socket_path, timeout=60)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        send_with_fd(vanishing, {"execute": "getfd", "arguments": {"fdname": "x"}}, fd)
    finally:
        os.close(fd)
    assert vanishing.recv_reply() == {"return": {}}
    vanishing.send_raw(b'{"execute": "object-add", "arguments": {"qom-type": "memory-backe')
    vanishing.close()
    # Its name is its uid's (state/fdsets.py), kept after it left as any name is: another
    # session of the uid closes it (before names were per uid, the next cycle's getfd
    # replaced it; now each uid seen once would keep one).
    closer = _connect_as(uid, daemon.socket_path, timeout=60)
    closer.ok("closefd", {"fdname": "x"})
    closer.close()


def test_cycles_of_every_kind_leave_nothing_behind(short_dir: Path, shm: Path) -> None:
    """After CYCLES cycles, half by root and half by uids seen once (a socket open to
    all), fds are as many as before (but for the last vanished client's
    two, which may still be closing); threads and mappings are back
    within what is still going away; no job, fd set or backend is listed."""
    short_dir.chmod(0o711)
    daemon = start_daemon(short_dir / "qmp.sock", "--socket-mode", "0666")
    LogWatcher(daemon.proc)  # hundreds of jobs log more than a pipe holds
    work = shm / "work"
    work.mkdir(mode=0o1777)
    work.chmod(0o1777)
    try:
        root = RawClient(daemon.socket_path, timeout=60).negotiate()
        for n in range(3):  # what the first jobs make once: the executors, the workers
            one_cycle(daemon, work, 0, n)
        assert root.execute("query-jobs") == {"return": []}  # a round trip: all ended
        fds, (threads, maps) = open_fds(daemon.pid), counts(daemon.pid)

        for n in range(CYCLES):
            one_cycle(daemon, work, 0 if n % 2 else 300000 + n, 100 + n)

        for command in ("query-jobs", "query-fdsets", "query-memdev"):
            assert root.execute(command) == {"return": []}
        # The last vanished client's and closer's sockets may still be closing: every other fd
        # is back, and one more cycle's worth would be CYCLES more.
        assert len(open_fds(daemon.pid)) <= len(fds) + VANISHING_FDS
        now_threads, now_maps = counts(daemon.pid)
        assert now_threads <= threads + THREAD_SLACK, (threads, now_threads)
        assert now_maps <= maps + MAP_SLACK, (maps, now_maps)
        root.close()
    finally:
        daemon.stop()
