"""Many jobs in one daemon (memory-save, memory-restore, query-jobs, job-cancel,
job-dismiss, JOB_STATUS_CHANGE), over real backends, files and sockets.

Each job saves or restores the backends it names to or from its own file, alongside the
others; results are compared byte for byte. Conflicts (a backend or a file in two jobs,
an id used twice) are refused naming the job, and one job's cancel or failure leaves the
others running to the end.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

from migd.io.share import DiskShare
from migd.io.throttle import Throttle

from .conftest import (
    RawClient,
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    is_complete_save,
    poll_until,
    qmp_error,
    start_daemon,
    wait_migration,
)

MiB = 1 << 20
FINAL = ("concluded",)


async def _jobs(qmp) -> dict[str, dict[str, Any]]:
    return {job["id"]: job for job in await qmp.execute("query-jobs")}


async def wait_concluded(qmp, *ids: str, timeout: float = 60) -> dict[str, dict[str, Any]]:
    """Poll query-jobs until every job of `ids` is concluded; return them."""
    return await poll_until(
        lambda: _jobs(qmp),
        lambda jobs: all(jobs.get(i, {}).get("status") == "concluded" for i in ids),
        f"jobs {ids} concluded",
        timeout,
    )


async def _backends(qmp, shm: Path, count: int, size: int = 4 * MiB) -> dict[str, bytes]:
    data = {}
    for i in range(count):
        id = f"vm{i}"
        data[id] = fill_random(shm / id, size, seed=i + 1)
        await add_file_backend(qmp, id, shm / id, size, **{"ramblock-name": id})
    return data


async def test_concurrent_saves_then_restores_of_distinct_backends_are_byte_exact(
    qmp, shm, short_dir
):
    data = await _backends(qmp, shm, 3)
    for id in data:
        await qmp.execute(
            "memory-save",
            {"job-id": f"save-{id}", "backends": [id], "uri": f"file:{short_dir}/{id}.sav"},
        )
    jobs = await wait_concluded(qmp, *(f"save-{id}" for id in data))
    for id in data:
        job = jobs[f"save-{id}"]
        assert job["type"] == "snapshot-save" and "error" not in job, job
        assert job["current-progress"] == job["total-progress"] == 4 * MiB
        assert job["x-backends"] == [id] and job["x-file"] == f"{short_dir}/{id}.sav"
        (shm / id).write_bytes(bytes(4 * MiB))
    for id in data:
        await qmp.execute(
            "memory-restore",
            {"job-id": f"load-{id}", "backends": [id], "uri": f"file:{short_dir}/{id}.sav"},
        )
    jobs = await wait_concluded(qmp, *(f"load-{id}" for id in data))
    for id in data:
        assert jobs[f"load-{id}"]["type"] == "snapshot-load" and "error" not in jobs[f"load-{id}"]
        assert (shm / id).read_bytes() == data[id], id


async def test_a_job_goes_through_qemus_statuses_and_job_dismiss_removes_it(qmp, shm, short_dir):
    await _backends(qmp, shm, 1)
    with qmp.listener("JOB_STATUS_CHANGE") as listener:
        await qmp.execute("memory-save", {"job-id": "j1", "uri": f"file:{short_dir}/a.sav"})
        statuses = []
        while not statuses or statuses[-1] != "concluded":
            event = await asyncio.wait_for(listener.get(), 30)
            assert event["data"]["id"] == "j1"
            statuses.append(event["data"]["status"])
        assert statuses == ["created", "running", "waiting", "pending", "concluded"]
        assert [j["id"] for j in await qmp.execute("query-jobs")] == ["j1"]
        await qmp.execute("job-dismiss", {"id": "j1"})
        event = await asyncio.wait_for(listener.get(), 30)
        assert event["data"] == {"id": "j1", "status": "null"}
    assert await qmp.execute("query-jobs") == []
    assert await qmp_error(qmp, "job-dismiss", {"id": "j1"}) == "Job not found"


async def test_conflicts_are_refused_naming_the_job(qmp, shm, short_dir):
    await _backends(qmp, shm, 2, size=16 * MiB)
    # A slow job (1 MiB/s) holds vm0 and its file while the others are tried.
    await qmp.execute(
        "memory-save",
        {"job-id": "slow", "backends": ["vm0"], "uri": f"file:{short_dir}/slow.sav",
         "max-bandwidth": MiB},
    )  # fmt: skip
    busy = "Memory backend 'vm0' is in use by job 'slow'"
    args = {"job-id": "b", "backends": ["vm0"], "uri": f"file:{short_dir}/b.sav"}
    assert await qmp_error(qmp, "memory-save", args) == busy
    assert await qmp_error(qmp, "object-del", {"id": "vm0"}) == busy
    await enable_mapped_ram(qmp)
    assert await qmp_error(qmp, "migrate", {"uri": f"file:{short_dir}/m.sav"}) == busy
    same_file = {"job-id": "c", "backends": ["vm1"], "uri": f"file:{short_dir}/slow.sav"}
    desc = await qmp_error(qmp, "memory-save", same_file)
    assert desc.startswith(f"'{short_dir}/slow.sav' is the file of job 'slow' (save of "), desc
    desc = await qmp_error(qmp, "memory-restore", {**same_file, "job-id": "d"})
    assert desc.startswith(f"'{short_dir}/slow.sav' is the file of job 'slow'"), desc
    reused = {"job-id": "slow", "backends": ["vm1"], "uri": f"file:{short_dir}/e.sav"}
    assert await qmp_error(qmp, "memory-save", reused) == "Job ID 'slow' already in use"
    bad = {**reused, "job-id": "1abc"}
    assert await qmp_error(qmp, "memory-save", bad) == "Invalid job ID '1abc'"
    unknown = {**reused, "job-id": "f", "backends": ["nope"]}
    assert await qmp_error(qmp, "memory-save", unknown) == "Memory backend 'nope' not found"
    # Nothing refused left a file or a job behind.
    assert not (short_dir / "b.sav").exists() and not (short_dir / "e.sav").exists()
    assert [j["id"] for j in await qmp.execute("query-jobs")] == ["slow"]
    await qmp.execute("job-cancel", {"id": "slow"})
    jobs = await wait_concluded(qmp, "slow")
    assert jobs["slow"]["error"] == "Operation canceled"
    desc = await qmp_error(qmp, "job-cancel", {"id": "slow"})
    assert desc == "Job 'slow' in state 'concluded' cannot accept command verb 'cancel'"


async def test_cancelling_one_job_leaves_the_others_running_to_the_end(qmp, shm, short_dir):
    data = await _backends(qmp, shm, 2, size=16 * MiB)
    await qmp.execute(
        "memory-save",
        {"job-id": "a", "backends": ["vm0"], "uri": f"file:{short_dir}/a.sav",
         "max-bandwidth": 2 * MiB},
    )  # fmt: skip
    await qmp.execute(
        "memory-save",
        {"job-id": "b", "backends": ["vm1"], "uri": f"file:{short_dir}/b.sav",
         "max-bandwidth": 8 * MiB},
    )  # fmt: skip
    await poll_until(
        lambda: _jobs(qmp),
        lambda jobs: jobs["a"]["current-progress"] > 0,
        "job a moving",
    )
    await qmp.execute("job-cancel", {"id": "a"})
    jobs = await wait_concluded(qmp, "a", "b")
    assert jobs["a"]["error"] == "Operation canceled"
    assert "error" not in jobs["b"]
    (shm / "vm1").write_bytes(bytes(16 * MiB))
    await qmp.execute(
        "memory-restore", {"job-id": "r", "backends": ["vm1"], "uri": f"file:{short_dir}/b.sav"}
    )
    await wait_concluded(qmp, "r")
    assert (shm / "vm1").read_bytes() == data["vm1"]
    # The cancelled save is incomplete: readers refuse it.
    cut = {"job-id": "r2", "backends": ["vm0"], "uri": f"file:{short_dir}/a.sav"}
    desc = await qmp_error(qmp, "memory-restore", cut)
    assert "save file is incomplete" in desc


async def test_a_job_that_fails_does_not_disturb_the_others(qmp, shm, short_dir, small_ext4):
    data = await _backends(qmp, shm, 2, size=32 * MiB)
    # vm0's save does not fit on the 24 MiB filesystem: ENOSPC in its channels.
    await qmp.execute(
        "memory-save", {"job-id": "full", "backends": ["vm0"], "uri": f"file:{small_ext4}/a.sav"}
    )
    await qmp.execute(
        "memory-save", {"job-id": "ok", "backends": ["vm1"], "uri": f"file:{short_dir}/b.sav"}
    )
    jobs = await wait_concluded(qmp, "full", "ok")
    assert "No space left on device" in jobs["full"]["error"], jobs["full"]
    assert jobs["full"]["x-migration-status"] == "failed"
    assert "error" not in jobs["ok"]
    (shm / "vm1").write_bytes(bytes(32 * MiB))
    await qmp.execute(
        "memory-restore", {"job-id": "r", "backends": ["vm1"], "uri": f"file:{short_dir}/b.sav"}
    )
    assert "error" not in (await wait_concluded(qmp, "r"))["r"]
    assert (shm / "vm1").read_bytes() == data["vm1"]


async def test_migrate_is_a_job_too_and_parameters_may_change_while_jobs_run(qmp, shm, short_dir):
    await _backends(qmp, shm, 1, size=16 * MiB)
    await enable_mapped_ram(qmp, channels=2, **{"max-bandwidth": 2 * MiB})
    await qmp.execute("migrate", {"uri": f"file:{short_dir}/m.sav"})
    jobs = await _jobs(qmp)
    assert jobs["migration"]["type"] == "snapshot-save", jobs
    # Refused before jobs: a running job keeps the settings it started with.
    await qmp.execute("migrate-set-parameters", {"multifd-channels": 5})
    assert (await qmp.execute("query-migrate-parameters"))["multifd-channels"] == 5
    await qmp.execute("job-cancel", {"id": "migration"})
    info = await wait_migration(qmp)
    assert info["status"] == "cancelled"
    # migrate's job leaves query-jobs by itself once it ends (auto-dismiss).
    await poll_until(lambda: _jobs(qmp), lambda jobs: "migration" not in jobs, "dismissed")
    desc = await qmp_error(
        qmp, "memory-save", {"job-id": "migration", "uri": f"file:{short_dir}/x.sav"}
    )
    assert desc == "Job ID 'migration' already in use"


def test_a_daemon_wide_cap_counts_every_jobs_bytes() -> None:
    daemon = Throttle(0)
    jobs = [Throttle(0, parent=daemon), Throttle(5 * MiB, parent=daemon)]
    assert jobs[0].rate == 0 and jobs[1].rate == 5 * MiB
    daemon.set_rate(2 * MiB)
    assert jobs[0].rate == 2 * MiB and jobs[1].rate == 2 * MiB  # the lower cap sizes calls
    never = threading.Event()
    for job in jobs:
        job.wait(1, never)  # the first bytes are granted at once
    assert daemon._granted == 2  # both jobs' bytes count against the daemon's cap


def test_time_without_io_earns_no_burst_over_a_cap(monkeypatch) -> None:
    """The daemon's cap lives as long as the daemon: counted from its start, 8 s of idling
    at 16 MiB/s let the next saves send 128 MiB at full speed (red-team, session 15: 0.16 s
    for 64 MiB). On a clock the test moves: after an idle minute, 10 MiB at 1 MiB/s still
    wait about 10 s."""
    from migd.io import throttle as throttle_module

    now = [1000.0]
    monkeypatch.setattr(throttle_module.time, "monotonic", lambda: now[0])

    class Clock(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:  # waiting moves the clock
            now[0] += timeout or 0.0
            return False

    daemon = Throttle(0)
    daemon.set_rate(MiB)
    job = Throttle(0, parent=daemon)
    now[0] += 60.0  # idle
    started = now[0]
    for _ in range(10):
        job.wait(MiB, Clock())
    waited = now[0] - started
    assert 10.0 - 2 * Throttle.CREDIT_SECONDS <= waited <= 10.0 + Throttle.POLL, waited


def test_sigterm_with_several_jobs_running_exits_quickly_and_leaves_no_complete_file(
    short_dir,
):
    shm = Path(os.environ.get("MIGD_TEST_SHM", "/dev/shm"))
    d = start_daemon(short_dir / "qmp.sock")
    files = []
    try:
        client = RawClient(d.socket_path).negotiate()
        for i in range(3):
            mem = shm / f"migd-jobs-{os.getpid()}-{i}"
            fill_random(mem, 16 * MiB, seed=i)
            client.execute(
                "object-add",
                {"qom-type": "memory-backend-file", "id": f"vm{i}", "size": 16 * MiB,
                 "mem-path": str(mem), "ramblock-name": f"vm{i}"},
            )  # fmt: skip
            files.append(short_dir / f"{i}.sav")
            reply = client.execute(
                "memory-save",
                {"job-id": f"j{i}", "backends": [f"vm{i}"], "uri": f"file:{files[-1]}",
                 "max-bandwidth": MiB},
            )  # fmt: skip
            assert reply == {"return": {}}, reply
        running = client.execute("query-jobs")["return"]
        assert {j["status"] for j in running} == {"running"}
        client.close()
        started = time.monotonic()
        rc = d.stop()
        seconds = time.monotonic() - started
        assert rc == 0 and seconds < 2.0, (rc, seconds)  # the bound for SIGTERM
    finally:
        d.stop()
        for i in range(3):
            Path(shm / f"migd-jobs-{os.getpid()}-{i}").unlink(missing_ok=True)
    assert files and not any(is_complete_save(f) for f in files)


def test_a_free_io_slot_goes_to_the_waiting_job_with_the_fewest_calls_in_flight() -> None:
    """io/share.py: job A holds both slots and queues a third call before job B queues
    one; when A releases a slot, B (no call in flight) gets it, not A's older call."""
    share = DiskShare(slots=2)
    never = threading.Event()
    held = [share.slot("A", never) for _ in range(2)]
    for slot in held:
        assert slot.__enter__() is True
    order: list[str] = []
    finish = threading.Event()  # the granted calls hold their slots until then

    def call(job: str, queued: threading.Event) -> None:
        queued.set()
        with share.slot(job, never) as got:
            assert got
            order.append(job)
            finish.wait(10)

    a_queued, b_queued = threading.Event(), threading.Event()
    a = threading.Thread(target=call, args=("A", a_queued))
    a.start()
    a_queued.wait()
    poll_until_sync(lambda: len(share._waiting) == 1, "A's third call waiting")
    b = threading.Thread(target=call, args=("B", b_queued))
    b.start()
    b_queued.wait()
    poll_until_sync(lambda: len(share._waiting) == 2, "B's call waiting")
    held[0].__exit__(None, None, None)
    poll_until_sync(lambda: order != [], "a slot granted")
    assert order == ["B"] and share.in_flight == {"A": 1, "B": 1}
    held[1].__exit__(None, None, None)
    poll_until_sync(lambda: len(order) == 2, "the second slot granted")
    finish.set()
    a.join(10)
    b.join(10)
    assert order == ["B", "A"] and share.in_flight == {}


