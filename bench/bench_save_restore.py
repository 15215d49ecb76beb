"""Side-by-side benchmark of migd's save and restore against the disk and against QEMU.

Everything is measured in one run on one machine and reported as GiB/s of RAM and as
ratios, because absolute figures drift on shared machines (docs/performance.md):

* disk baseline: O_DIRECT sequential write, then read, of the same number of bytes in
  --dir, at the start and again at the end of the run (the median of both is used, the
  spread shows the drift). With fio installed: 1 MiB blocks, psync, numjobs 1 and 4, the
  best is the reference. Without fio: a built-in loop of 4 threads, each with its own
  O_DIRECT fd, doing os.pwritev / os.preadv of 4 MiB mmap-allocated (aligned) buffers.
* migd save of --size-gib of random data held in a /dev/shm memory-backend-file
  (multifd + mapped-ram + direct-io) for each --channels count; for the largest count
  also with zero-page detection off (the cost of detection) and without direct-io.
* migd restore of that file (direct-io) into a second /dev/shm backend pre-filled with
  other data, for each channel count, timed from migrate-incoming to completed; once
  more into an empty (never touched) memory file. Restored memory is compared with the
  source.
* QEMU (>= 9.1) saving the same memory file (-M none, memory-backend-file share=on,
  multifd + mapped-ram + direct-io, 4 channels, max-bandwidth 0) and restoring its own
  file (-incoming defer) into the pre-filled, then the empty, memory file.
* page cache left behind by each migd direct-io save: `fincore` on the save file (or the
  growth of Cached in /proc/meminfo), as a percentage of the bytes saved.
* zero pages: saving RAM that is 75% zero pages in randomly chosen 2 MiB clusters
  (written zeros, and once more as file holes) and RAM with 30% zero pages scattered at
  random, each run right after a random-RAM save of the same size and channel count, so
  that the time ratio is not skewed by disk drift.

A migration is timed from the `migrate` / `migrate-incoming` command to query-migrate
reporting `completed`, polled every 10 ms; the polls' round trips give migd's control
plane latency, and /proc/PID/status its private memory (RssAnon). migd maps the memory
file afresh (object-del, object-add) before every timed operation, as for a real save
or restore: a mapping kept from an earlier run would hide the cost of faulting the
memory in, which QEMU (a new process each time) pays too. As root the page cache is
dropped before every measurement; save files are deleted between runs. Each figure is
the median of --runs (min-max shown when there are several samples). All files and
processes the benchmark creates are removed at the end, also on error, SIGINT, SIGTERM
or SIGHUP.

    .venv/bin/python bench/bench_save_restore.py --size-gib 4 --channels 1,2,4 --runs 1
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import mmap
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

MiB, GiB = 1 << 20, 1 << 30
PAGE = 4096
CLUSTER = 2 * MiB  # zero clusters: the granule of free guest memory (a huge page)
FILL_CHUNK = 64 * MiB
PY_BLOCK = 4 * MiB
PY_THREADS = 4
FIO_JOBS = (1, 4)
POLL = 0.01
QEMU_CHANNELS = 4
QEMU_MIN = (9, 1)
FINAL = {"completed", "failed", "cancelled"}
REPO = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A step of the benchmark failed; the text says which one and why."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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

    def spawn(self, argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=REPO,
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
    """A minimal synchronous QMP client (one JSON object per line, events skipped)."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise BenchError(f"{proc.args[0]} exited with {proc.returncode}:\n{tail(log_path)}")
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

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\r\n")
        while True:
            reply = self._recv()
            if "event" in reply:
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


