"""What the benchmark runs: cleanup of all it made, QMP clients of migd and QEMU,
timed migrations, and the migd daemon under test (also started this way by
migd.bench.load and examples/demo.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..procstat import read_stat
from .common import FINAL, PACKAGE_PARENT, POLL, BenchError

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

    from .suite import Bench  # numpy is imported where it is used: `migd --help` need not load it

    pass


# --- processes and files ---------------------------------------------------------------


class Cleanup:
    """Owns every process and directory the benchmark creates; close() removes them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dirs: list[Path] = []

    def mkdtemp(self, parent: str | Path) -> Path:
        path = Path(tempfile.mkdtemp(prefix="migd-bench-", dir=parent))
        self.dirs.append(path)
        return path

    def spawn(
        self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`argv` started with its output in `log_path`; `env`: added to ours."""
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=PACKAGE_PARENT,
                env=None if env is None else {**os.environ, **env},
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc)
        for path in reversed(self.dirs):
            shutil.rmtree(path, ignore_errors=True)
        self.dirs.clear()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class QMP:
    """A minimal synchronous QMP client (one JSON object per line). Events are kept in
    `events`, oldest first, until the caller clears them (timed_migration does)."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                program = proc.args[0] if isinstance(proc.args, list) else proc.args
                raise BenchError(
                    f"{program!s} exited with {proc.returncode}:\n{tail(log_path)}"
                )
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise BenchError(f"nothing listens on {path} after 30 s") from None
                time.sleep(0.02)
        sock.settimeout(300)
        self.sock = sock
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self.greeting = self._recv()
        self.execute("qmp_capabilities")

    def _recv(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("the QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def wait_event(self, is_it: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        """Whether an event `is_it` came, among those kept or those arriving within
        `timeout` seconds (read as they come; kept in `events` as execute keeps them)."""
        deadline = time.monotonic() + timeout
        while not any(is_it(event) for event in self.events):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if b"\n" not in self._buf and not select.select([self.sock], [], [], left)[0]:
                return False
            message = self._recv()
            if "event" in message:
                self.events.append(message)
        return True

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\r\n")
        while True:
            reply = self._recv()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise BenchError(f"{name}: {reply['error'].get('desc')}")
            return reply.get("return")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Timed:
    seconds: float
    info: dict[str, Any]
    latencies: list[float]  # query-migrate round trips, seconds
    peak_anon: int  # the server's peak RssAnon in bytes (0 when not sampled)
    cpu: float  # CPU seconds (user + system) the server spent on it
    cpu_user: float = 0.0  # of which in user space
    cpu_sys: float = 0.0  # and in the kernel
    by_event: bool = False  # `seconds` end at the MIGRATION event's timestamp, not a poll


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process so far, all its threads."""
    fields = read_stat(pid)[1]
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def rss_anon(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def timed_migration(
    qmp: QMP,
    command: str,
    arguments: dict[str, Any],
    pid: int,
    rss: bool = True,
    poll: bool = True,
) -> Timed:
    """Issue migrate / migrate-incoming and wait until its final status: polling
    query-migrate every 10 ms, or (`poll` False) waiting for the MIGRATION event of it.

    The time ends at the server's MIGRATION event of that final status (its timestamp,
    the wall clock as QEMU's and migd's events carry it), where one came before the
    poll that saw the end: a poll finds the end up to POLL plus a round trip late, about
    6 ms on average, 3% of a 1.5 GiB save on the fast disk (docs/bench/fast-disk), which
    the disk baselines, timed in this process, never lose. The polls' round trips are
    the report's query-migrate latencies, and a management application may poll during
    a migration too; but on a machine whose CPUs the migration keeps busy, waking the
    server (and this process) every 10 ms costs the migration itself (about a tenth of a
    save on the fast disk, docs/bench/fast-disk "Session 25"), so the bench's paired
    polling rows (Bench.paired_polling) also time it as libvirt waits for it with
    `events` on: for the event alone, the server's memory sampled from /proc every
    EVENT_SAMPLE seconds (which wakes only this process), query-migrate asked once at
    the end (and every SAFETY_POLL seconds, should no event come)."""
    latencies: list[float] = []
    peak = 0
    user, system = cpu_times(pid)
    qmp.events.clear()
    wall_start = time.time()  # the events' clock
    start = time.perf_counter()
    qmp.execute(command, arguments)
    next_poll = start + SAFETY_POLL
    while True:
        if not poll and not qmp.wait_event(_final_migration_event, EVENT_SAMPLE):
            if rss:
                peak = max(peak, rss_anon(pid))
            if time.perf_counter() < next_poll:
                continue
            next_poll += SAFETY_POLL
        sent = time.perf_counter()
        info = qmp.execute("query-migrate")
        now = time.perf_counter()
        latencies.append(now - sent)
        if rss:
            peak = max(peak, rss_anon(pid))
        if info.get("status") in FINAL:
            break
        if poll or any(_final_migration_event(event) for event in qmp.events):
            time.sleep(POLL)  # (an event ahead of the status it announces: asked again)
    if info["status"] != "completed":
        raise BenchError(f"{command} ended {info['status']}: {info.get('error-desc')}")
    user_end, system_end = cpu_times(pid)
    used_user, used_sys = user_end - user, system_end - system
    seconds, by_event = now - start, False
    ended = event_time(qmp.events, info["status"])
    if ended is not None and 0 < ended - wall_start <= seconds:
        seconds, by_event = ended - wall_start, True
    qmp.events.clear()
    if not poll:
        latencies = []  # the closing query and safety polls: not the polled latencies
    return Timed(seconds, info, latencies, peak, used_user + used_sys, used_user, used_sys,
                 by_event)  # fmt: skip


# Waiting for the MIGRATION event (timed_migration, poll False): how often the server's
# memory is sampled from /proc, and how often query-migrate is asked all the same.
EVENT_SAMPLE = 0.05
SAFETY_POLL = 1.0


def _final_migration_event(event: dict[str, Any]) -> bool:
    return event.get("event") == "MIGRATION" and event.get("data", {}).get("status") in FINAL


def event_time(events: Sequence[dict[str, Any]], status: str) -> float | None:
    """The timestamp (seconds since the epoch) of the first MIGRATION event of `status`."""
    for event in events:
        if event.get("event") == "MIGRATION" and event.get("data", {}).get("status") == status:
            stamp = event.get("timestamp", {})
            return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    return None


def configure(qmp: QMP, channels: int, direct_io: bool, **params: Any) -> None:
    caps = [{"capability": c, "state": True} for c in ("multifd", "mapped-ram", "events")]
    qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    qmp.execute(
        "migrate-set-parameters",
        {"multifd-channels": channels, "direct-io": direct_io, **params},
    )


# --- migd under test -------------------------------------------------------------------


def serve_argv(socket_path: str | Path, *extra: str) -> list[str]:
    """The command line of a migd daemon on `socket_path`, run by this Python."""
    return [sys.executable, "-m", "migd", "serve", "--socket", str(socket_path), *extra]


def start_migd(socket_path: str | Path, *extra: str) -> subprocess.Popen[bytes]:
    """A migd daemon on `socket_path`, its output on ours; connect_qmp waits until it listens."""
    return subprocess.Popen(serve_argv(socket_path, *extra))


async def connect_qmp(
    socket_path: str | Path, proc: subprocess.Popen[bytes], name: str, timeout: float = 15.0
) -> QMPClient:
    """A negotiated asyncio QMP client of `proc` once it listens on `socket_path`; the
    connect error if `proc` exits or `timeout` passes first."""
    from qemu.qmp import ConnectError, QMPClient

    client = QMPClient(name)
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.connect(str(socket_path))
            return client
        except (OSError, ConnectError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


class Migd:
    """A migd daemon subprocess with its QMP connection and at most one backend, 'ram0'."""

    def __init__(self, bench: Bench, name: str, env: dict[str, str] | None = None) -> None:
        sock, log_path = bench.run_dir / f"{name}.sock", bench.run_dir / f"{name}.log"
        self.cleanup = bench.cleanup
        self.proc = bench.cleanup.spawn(serve_argv(sock), log_path, env)
        self.qmp = QMP(sock, self.proc, log_path)
        self.attached = False

    def attach(self, mem: Path, size: int) -> None:
        """Map `mem` afresh as backend ram0, as a daemon does before a real save or restore.

        A mapping reused from the previous run would have its page tables filled already,
        hiding the cost of faulting the memory in that every first save or restore pays.
        """
        self.detach()
        self.qmp.execute(
            "object-add",
            {
                "qom-type": "memory-backend-file",
                "id": "ram0",
                "size": size,
                "mem-path": str(mem),
                "share": True,
            },
        )
        self.attached = True

    def detach(self) -> None:
        if self.attached:
            self.qmp.execute("object-del", {"id": "ram0"})
            self.attached = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.qmp.close()
        self.cleanup.stop(self.proc)
