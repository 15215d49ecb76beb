"""`migd save/restore --job-id/--backend` (memory-save / memory-restore jobs followed through
query-jobs), `migd jobs [--watch]` and the jobs in `migd status`, against a real daemon."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from migd.tools.client import CLEAR_SCREEN
from migd.tools.inspect import inspect_file

from .conftest import RawClient, fill_random
from .test_cli_client import SUMMARY, memdevs, migd

MiB = 1 << 20
JOB_SUMMARY = re.compile(r"\(job (\S+), backends (\S+)\) (->|<-) ")


def query_jobs(socket_path: Path) -> list[dict[str, Any]]:
    client = RawClient(socket_path).negotiate()
    try:
        return client.ok("query-jobs")
    finally:
        client.close()


def wait_jobs(
    socket_path: Path, done: Callable[[list[dict[str, Any]]], bool], what: str, timeout=30.0
) -> list[dict[str, Any]]:
    """Poll query-jobs until done(jobs) holds (a bounded busy wait), on one connection:
    migd logs each connection, and the daemon fixture's stderr is a pipe nobody reads."""
    client = RawClient(socket_path).negotiate()
    try:
        deadline = time.monotonic() + timeout
        while True:
            jobs = client.ok("query-jobs")
            if done(jobs):
                return jobs
            assert time.monotonic() < deadline, f"{what}: not reached within {timeout}s: {jobs}"
            time.sleep(0.02)
    finally:
        client.close()


def popen_migd(*args: object, **kwargs: Any) -> subprocess.Popen[str]:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(
        [sys.executable, "-m", "migd", *map(str, args)], text=True, **kwargs
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def add_backends(socket_path: Path, shm: Path, sizes: dict[str, int]) -> dict[str, bytes]:
    """File backends named after their ids (block names too), with random contents."""
    client = RawClient(socket_path).negotiate()
    data = {}
    try:
        for seed, (id, size) in enumerate(sizes.items(), 1):
            data[id] = fill_random(shm / id, size, seed=seed)
            client.ok("object-add", {"qom-type": "memory-backend-file", "id": id, "size": size,
                                     "mem-path": str(shm / id), "share": True})  # fmt: skip
    finally:
        client.close()
    return data


def both_seen(ids: tuple[str, ...], seen: set[str]) -> Callable[[list[dict[str, Any]]], bool]:
    """done() for wait_jobs: every job of `ids` listed in one answer while running."""

    def done(jobs: list[dict[str, Any]]) -> bool:
        running = {j["id"] for j in jobs if j["status"] == "running"}
        seen.update(j["id"] for j in jobs)
        return set(ids) <= running

    return done


# --- save / restore as jobs ---------------------------------------------------------------


def test_two_job_saves_and_restores_run_concurrently_in_one_daemon_byte_exact(
    daemon, shm, short_dir
):
    size = 24 * MiB
    data = {name: fill_random(shm / name, size, seed=seed) for seed, name in enumerate("ab", 1)}
    sock = daemon.socket_path
    # 8 MiB/s each: both are still running when the second has started.
    saves = {
        name: popen_migd("save", short_dir / f"{name}.sav", "--socket", sock, "--job-id",
                         f"save-{name}", "--mem-path", shm / name, "--max-bandwidth", "8M")
        for name in "ab"
    }  # fmt: skip
    seen: set[str] = set()
    wait_jobs(sock, both_seen(("save-a", "save-b"), seen), "both saves running at once")
    for name, proc in saves.items():
        code, out, err = finish(proc)
        assert code == 0, err
        assert SUMMARY.search(out), out
        # The temporary backend, and so its block, is named after the job: backend ids and
        # block names are unique in a daemon.
        assert JOB_SUMMARY.search(out).groups() == (f"save-{name}", f"save-{name}", "->"), out
        assert f"block 'save-{name}' (memory backend 'save-{name}' on {shm / name})" in out
        assert [b.name for b in inspect_file(short_dir / f"{name}.sav").blocks] == [f"save-{name}"]
    assert query_jobs(sock) == []  # dismissed once concluded
    assert memdevs(sock) == []

    loads = {
        name: popen_migd("restore", short_dir / f"{name}.sav", "--socket", sock, "--job-id",
                         f"load-{name}", "--mem-path", shm / f"{name}2", "--max-bandwidth", "8M")
        for name in "ab"
    }  # fmt: skip
    wait_jobs(sock, both_seen(("load-a", "load-b"), seen), "both restores running at once")
    for name, proc in loads.items():
        code, out, err = finish(proc)
        assert code == 0, err
        assert SUMMARY.search(out) and f"(job load-{name}, " in out, out
        assert (shm / f"{name}2").read_bytes() == data[name], name
    assert query_jobs(sock) == [] and memdevs(sock) == []


def test_backend_picks_only_that_backend_for_save_and_restore(daemon, shm, short_dir):
    sock = daemon.socket_path
    data = add_backends(sock, shm, {"a": 2 * MiB, "b": 2 * MiB})
    saved = migd("save", short_dir / "a.sav", "--socket", sock, "--backend", "a")
    assert saved.returncode == 0, saved.stderr
    assert JOB_SUMMARY.search(saved.stdout).group(2) == "a", saved.stdout
    assert [b.name for b in inspect_file(short_dir / "a.sav").blocks] == ["a"]  # no 'b'
    for id in data:
        (shm / id).write_bytes(bytes(2 * MiB))
    restored = migd("restore", short_dir / "a.sav", "--socket", sock, "--backend", "a",
                    "--job-id", "load-a")  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    assert (shm / "a").read_bytes() == data["a"]
    assert (shm / "b").read_bytes() == bytes(2 * MiB)  # not in the job: untouched
    assert memdevs(sock) == ["a", "b"]  # not the client's: left in place
    assert query_jobs(sock) == []


def test_a_job_that_fails_exits_1_with_the_jobs_error_and_is_dismissed(daemon, shm, short_dir):
    sock = daemon.socket_path
    fill_random(shm / "src", 4 * MiB)
    image = short_dir / "src.sav"
    assert migd("save", image, "--socket", sock, "--job-id", "s", "--mem-path", shm / "src",
                "--no-direct-io").returncode == 0  # fmt: skip
    (block,) = inspect_file(image).blocks
    with open(image, "r+b") as f:  # one bit of the second MiB of page data
        f.seek(block.pages_offset + MiB + 100)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 1]))
    result = migd("restore", image, "--socket", sock, "--job-id", "bad",
                  "--mem-path", shm / "dst", "--no-direct-io")  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "migd restore: error: restore failed: " in result.stderr
    assert "checksum mismatch in ramblock 's'" in result.stderr, result.stderr
    assert query_jobs(sock) == []  # dismissed after its error was read
    assert memdevs(sock) == []


