"""The bench's timed migrations end at the server's MIGRATION event, not at the poll that
saw the end (migd/bench/processes.py timed_migration): a real daemon, a real save."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migd.bench.processes import QMP, configure, event_time, serve_argv, timed_migration

SIZE = 16 << 20


@pytest.fixture
def daemon(short_dir: Path) -> Iterator[tuple[QMP, int]]:
    """A migd daemon with a 16 MiB backend: its QMP connection and pid."""
    sock, log = short_dir / "m.sock", short_dir / "m.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(serve_argv(sock), stdout=out, stderr=subprocess.STDOUT)
    try:
        qmp = QMP(sock, proc, log)
        mem = short_dir / "mem"
        mem.write_bytes(b"\x5a" * SIZE)
        mem.chmod(0o600)
        qmp.execute(
            "object-add",
            {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE,
             "mem-path": str(mem), "share": True},
        )  # fmt: skip
        yield qmp, proc.pid
        qmp.close()
    finally:
        proc.terminate()
        proc.wait()


def test_a_save_is_timed_to_its_completed_event(
    daemon: tuple[QMP, int], short_dir: Path
) -> None:
    qmp, pid = daemon
    configure(qmp, 2, False)  # the bench's capabilities: events among them
    before = time.perf_counter()
    timed = timed_migration(qmp, "migrate", {"uri": f"file:{short_dir / 'a.img'}"}, pid)
    around = time.perf_counter() - before
    assert timed.info["status"] == "completed" and timed.by_event
    assert 0 < timed.seconds <= around
    assert qmp.events == []  # the migration's events consumed, none left for the next


def test_without_events_the_poll_times_it(daemon: tuple[QMP, int], short_dir: Path) -> None:
    qmp, pid = daemon
    configure(qmp, 2, False)
    qmp.execute("migrate-set-capabilities",
                {"capabilities": [{"capability": "events", "state": False}]})  # fmt: skip
    timed = timed_migration(qmp, "migrate", {"uri": f"file:{short_dir / 'b.img'}"}, pid)
    assert timed.info["status"] == "completed" and not timed.by_event and timed.seconds > 0


def test_event_time_takes_the_status_asked_for() -> None:
    events = [
        {"event": "MIGRATION", "data": {"status": "active"},
         "timestamp": {"seconds": 100, "microseconds": 250000}},
        {"event": "STOP", "timestamp": {"seconds": 101, "microseconds": 0}},
        {"event": "MIGRATION", "data": {"status": "completed"},
         "timestamp": {"seconds": 102, "microseconds": 500000}},
    ]  # fmt: skip
    assert event_time(events, "completed") == 102.5
    assert event_time(events, "active") == 100.25
    assert event_time(events, "failed") is None


def counting_queries(qmp: QMP) -> list[str]:
    """The names of the commands `qmp` executes from now on."""
    sent: list[str] = []
    execute = qmp.execute

    def counted(name: str, arguments: dict | None = None) -> object:
        sent.append(name)
        return execute(name, arguments)

    qmp.execute = counted  # type: ignore[method-assign]
    return sent


def test_waiting_for_the_event_asks_query_migrate_once(
    daemon: tuple[QMP, int], short_dir: Path
) -> None:
    """timed_migration(poll=False), as the bench's paired polling rows: a save held to
    about a quarter of a second by max-bandwidth is timed to its event with one
    query-migrate, at the end (polling, it takes one every 10 ms), the daemon's memory
    sampled all the same, and no latencies reported."""
    qmp, pid = daemon
    configure(qmp, 2, False, **{"max-bandwidth": 64 << 20})
    sent = counting_queries(qmp)
    timed = timed_migration(
        qmp, "migrate", {"uri": f"file:{short_dir / 'c.img'}"}, pid, poll=False
    )
    assert timed.info["status"] == "completed" and timed.by_event
    assert timed.seconds > 0.1
    assert sent == ["migrate", "query-migrate"]
    assert timed.latencies == [] and timed.peak_anon > 0
    sent.clear()
    polled = timed_migration(qmp, "migrate", {"uri": f"file:{short_dir / 'd.img'}"}, pid)
    assert sent.count("query-migrate") >= 5 and len(polled.latencies) == sent.count(
        "query-migrate"
    )


def test_waiting_without_events_a_slow_poll_finds_the_end(
    daemon: tuple[QMP, int], short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that sends no MIGRATION event (capability `events` off): the wait asks
    query-migrate every SAFETY_POLL seconds and ends at the answer that says completed."""
    import migd.bench.processes as processes

    monkeypatch.setattr(processes, "SAFETY_POLL", 0.1)
    qmp, pid = daemon
    configure(qmp, 2, False, **{"max-bandwidth": 64 << 20})
    qmp.execute("migrate-set-capabilities",
                {"capabilities": [{"capability": "events", "state": False}]})  # fmt: skip
    sent = counting_queries(qmp)
    timed = timed_migration(
        qmp, "migrate", {"uri": f"file:{short_dir / 'e.img'}"}, pid, poll=False
    )
    assert timed.info["status"] == "completed" and not timed.by_event
    assert 2 <= sent.count("query-migrate") <= 10, sent
