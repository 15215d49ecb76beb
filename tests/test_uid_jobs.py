"""One uid other than root's and migd's cannot hold the job table, nor keep a job it
cancels waiting behind its own stuck worker threads (migration/engine.py UID_MAX_JOBS,
job_thread)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from migd.migration.engine import MAX_JOBS, UID_MAX_JOBS

from .conftest import RawClient, start_daemon
from .test_faults import OTHER_UID, THIRD_UID, _connect_as
from .test_serving import LogWatcher

MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")


def _concluded(client: RawClient, job_id: str, timeout: float = 30) -> dict[str, Any]:
    """query-jobs until the job is concluded (a bounded busy wait: its event may come
    before the reply that started it, which execute() skips)."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = {job["id"]: job for job in client.ok("query-jobs")}
        if jobs[job_id]["status"] == "concluded":
            return jobs[job_id]
        assert time.monotonic() < deadline, jobs[job_id]
        time.sleep(0.001)


def _save(client: RawClient, short_dir: Path, job_id: str) -> dict[str, Any]:
    return client.execute(
        "memory-save",
        {"job-id": job_id, "uri": f"file:{short_dir}/{job_id}.sav", "checksums": False},
    )


def test_one_uids_undismissed_jobs_do_not_fill_the_job_table(short_dir, shm):
    """`nobody` starts saves it never dismisses: the 33rd is refused naming UID_MAX_JOBS,
    and root's and a third uid's saves are still accepted; a dismissed job makes room
    (before: nobody's 256 filled the table, MAX_JOBS, and root's save was refused)."""
    short_dir.chmod(0o711)
    daemon = start_daemon(short_dir / "qmp.sock", "--socket-mode", "0666")
    LogWatcher(daemon.proc)  # hundreds of jobs log more than a pipe holds
    try:
        root = RawClient(daemon.socket_path, timeout=30).negotiate()
        (shm / "ram").write_bytes(b"\0" * MiB)
        root.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram", "size": MiB,
                               "mem-path": str(shm / "ram"), "share": True})  # fmt: skip
        nobody = _connect_as(OTHER_UID, daemon.socket_path, timeout=30)
        refused = None
        for i in range(MAX_JOBS + 1):
            reply = _save(nobody, short_dir, f"n{i}")
            if "error" in reply:
                refused = (i, reply["error"]["desc"])
                break
            _concluded(nobody, f"n{i}")
        assert refused is not None
        assert refused[0] == UID_MAX_JOBS, refused
        assert f"UID_MAX_JOBS {UID_MAX_JOBS}" in refused[1]
        assert refused[1].startswith(f"uid {OTHER_UID} has {UID_MAX_JOBS} jobs listed")

        for client, name in ((root, "r"), (_connect_as(THIRD_UID, daemon.socket_path, 30), "t")):
            assert "return" in _save(client, short_dir, name)
            _concluded(client, name)
        # Concluded jobs count until dismissed: one dismissed makes room for one more.
        nobody.ok("job-dismiss", {"id": "n0"})
        assert "return" in _save(nobody, short_dir, "again")
        _concluded(nobody, "again")
        assert "error" in _save(nobody, short_dir, "over")
    finally:
        daemon.stop()
        with contextlib.suppress(OSError):
            os.unlink(shm / "ram")