def test_a_job_id_in_use_exits_1_with_the_daemons_error(daemon, shm, short_dir):
    sock = daemon.socket_path
    add_backends(sock, shm, {"vm0": 16 * MiB, "vm1": MiB})
    client = RawClient(sock).negotiate()
    client.ok("memory-save", {"job-id": "slow", "backends": ["vm0"], "max-bandwidth": MiB,
                              "uri": f"file:{short_dir}/slow.sav"})  # fmt: skip
    result = migd("save", short_dir / "x.sav", "--socket", sock, "--backend", "vm1",
                  "--job-id", "slow")  # fmt: skip
    assert result.returncode == 1
    assert "migd save: error: memory-save: " in result.stderr and "slow" in result.stderr
    client.ok("job-cancel", {"id": "slow"})
    client.close()


def test_ctrl_c_during_a_job_save_cancels_that_job_and_exits_1(daemon, shm, short_dir):
    sock = daemon.socket_path
    fill_random(shm / "src", 32 * MiB)
    proc = popen_migd("save", short_dir / "c.sav", "--socket", sock, "--job-id", "c",
                      "--mem-path", shm / "src", "--max-bandwidth", "4M")  # fmt: skip
    try:
        wait_jobs(sock, lambda jobs: [j["status"] for j in jobs] == ["running"], "c running")
        proc.send_signal(signal.SIGINT)
    finally:
        code, _, err = finish(proc)
    assert code == 1, err
    assert "cancelling the save" in err
    assert query_jobs(sock) == [] and memdevs(sock) == []
    assert migd("inspect", short_dir / "c.sav").returncode == 1  # never taken for complete


# --- migd jobs / migd status -------------------------------------------------------------


def start_slow_job(sock: Path, shm: Path, short_dir: Path) -> RawClient:
    """A memory-save of vm0 at 1 MiB/s (16 s): still running while the tests look."""
    add_backends(sock, shm, {"vm0": 16 * MiB})
    client = RawClient(sock).negotiate()
    client.ok("memory-save", {"job-id": "slow", "backends": ["vm0"], "max-bandwidth": MiB,
                              "uri": f"file:{short_dir}/slow.sav"})  # fmt: skip
    wait_jobs(sock, lambda jobs: [j["status"] for j in jobs] == ["running"], "slow running")
    return client