def test_a_cancelled_job_stops_waiting_for_an_io_slot() -> None:
    share = DiskShare(slots=1)
    never, cancel = threading.Event(), threading.Event()
    with share.slot("A", never):
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(share._acquire("B", cancel)))
        t.start()
        poll_until_sync(lambda: len(share._waiting) == 1, "B waiting")
        cancel.set()
        t.join(10)
        assert result == [False] and share.in_flight == {"A": 1}


def poll_until_sync(done, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


async def test_jobs_left_undismissed_are_bounded(qmp, shm, short_dir, monkeypatch):
    from migd.migration import engine

    monkeypatch.setattr(engine, "MAX_JOBS", 2)
    await _backends(qmp, shm, 1, size=MiB)
    for i in range(2):
        await qmp.execute("memory-save", {"job-id": f"j{i}", "uri": f"file:{short_dir}/{i}.sav"})
        await wait_concluded(qmp, f"j{i}")
    desc = await qmp_error(qmp, "memory-save", {"job-id": "j2", "uri": f"file:{short_dir}/2.sav"})
    assert desc.startswith("2 jobs are listed, the most migd keeps: dismiss concluded jobs")
    await qmp.execute("job-dismiss", {"id": "j0"})
    await qmp.execute("memory-save", {"job-id": "j2", "uri": f"file:{short_dir}/2.sav"})
    assert "error" not in (await wait_concluded(qmp, "j2"))["j2"]


async def test_a_job_with_zero_multifd_channels_is_refused_with_qemus_text(qmp, shm, short_dir):
    """memory-save and memory-restore take 'multifd-channels' per job; 0 is refused as QEMU
    refuses it for migrate-set-parameters. Unchecked, a save with no channel and no
    checksums concluded with no error, its file holding not one page, and a restore with
    none would have restored nothing. Nothing refused leaves a file or a job behind."""
    await _backends(qmp, shm, 1)
    text = "Parameter 'multifd_channels' expects a value between 1 and 255"
    args = {"job-id": "z", "uri": f"file:{short_dir}/z.sav", "multifd-channels": 0}
    assert await qmp_error(qmp, "memory-save", {**args, "checksums": False}) == text
    assert not (short_dir / "z.sav").exists()
    await qmp.execute("memory-save", {"job-id": "s", "uri": f"file:{short_dir}/s.sav"})
    assert "error" not in (await wait_concluded(qmp, "s"))["s"]
    restore = {**args, "uri": f"file:{short_dir}/s.sav"}
    assert await qmp_error(qmp, "memory-restore", restore) == text
    assert [j["id"] for j in await qmp.execute("query-jobs")] == ["s"]


def test_an_io_call_that_raises_gives_its_slot_back() -> None:
    """io/share.py: a channel's pwritev/preadv runs inside share.slot(); one that raises
    (ENOSPC, EIO) must still release its slot, or each failed call keeps one of the
    daemon's 16 and after 16 failures every job of the daemon waits forever."""
    share = DiskShare(slots=1)
    never = threading.Event()
    for _ in range(3):  # more failures than slots
        try:
            with share.slot("A", never) as got:
                assert got
                raise OSError(28, "No space left on device")
        except OSError:
            pass
        assert share.in_flight == {}
    granted: list[bool] = []
    give_up = threading.Event()  # ends the wait of a call that would wait forever
    t = threading.Thread(target=lambda: granted.append(share._acquire("B", give_up)))
    t.start()
    t.join(10)
    give_up.set()
    t.join(10)
    assert granted == [True] and share.in_flight == {"B": 1}


async def test_a_restore_into_a_backend_a_running_save_reads_is_refused_naming_the_job(
    qmp, shm, short_dir
):
    """A restore into a backend that a running save reads changes the memory under the
    save: the save would be marked completed with pages of both. The restore is refused
    naming the save (checked again at its launch, after the file is parsed), and the
    save goes on."""
    data = await _backends(qmp, shm, 1, size=16 * MiB)
    await qmp.execute("memory-save", {"job-id": "first", "uri": f"file:{short_dir}/a.sav"})
    assert "error" not in (await wait_concluded(qmp, "first"))["first"]
    await qmp.execute(
        "memory-save",
        {"job-id": "slow", "backends": ["vm0"], "uri": f"file:{short_dir}/slow.sav",
         "max-bandwidth": MiB},
    )  # fmt: skip
    args = {"job-id": "r", "backends": ["vm0"], "uri": f"file:{short_dir}/a.sav"}
    desc = await qmp_error(qmp, "memory-restore", args)
    assert desc == "Memory backend 'vm0' is in use by job 'slow'"
    jobs = await _jobs(qmp)
    assert sorted(jobs) == ["first", "slow"] and jobs["slow"]["status"] == "running", jobs
    await qmp.execute("job-cancel", {"id": "slow"})
    await wait_concluded(qmp, "slow")
    assert (shm / "vm0").read_bytes() == data["vm0"]


async def test_twenty_saves_and_restores_at_once_are_byte_exact_and_others_are_answered(
    migd_inproc, qmp, shm, short_dir
):
    """Ten restores and ten saves at once, 4 channels each, half of them direct-io (staged
    through the shared pool of staging buffers): some 150 job threads, more than the 64
    the worker pool makes ahead. Every job completes byte for byte and another client is
    answered meanwhile (red-team, session 17: held)."""
    data = await _backends(qmp, shm, 20, size=2 * MiB)
    for i in range(10):
        await qmp.execute(
            "memory-save",
            {"job-id": f"first{i}", "backends": [f"vm{i}"], "uri": f"file:{short_dir}/{i}.sav"},
        )
    await wait_concluded(qmp, *(f"first{i}" for i in range(10)))
    for i in range(10):
        (shm / f"vm{i}").write_bytes(bytes(2 * MiB))
    # 4 MiB/s: each job runs for half a second, so all twenty run at once.
    common = {"multifd-channels": 4, "max-bandwidth": 4 * MiB}
    for i in range(20):
        command = "memory-restore" if i < 10 else "memory-save"
        await qmp.execute(
            command,
            {"job-id": f"j{i}", "backends": [f"vm{i}"], "uri": f"file:{short_dir}/{i}.sav",
             "direct-io": i % 2 == 1, **common},
        )  # fmt: skip
    other = await migd_inproc.client("other")
    try:
        listed = {job["id"] for job in await other.execute("query-jobs")}
        assert {f"j{i}" for i in range(20)} <= listed
    finally:
        await other.disconnect()
    jobs = await wait_concluded(qmp, *(f"j{i}" for i in range(20)))
    assert all("error" not in jobs[f"j{i}"] for i in range(20)), jobs
    for i in range(10):
        assert (shm / f"vm{i}").read_bytes() == data[f"vm{i}"], i
    for i in range(10, 20):
        (shm / f"vm{i}").write_bytes(bytes(2 * MiB))
        await qmp.execute(
            "memory-restore",
            {"job-id": f"back{i}", "backends": [f"vm{i}"], "uri": f"file:{short_dir}/{i}.sav"},
        )
    await wait_concluded(qmp, *(f"back{i}" for i in range(10, 20)))
    for i in range(10, 20):
        assert (shm / f"vm{i}").read_bytes() == data[f"vm{i}"], i