def rss_anon(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def timed_migration(
    qmp: QMP, command: str, arguments: dict[str, Any], pid: int | None = None
) -> Timed:
    """Issue migrate / migrate-incoming, poll query-migrate every 10 ms until final."""
    latencies: list[float] = []
    peak = 0
    start = time.perf_counter()
    qmp.execute(command, arguments)
    while True:
        sent = time.perf_counter()
        info = qmp.execute("query-migrate")
        now = time.perf_counter()
        latencies.append(now - sent)
        if pid is not None:
            peak = max(peak, rss_anon(pid))
        if info.get("status") in FINAL:
            break
        time.sleep(POLL)
    if info["status"] != "completed":
        raise BenchError(f"{command} ended {info['status']}: {info.get('error-desc')}")
    return Timed(now - start, info, latencies, peak)


def configure(qmp: QMP, channels: int, direct_io: bool, **params: Any) -> None:
    caps = [{"capability": c, "state": True} for c in ("multifd", "mapped-ram", "events")]
    qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    qmp.execute(
        "migrate-set-parameters",
        {"multifd-channels": channels, "direct-io": direct_io, **params},
    )


# --- memory contents -------------------------------------------------------------------


def zero_mask(kind: str, pages: int, rng: np.random.Generator) -> np.ndarray | None:
    """One bool per page, True for a zero page; None for random RAM."""
    if kind in ("zero75", "holes75"):
        per = CLUSTER // PAGE
        clusters = np.zeros(pages // per, dtype=bool)
        clusters[rng.choice(clusters.size, round(0.75 * clusters.size), replace=False)] = True
        return np.repeat(clusters, per)
    if kind == "zero30":
        mask = np.zeros(pages, dtype=bool)
        mask[rng.choice(pages, round(0.30 * pages), replace=False)] = True
        return mask
    return None


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def fill_memory(path: Path, size: int, kind: str, seed: int) -> None:
    """Give the memory file its contents: random pages, some of them zero (or holes)."""
    rng = np.random.default_rng(seed)
    mask = zero_mask(kind, size // PAGE, rng)
    holes = kind == "holes75"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if holes:
            os.ftruncate(fd, 0)  # drop every page: what is not written below stays a hole
        os.ftruncate(fd, size)
        for off in range(0, size, FILL_CHUNK):
            n = min(FILL_CHUNK, size - off)
            words = rng.integers(0, np.iinfo(np.uint64).max, n // 8, np.uint64, endpoint=True)
            pages = words.reshape(-1, PAGE // 8)
            zero = None if mask is None else mask[off // PAGE : (off + n) // PAGE]
            if zero is not None:
                pages[zero] = 0
            view = memoryview(words).cast("B")
            if not holes or zero is None:
                pwrite_all(fd, view, off)
                continue
            per = CLUSTER // PAGE
            for c in range(0, n // PAGE, per):
                if not zero[c]:
                    pwrite_all(fd, view[c * PAGE : (c + per) * PAGE], off + c * PAGE)
    finally:
        os.close(fd)


def fill_pattern(path: Path, size: int, value: int) -> None:
    """Overwrite every page with a constant non-zero byte: 'other data' before a restore."""
    chunk = memoryview(np.full(FILL_CHUNK, value, dtype=np.uint8)).cast("B")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        for off in range(0, size, FILL_CHUNK):
            pwrite_all(fd, chunk[: min(FILL_CHUNK, size - off)], off)
    finally:
        os.close(fd)


def same_contents(a: Path, b: Path, size: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in range(0, size, FILL_CHUNK):
            n = min(FILL_CHUNK, size - off)
            if os.pread(fa.fileno(), n, off) != os.pread(fb.fileno(), n, off):
                return False
    return True


# --- the page cache --------------------------------------------------------------------


def drop_caches(enabled: bool) -> None:
    os.sync()
    if enabled:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def meminfo_cached() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def file_cached(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout.split()[0])


# --- disk baseline ---------------------------------------------------------------------


def direct_pass(path: Path, size: int, buffers: Sequence[mmap.mmap], write: bool) -> float:
    """One thread per buffer, each with its own O_DIRECT fd, taking 4 MiB blocks in turn."""
    flags = (os.O_WRONLY if write else os.O_RDONLY) | os.O_DIRECT | os.O_CLOEXEC
    fds = [os.open(path, flags) for _ in buffers]
    blocks = itertools.count()
    errors: list[BaseException] = []
    io = os.pwritev if write else os.preadv

    def worker(fd: int, buf: mmap.mmap) -> None:
        view = memoryview(buf)
        try:
            while not errors:
                off = next(blocks) * PY_BLOCK
                if off >= size:
                    break
                n, done = min(PY_BLOCK, size - off), 0
                while done < n:
                    moved = io(fd, [view[done:n]], off + done)
                    if moved <= 0:
                        raise BenchError(f"{path}: no progress at offset {off + done}")
                    done += moved
            if write:
                os.fdatasync(fd)
        except BaseException as exc:
            errors.append(exc)
        finally:
            view.release()

    threads = [threading.Thread(target=worker, args=(fd, buf), daemon=True)
               for fd, buf in zip(fds, buffers, strict=True)]
    try:
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    finally:
        errors.append(BenchError("stopped"))  # ends any thread still running
        for t in threads:
            t.join()
        for fd in fds:
            os.close(fd)
    if len(errors) > 1:
        raise BenchError(f"O_DIRECT {'write' if write else 'read'} of {path}: {errors[0]}")
    return elapsed


def python_disk(directory: Path, size: int, drop: Callable[[], None]) -> tuple[float, float]:
    """(write, read) seconds of the built-in 4-thread O_DIRECT loop."""
    path = directory / "disk-baseline.bin"
    buffers = [mmap.mmap(-1, PY_BLOCK) for _ in range(PY_THREADS)]
    try:
        for i, buf in enumerate(buffers):
            buf.write(np.random.default_rng(100 + i).bytes(PY_BLOCK))
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
        drop()
        write = direct_pass(path, size, buffers, write=True)
        drop()
        read = direct_pass(path, size, buffers, write=False)
        return write, read
    finally:
        for buf in buffers:
            buf.close()
        path.unlink(missing_ok=True)


def run_fio(argv: Sequence[str], rw: str) -> float:
    out = subprocess.run(list(argv), capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"fio failed ({out.returncode}): {out.stderr.strip() or out.stdout}")
    doc = json.loads(out.stdout[out.stdout.index("{") :])
    return float(doc["jobs"][0][rw]["bw_bytes"])


def fio_disk(
    directory: Path, size: int, numjobs: int, drop: Callable[[], None]
) -> tuple[float, float]:
    """(write, read) seconds for `size` bytes from fio's bandwidth, numjobs files."""
    name = f"fio{numjobs}"
    argv = [
        "fio", f"--name={name}", f"--directory={directory}", "--bs=1M", "--direct=1",
        "--ioengine=psync", f"--numjobs={numjobs}", f"--size={size // numjobs}",
        "--group_reporting", "--output-format=json",
    ]
    try:
        drop()
        write = run_fio([*argv, "--rw=write", "--end_fsync=1"], "write")
        drop()
        read = run_fio([*argv, "--rw=read"], "read")
        return size / write, size / read
    finally:
        for path in directory.glob(f"{name}.*"):
            path.unlink()


# --- results ---------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    nbytes: int
    compare: str = ""  # "write" / "read": the disk figure it is held against
    qemu_key: str = ""  # the QEMU row it is held against
    times: list[float] = field(default_factory=list)
    cache_pct: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    written_pct: list[float] = field(default_factory=list)
    peak_anon: int = 0
    verified: bool | None = None

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def gibs(self) -> float:
        return self.nbytes / GiB / self.seconds

    def span(self) -> str:
        if len(self.times) < 2:
            return ""
        lo, hi = (self.nbytes / GiB / t for t in (max(self.times), min(self.times)))
        return f"{lo:.2f}-{hi:.2f}"

    def p99_ms(self) -> float | None:
        if not self.latencies:
            return None
        lat = sorted(self.latencies)
        return 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "label": self.label, "bytes": self.nbytes,
            "seconds": self.times, "median_seconds": self.seconds, "gib_per_s": self.gibs,
            "page_cache_pct": self.cache_pct or None, "written_pct": self.written_pct or None,
            "query_migrate_p99_ms": self.p99_ms(), "peak_rss_anon": self.peak_anon or None,
            "verified": self.verified,
        }


@dataclass
class Ratio:
    name: str
    value: float | None
    target: str
    ok: bool | None
    unit: str = "x"

    def shown(self) -> str:
        if self.value is None:
            return "n/a"
        if self.unit == "%":
            return f"{self.value:.{3 if abs(self.value) < 1 else 1}f} %"
        return f"{self.value:.2f}{self.unit}"


# --- the benchmark ---------------------------------------------------------------------


def qemu_version(binary: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


class Migd:
    """A migd daemon subprocess with its QMP connection and at most one backend, 'ram0'."""

    def __init__(self, bench: Bench, name: str) -> None:
        sock, log_path = bench.run_dir / f"{name}.sock", bench.run_dir / f"{name}.log"
        self.cleanup = bench.cleanup
        self.proc = bench.cleanup.spawn(
            [sys.executable, "-m", "migd", "serve", "--socket", str(sock)], log_path
        )
        self.qmp = QMP(sock, self.proc, log_path)
        self.attached = False

    def attach(self, mem: Path, size: int) -> None:
        """Map `mem` afresh as backend ram0, as a daemon does before a real save or restore.

        A mapping reused from the previous run would have its page tables filled already,
        hiding the cost of faulting the memory in that every first save or restore pays.
        """
        self.detach()
        self.qmp.execute("object-add", {
            "qom-type": "memory-backend-file", "id": "ram0", "size": size,
            "mem-path": str(mem), "share": True,
        })
        self.attached = True

    def detach(self) -> None:
        if self.attached:
            self.qmp.execute("object-del", {"id": "ram0"})
            self.attached = False

    def close(self) -> None:
        self.qmp.close()
        self.cleanup.stop(self.proc)


class Bench:
    def __init__(self, args: argparse.Namespace, cleanup: Cleanup) -> None:
        self.args = args
        self.cleanup = cleanup
        self.size = int(args.size_gib * GiB) // (4 * MiB) * (4 * MiB)
        if self.size < 64 * MiB:
            raise BenchError("--size-gib must be at least 1/16 (64 MiB)")
        self.channels: list[int] = args.channels
        self.ref = max(self.channels)  # channel count for the single-count rows
        self.runs: int = args.runs
        self.root = os.geteuid() == 0
        self.rows: dict[str, Row] = {}
        self.qemu = qemu_version(args.qemu)
        self.use_qemu = self.qemu is not None and self.qemu >= QEMU_MIN
        self.has_fio = shutil.which("fio") is not None
        self.has_fincore = shutil.which("fincore") is not None
        mode = args.baseline
        if mode == "fio" and not self.has_fio:
            raise BenchError("--baseline fio: fio is not installed")
        self.disk_tools = {
            "auto": ["fio"] if self.has_fio else ["python"],
            "fio": ["fio"], "python": ["python"],
            "both": (["fio"] if self.has_fio else []) + ["python"],
        }[mode]
        self.work = cleanup.mkdtemp(args.dir)  # save files and disk-baseline files
        self.shm = cleanup.mkdtemp("/dev/shm")  # memory files
        self.run_dir = cleanup.mkdtemp("/tmp")  # sockets (short paths) and logs
        self.src = self.shm / "src.ram"
        self.dst = self.shm / "dst.ram"
        self.zero_src = self.shm / "zero.ram"
        self.migd_runs = 0
        self.qemu_runs = 0
        self.fs_type = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE", "--target", str(self.work)],
            capture_output=True, text=True,
        ).stdout.strip() if shutil.which("findmnt") else "?"

    # -- helpers ---------------------------------------------------------------------------

    def drop(self) -> None:
        drop_caches(self.root)

    def row(self, key: str, label: str, **kw: Any) -> Row:
        row = self.rows.setdefault(key, Row(key, label, self.size, **kw))
        return row

    def check_space(self) -> None:
        shm_free = shutil.disk_usage(self.shm).free
        if shm_free < 2 * self.size + 256 * MiB:
            raise BenchError(f"/dev/shm has {shm_free / GiB:.1f} GiB free; need 2 x the size")
        disk_free = shutil.disk_usage(self.work).free
        if disk_free < 4 * self.size + GiB:
            raise BenchError(f"{self.args.dir} has {disk_free / GiB:.1f} GiB free; need 4 x")
        probe = self.work / "odirect-probe"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise BenchError(f"{self.args.dir} refuses O_DIRECT: {exc.strerror}") from None
        finally:
            probe.unlink(missing_ok=True)

    @contextlib.contextmanager
    def qemu_session(self, mem: Path, incoming: bool) -> Iterator[QMP]:
        self.qemu_runs += 1
        sock = self.run_dir / f"qemu{self.qemu_runs}.sock"
        log_path = self.run_dir / f"qemu{self.qemu_runs}.log"
        argv = [
            self.args.qemu, "-M", "none", "-nodefaults", "-display", "none", "-S",
            "-object", f"memory-backend-file,id=ram0,size={self.size},mem-path={mem},share=on",
            "-machine", "memory-backend=ram0",
            "-qmp", f"unix:{sock},server=on,wait=off",
        ]
        if incoming:
            argv += ["-incoming", "defer"]
        proc = self.cleanup.spawn(argv, log_path)
        qmp = QMP(sock, proc, log_path)
        try:
            yield qmp
        finally:
            with contextlib.suppress(Exception):
                qmp.execute("quit")
            qmp.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            self.cleanup.stop(proc)

    # -- phases ----------------------------------------------------------------------------

    def disk(self, when: str) -> None:
        for run in range(self.runs):
            if "fio" in self.disk_tools:
                for jobs in FIO_JOBS:
                    log(f"disk baseline ({when}): fio numjobs={jobs}, run {run + 1}")
                    w, r = fio_disk(self.work, self.size, jobs, self.drop)
                    what = f"fio {jobs} job{'s' if jobs > 1 else ''}"
                    self.row(f"disk-write-fio{jobs}", f"disk write, {what}").times.append(w)
                    self.row(f"disk-read-fio{jobs}", f"disk read, {what}").times.append(r)
            if "python" in self.disk_tools:
                log(f"disk baseline ({when}): Python {PY_THREADS} threads, run {run + 1}")
                w, r = python_disk(self.work, self.size, self.drop)
                label = f"Python {PY_THREADS} threads x 4 MiB"
                self.row("disk-write-py", f"disk write, {label}").times.append(w)
                self.row("disk-read-py", f"disk read, {label}").times.append(r)

    def measured(self) -> dict[str, Row]:
        """The rows with at least one run (an interrupted run leaves empty ones)."""
        return {k: r for k, r in self.rows.items() if r.times}

    def best_disk(self, rw: str) -> Row | None:
        rows = [r for k, r in self.measured().items() if k.startswith(f"disk-{rw}-")]
        fio = [r for r in rows if "fio" in r.key]
        pool = fio or rows  # fio is the reference when it ran
        return max(pool, key=lambda r: r.gibs) if pool else None

    def migd_save(
        self, migd: Migd, row: Row, mem: Path, channels: int, direct_io: bool = True,
        detect: bool = True, keep: Path | None = None, run: int = 0,
    ) -> None:
        """One timed save of `mem` through a freshly mapped backend, into a new file."""
        self.migd_runs += 1
        path = self.work / f"migd-save-{self.migd_runs}.img"
        log(f"{row.label}, run {run + 1}")
        migd.attach(mem, self.size)
        configure(migd.qmp, channels, direct_io, **{
            "max-bandwidth": 0, "zero-page-detection": "multifd" if detect else "none",
        })
        self.drop()
        cached_before = meminfo_cached()
        timed = timed_migration(migd.qmp, "migrate", {"uri": f"file:{path}"}, migd.proc.pid)
        if direct_io:
            cached = file_cached(path) if self.has_fincore else max(
                0, meminfo_cached() - cached_before)
            row.cache_pct.append(100 * cached / self.size)
        pages = self.size // PAGE
        row.written_pct.append(100 * timed.info.get("ram", {}).get("normal", pages) / pages)
        row.times.append(timed.seconds)
        row.latencies += timed.latencies
        row.peak_anon = max(row.peak_anon, timed.peak_anon)
        if keep is not None:
            path.rename(keep)
        else:
            path.unlink()

    def migd_saves(self, migd: Migd, restore_src: Path) -> None:
        for ch in self.channels:
            row = self.row(f"save-{ch}", f"migd save, {ch} ch, direct-io",
                           compare="write", qemu_key="qemu-save")
            for run in range(self.runs):
                last = ch == self.ref and run == self.runs - 1
                self.migd_save(migd, row, self.src, ch, keep=restore_src if last else None,
                               run=run)
        row = self.row(f"save-{self.ref}-nodetect",
                       f"migd save, {self.ref} ch, direct-io, zero detection off",
                       compare="write", qemu_key="qemu-save")
        for run in range(self.runs):
            self.migd_save(migd, row, self.src, self.ref, detect=False, run=run)
        row = self.row(f"save-{self.ref}-buffered", f"migd save, {self.ref} ch, no direct-io",
                       compare="write", qemu_key="qemu-save")
        for run in range(self.runs):
            self.migd_save(migd, row, self.src, self.ref, direct_io=False, run=run)

    def qemu_save(self, keep: Path) -> None:
        row = self.row("qemu-save", f"QEMU {self.qemu_str()} save, {QEMU_CHANNELS} ch, direct-io",
                       compare="write")
        for run in range(self.runs):
            path = self.work / f"qemu-save-{run}.img"
            log(f"{row.label}, run {run + 1}")
            with self.qemu_session(self.src, incoming=False) as qmp:
                configure(qmp, QEMU_CHANNELS, True, **{"max-bandwidth": 0})
                self.drop()
                row.times.append(timed_migration(qmp, "migrate", {"uri": f"file:{path}"}).seconds)
            if run == self.runs - 1:
                path.rename(keep)
            else:
                path.unlink()

    def prepare_dst(self, empty: bool, value: int) -> None:
        """Pre-fill the destination with other data, or leave it an empty (sparse) file."""
        if empty:
            with open(self.dst, "r+b") as f:
                os.ftruncate(f.fileno(), 0)  # frees every page, mapped or not
                os.ftruncate(f.fileno(), self.size)
        else:
            fill_pattern(self.dst, self.size, value)

    def migd_restore(self, migd: Migd, row: Row, source: Path, channels: int, empty: bool) -> None:
        for run in range(self.runs):
            log(f"{row.label}, run {run + 1}")
            self.prepare_dst(empty, 0x11 * (1 + (run + channels) % 15))
            migd.attach(self.dst, self.size)
            configure(migd.qmp, channels, True)
            self.drop()
            timed = timed_migration(migd.qmp, "migrate-incoming", {"uri": f"file:{source}"},
                                    migd.proc.pid)
            row.times.append(timed.seconds)
            row.peak_anon = max(row.peak_anon, timed.peak_anon)
        row.verified = same_contents(self.src, self.dst, self.size)
        if not row.verified:
            raise BenchError(f"{row.label}: restored memory differs from the source")

    def migd_restores(self, migd: Migd, source: Path) -> None:
        for ch in self.channels:
            row = self.row(f"restore-{ch}", f"migd restore, {ch} ch, direct-io",
                           compare="read", qemu_key="qemu-restore")
            self.migd_restore(migd, row, source, ch, empty=False)
        row = self.row(f"restore-{self.ref}-empty",
                       f"migd restore, {self.ref} ch, direct-io, into an empty memory file",
                       compare="read", qemu_key="qemu-restore-empty")
        self.migd_restore(migd, row, source, self.ref, empty=True)

    def qemu_restore(self, qemu_file: Path, empty: bool) -> None:
        key, what = ("qemu-restore-empty", ", into an empty memory file") if empty else (
            "qemu-restore", "")
        row = self.row(key, f"QEMU {self.qemu_str()} restore, {QEMU_CHANNELS} ch, direct-io"
                       + what, compare="read")
        for run in range(self.runs):
            log(f"{row.label}, run {run + 1}")
            self.prepare_dst(empty, 0x22 + run)
            with self.qemu_session(self.dst, incoming=True) as qmp:
                configure(qmp, QEMU_CHANNELS, True)
                self.drop()
                timed = timed_migration(qmp, "migrate-incoming", {"uri": f"file:{qemu_file}"})
                row.times.append(timed.seconds)
        row.verified = same_contents(self.src, self.dst, self.size)

    def zero_saves(self, migd: Migd) -> None:
        """Each zero-page save next to a random-RAM save: the ratio shrugs off disk drift."""
        cases = [
            ("zero75", "75% zero pages in 2 MiB clusters"),
            ("zero30", "30% zero pages scattered"),
            ("holes75", "75% zero pages as 2 MiB file holes"),
        ]
        ref = self.row(f"save-{self.ref}-random", f"migd save, {self.ref} ch, direct-io, "
                       "random RAM (next to each zero-page save)", compare="write")
        for kind, what in cases:
            log(f"filling the memory file: {what}")
            fill_memory(self.zero_src, self.size, kind, seed=7)
            row = self.row(f"save-{kind}", f"migd save, {self.ref} ch, direct-io, {what}",
                           compare="write")
            for run in range(self.runs):
                self.migd_save(migd, ref, self.src, self.ref, run=run)
                self.migd_save(migd, row, self.zero_src, self.ref, run=run)
        self.zero_src.unlink()

    def qemu_str(self) -> str:
        return ".".join(map(str, self.qemu)) if self.qemu else "?"

    def run(self) -> None:
        self.check_space()
        log(f"filling {self.size / GiB:g} GiB of random memory in {self.src}")
        fill_memory(self.src, self.size, "random", seed=1)
        fill_pattern(self.dst, self.size, 0x5A)
        self.disk("start")
        saver = Migd(self, "migd-save")
        loader = Migd(self, "migd-restore")
        try:
            restore_src = self.work / "migd-restore-source.img"
            qemu_file = self.work / "qemu-save.img"
            self.migd_saves(saver, restore_src)
            if self.use_qemu:
                self.qemu_save(qemu_file)
            self.migd_restores(loader, restore_src)
            restore_src.unlink()
            if self.use_qemu:
                self.qemu_restore(qemu_file, empty=False)
                self.qemu_restore(qemu_file, empty=True)
                qemu_file.unlink()
            loader.detach()
            self.dst.unlink()  # makes room in /dev/shm for the zero-page memory file
            self.zero_saves(saver)
        finally:
            saver.close()
            loader.close()
        self.disk("end")

    # -- report ----------------------------------------------------------------------------

    def ratios(self) -> list[Ratio]:
        rows = self.measured()
        best_write, best_read = self.best_disk("write"), self.best_disk("read")
        saves = [rows[f"save-{c}"] for c in self.channels if f"save-{c}" in rows]
        restores = [rows[f"restore-{c}"] for c in self.channels if f"restore-{c}" in rows]
        save = max(saves, key=lambda r: r.gibs) if saves else None
        restore = max(restores, key=lambda r: r.gibs) if restores else None
        ref = rows.get(f"save-{self.ref}")
        zero_ref = rows.get(f"save-{self.ref}-random")

        def speed(a: Row | None, b: Row | None) -> float | None:
            return a.gibs / b.gibs if a and b else None

        def time_ratio(key: str) -> float | None:
            row = rows.get(key)
            return row.seconds / zero_ref.seconds if row and zero_ref else None

        def check(value: float | None, good: Callable[[float], bool]) -> bool | None:
            return None if value is None else good(value)

        out: list[Ratio] = []

        def add(name: str, value: float | None, target: str, good: Callable[[float], bool],
                unit: str = "x") -> None:
            out.append(Ratio(name, value, target, check(value, good), unit))

        tag = f" ({save.label.split(', ')[1]})" if save else ""
        rtag = f" ({restore.label.split(', ')[1]})" if restore else ""
        add(f"save / disk write, best migd save{tag}", speed(save, best_write), ">= 0.90",
            lambda v: v >= 0.9)
        add(f"save / QEMU save{tag}", speed(save, rows.get("qemu-save")), "> 1",
            lambda v: v > 1)
        add(f"restore / disk read, best migd restore{rtag}", speed(restore, best_read),
            ">= 0.85", lambda v: v >= 0.85)
        add(f"restore / QEMU restore{rtag}", speed(restore, rows.get("qemu-restore")), ">= 2",
            lambda v: v >= 2)
        add(f"restore / QEMU restore, both into an empty memory file ({self.ref} ch)",
            speed(rows.get(f"restore-{self.ref}-empty"), rows.get("qemu-restore-empty")),
            ">= 2", lambda v: v >= 2)
        for key, what, target in (
            ("save-zero75", "zero75", 0.4),
            ("save-holes75", "zero75 as holes", 0.4),
            ("save-zero30", "zero30", 1.0),
        ):
            add(f"{what} / random save time ({self.ref} ch, adjacent runs)", time_ratio(key),
                f"<= {target:.2f}", lambda v, t=target: v <= t)
        nodetect = rows.get(f"save-{self.ref}-nodetect")
        cost = 100 * (ref.seconds / nodetect.seconds - 1) if ref and nodetect else None
        add("zero detection cost on random RAM", cost, "< 10 %", lambda v: v < 10, "%")
        cache = [p for r in rows.values() for p in r.cache_pct]
        add("page cache left by a direct-io save (worst)", max(cache) if cache else None,
            "< 1 %", lambda v: v < 1, "%")
        lat = [x for r in rows.values() if r.key.startswith("save") for x in r.latencies]
        p99 = Row("", "", 0, latencies=lat).p99_ms() if lat else None
        add("query-migrate p99 during migd saves", p99, "< 20 ms", lambda v: v < 20, " ms")
        peak = max((r.peak_anon for r in rows.values()), default=0)
        bitmaps = self.size // PAGE // 8
        add("migd private memory (RssAnon) peak", peak / MiB if peak else None,
            f"< {100 + bitmaps / MiB:.1f} MiB", lambda v: v < 100 + bitmaps / MiB, " MiB")
        return out

    def header(self) -> list[str]:
        fs = self.fs_type
        tools = " + ".join(self.disk_tools)
        return [
            f"# migd save/restore benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}",
            "",
            f"{self.size / GiB:g} GiB per operation, runs={self.runs}, save files in "
            f"{self.args.dir} ({fs}), memory in /dev/shm; kernel {platform.release()}, "
            f"{os.cpu_count()} CPUs; QEMU {self.qemu_str() if self.qemu else 'not found'}; "
            f"disk baseline: {tools}; page cache dropped between runs: "
            f"{'yes' if self.root else 'no (not root)'}; page cache measured with "
            f"{'fincore' if self.has_fincore else '/proc/meminfo Cached'}.",
        ]

    def markdown(self) -> str:
        w, r = self.best_disk("write"), self.best_disk("read")
        lines = [
            *self.header(),
            "",
            "| what | GiB/s | min-max | s | vs disk | vs QEMU | pages written | page cache "
            "| qm p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        rows = self.measured()
        for row in rows.values():
            disk = {"write": w, "read": r}.get(row.compare)
            qemu = rows.get(row.qemu_key)
            vs_disk = f"{row.gibs / disk.gibs:.2f}" if disk else ""
            vs_qemu = f"{row.gibs / qemu.gibs:.2f}" if qemu else ""
            written = f"{statistics.median(row.written_pct):.0f} %" if row.written_pct else ""
            cache = f"{max(row.cache_pct):.3f} %" if row.cache_pct else ""
            p99 = row.p99_ms()
            label = row.label + {True: " (verified)", False: " (**MISMATCH**)", None: ""}[
                row.verified
            ]
            lines.append(
                f"| {label} | {row.gibs:.2f} | {row.span()} | {row.seconds:.2f} | {vs_disk} "
                f"| {vs_qemu} | {written} | {cache} | {'' if p99 is None else f'{p99:.1f}'} |"
            )
        lines += [
            "",
            f"vs disk: against the best disk {'fio ' if self.has_fio else ''}figure "
            f"({w.label if w else '-'}; {r.label if r else '-'}). Zero-page rows: GiB/s of RAM.",
            "",
            "| ratio | value | target (performance.md) | met |",
            "|---|---:|---:|:---:|",
        ]
        for ratio in self.ratios():
            met = {True: "yes", False: "**no**", None: ""}[ratio.ok]
            lines.append(f"| {ratio.name} | {ratio.shown()} | {ratio.target} | {met} |")
        return "\n".join(lines)

    def as_json(self) -> str:
        return json.dumps({
            "size_bytes": self.size, "runs": self.runs, "dir": self.args.dir,
            "channels": self.channels, "qemu": self.qemu_str() if self.qemu else None,
            "disk_tools": self.disk_tools, "dropped_caches": self.root,
            "rows": [r.as_dict() for r in self.measured().values()],
            "ratios": [{"name": x.name, "value": x.value, "target": x.target, "met": x.ok}
                       for x in self.ratios()],
        }, indent=2)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=4.0, help="bytes per operation (GiB)")
    p.add_argument("--dir", default="/tmp", help="directory of the save files (the disk)")
    p.add_argument("--channels", default="1,2,4", help="multifd channel counts, e.g. 1,2,4")
    p.add_argument("--runs", type=int, default=1, help="runs per measurement (median)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--baseline", choices=("auto", "fio", "python", "both"), default="auto",
                   help="disk baseline: fio if installed (auto), or the Python loop, or both")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    args = p.parse_args(argv)
    try:
        args.channels = sorted({int(c) for c in args.channels.split(",") if c.strip()})
    except ValueError:
        p.error("--channels takes numbers separated by commas")
    if not args.channels or min(args.channels) < 1 or args.runs < 1:
        p.error("--channels and --runs must be positive")
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    cleanup = Cleanup()
    bench: Bench | None = None
    try:
        bench = Bench(args, cleanup)
        bench.run()
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        cleanup.close()
        if bench is not None and bench.measured():
            print(bench.as_json() if args.json else bench.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