def test_jobs_lists_a_running_job_as_a_table(daemon, shm, short_dir):
    sock = daemon.socket_path
    assert migd("jobs", "--socket", sock).stdout == "no jobs\n"
    client = start_slow_job(sock, shm, short_dir)
    result = migd("jobs", "--socket", sock)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["ID", "TYPE", "STATUS", "PROGRESS", "MB/s", "FILE", "BACKENDS",
                              "ERROR"]  # fmt: skip
    cells = row.split()
    assert cells[:3] == ["slow", "save", "running"], row
    assert re.fullmatch(r"\d+%", cells[3]) and int(cells[3][:-1]) < 100, row
    assert float(cells[4]) >= 0
    assert cells[5:] == [f"{short_dir}/slow.sav", "vm0"], row
    as_json = json.loads(migd("jobs", "--json", "--socket", sock).stdout)
    assert [(j["id"], j["x-backends"]) for j in as_json] == [("slow", ["vm0"])]

    status = migd("status", "--socket", sock)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == "no migration has run since migd started"
    assert lines[2] == "jobs:" and lines[4].split()[:3] == ["slow", "save", "running"]
    status_json = json.loads(migd("status", "--json", "--socket", sock).stdout)
    assert [j["id"] for j in status_json["jobs"]] == ["slow"]

    client.ok("job-cancel", {"id": "slow"})
    jobs = wait_jobs(sock, lambda jobs: jobs[0]["status"] == "concluded", "slow concluded")
    row = migd("jobs", "--socket", sock).stdout.splitlines()[1]
    assert row.split()[2] == "concluded" and row.endswith(jobs[0]["error"]), row
    client.ok("job-dismiss", {"id": "slow"})
    client.close()
    assert json.loads(migd("status", "--json", "--socket", sock).stdout) == {}  # no "jobs"


def _read_until(fd: int, done: Callable[[str], bool], timeout: float = 30) -> str:
    """Read a pty master until done(text so far) holds."""
    text, deadline = "", time.monotonic() + timeout
    while not done(text):
        left = deadline - time.monotonic()
        assert left > 0, f"not seen within {timeout}s: {text!r}"
        if select.select([fd], [], [], left)[0]:
            text += os.read(fd, 65536).decode(errors="replace")
    return text


def test_jobs_watch_redraws_the_table_on_a_terminal_until_ctrl_c_and_exits_0(
    daemon, shm, short_dir
):
    sock = daemon.socket_path
    client = start_slow_job(sock, shm, short_dir)
    master, slave = pty.openpty()
    proc = popen_migd("jobs", "--watch", "--socket", sock, stdout=slave)
    os.close(slave)
    try:
        # Redrawn: the screen is cleared, then the table, again and again.
        text = _read_until(master, lambda t: t.count(CLEAR_SCREEN) >= 3)
        proc.send_signal(signal.SIGINT)
        code, _, err = finish(proc, timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, err
    frame = text.split(CLEAR_SCREEN)[2]
    lines = frame.replace("\r", "").splitlines()
    assert lines[0].startswith(f"migd jobs at {sock}, ")
    assert lines[1].split()[0] == "ID" and lines[2].split()[:3] == ["slow", "save", "running"]
    client.ok("job-cancel", {"id": "slow"})
    client.close()


def test_jobs_watch_without_a_terminal_prints_plain_tables_until_sigint(daemon, shm, short_dir):
    sock = daemon.socket_path
    client = start_slow_job(sock, shm, short_dir)
    proc = popen_migd("jobs", "--watch", "--socket", sock)
    try:
        assert proc.stdout is not None
        headers = 0
        while headers < 2:  # two tables printed
            line = proc.stdout.readline()
            assert line, "migd jobs --watch stopped printing"
            headers += line.startswith("ID ")
        proc.send_signal(signal.SIGINT)
    finally:
        code, out, err = finish(proc, timeout=30)
    assert code == 0, err
    assert CLEAR_SCREEN not in out  # no escapes into a pipe
    client.ok("job-cancel", {"id": "slow"})
    client.close()


def test_jobs_without_a_daemon_exits_2_naming_the_socket(short_dir):
    result = migd("jobs", "--socket", short_dir / "none.sock")
    assert result.returncode == 2
    assert f"cannot connect to migd at {short_dir / 'none.sock'}" in result.stderr
