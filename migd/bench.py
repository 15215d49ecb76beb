"""`migd bench`: how fast is migd on this machine, and why, measured in one run.

Everything is measured in one run on one machine and reported as GiB/s of RAM and as
ratios, because absolute figures drift on shared machines (docs/performance.md). The run
is made of rounds (--runs, default 3); each round measures every figure once, in an order
shuffled afresh each round, so that drift during the run and the after-effects of one
measurement on the next hit every figure alike; each figure is the median of its rounds,
with min-max.

In every round:

* disk: O_DIRECT sequential write, then read, of the same number of bytes in --dir. With
  fio installed: psync with 1 MiB blocks, 1 and 4 jobs, and libaio with 8 x 4 MiB in
  flight (the best is the 100% line).
  Without fio: a built-in loop of 4 threads, each with its own O_DIRECT fd, doing
  os.pwritev / os.preadv of 4 MiB mmap-allocated (aligned) buffers.
* migd save of --size-gib of random data held in a /dev/shm memory-backend-file
  (multifd + mapped-ram) for each --channels count, with direct-io and without it (for
  --buffered-channels).
* QEMU (>= 9.1, unless --no-qemu) saving the same memory file (-M none,
  memory-backend-file share=on, multifd + mapped-ram, max-bandwidth 0) with direct-io for
  each --qemu-channels count and once without direct-io.
* migd restore of migd's file into a second /dev/shm memory file pre-filled with other
  data, for each channel count, with and without direct-io, and once into an empty
  (never touched) memory file; QEMU likewise from its own file. Restored memory is
  compared with the source.
* the page cache each save or restore leaves behind: `fincore` on the save file (or the
  growth of Cached in /proc/meminfo), as a percentage of the bytes moved.

Then, in pairs with a direct-io save of random RAM at the same channel count (in turn
before and after it), so that their time ratios shrug off disk drift: a save with
zero-page detection off (the cost of detection), and saves of RAM that is 75% zero pages
in randomly chosen 2 MiB clusters (written zeros, and once more as file holes) and of RAM
with 30% zero pages scattered at random.

A migration is timed from the `migrate` / `migrate-incoming` command to query-migrate
reporting `completed`, polled every 10 ms; the polls' round trips give the control plane
latency, /proc/PID/stat the CPU time of migd or QEMU, and /proc/PID/status migd's private
memory (RssAnon). migd maps the memory file afresh (object-del, object-add) before every
timed operation, as for a real save or restore; QEMU is a new process each time. As root
the page cache is dropped before every measurement (after syncfs of --dir only: a global
sync would wait on every other filesystem too). All files and processes the benchmark
creates are removed at the end, also on error, SIGINT, SIGTERM or SIGHUP.

With --out DIR: DIR/bench.md (the tables, the command, the date, the machine),
DIR/bench.json, and DIR/bench.png (throughput against channels; needs matplotlib, the
`bench` extra). The Markdown (or with --json the JSON) also goes to stdout.

    migd bench --size-gib 4 --runs 3 --out docs/bench
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import mmap
import os
import platform
import random
import re
import shlex
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
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:  # numpy is imported where it is used: `migd --help` need not load it
    import numpy as np

MiB, GiB = 1 << 20, 1 << 30
PAGE = 4096
CLUSTER = 2 * MiB  # zero clusters: the granule of free guest memory (a huge page)
FILL_CHUNK = 64 * MiB
PY_BLOCK = 4 * MiB
PY_THREADS = 4
# fio's O_DIRECT sequential passes: (key, label, options); the best is the disk's 100% line.
# The first two are docs/performance.md's reference; the third keeps several large I/Os in
# flight from one job, as migd's channels do.
FIO_CONFIGS = (
    ("fio1", "fio psync, 1 job, 1 MiB", ("--ioengine=psync", "--numjobs=1", "--bs=1M")),
    ("fio4", "fio psync, 4 jobs, 1 MiB", ("--ioengine=psync", "--numjobs=4", "--bs=1M")),
    (
        "fioaio",
        "fio libaio, 1 job, iodepth 8, 4 MiB",
        ("--ioengine=libaio", "--numjobs=1", "--iodepth=8", "--bs=4M"),
    ),
)
POLL = 0.01
QEMU_MIN = (9, 1)
FINAL = {"completed", "failed", "cancelled"}
PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # where `python -m migd` finds migd


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
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=PACKAGE_PARENT,
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
    cpu: float  # CPU seconds (user + system) the server spent on it


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # fields[0] is field 3, the state
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_anon(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def timed_migration(
    qmp: QMP, command: str, arguments: dict[str, Any], pid: int, rss: bool = True
) -> Timed:
    """Issue migrate / migrate-incoming, poll query-migrate every 10 ms until final."""
    latencies: list[float] = []
    peak = 0
    cpu = cpu_seconds(pid)
    start = time.perf_counter()
    qmp.execute(command, arguments)
    while True:
        sent = time.perf_counter()
        info = qmp.execute("query-migrate")
        now = time.perf_counter()
        latencies.append(now - sent)
        if rss:
            peak = max(peak, rss_anon(pid))
        if info.get("status") in FINAL:
            break
        time.sleep(POLL)
    if info["status"] != "completed":
        raise BenchError(f"{command} ended {info['status']}: {info.get('error-desc')}")
    return Timed(now - start, info, latencies, peak, cpu_seconds(pid) - cpu)


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
    import numpy as np

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
    import numpy as np

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
    chunk = memoryview(bytes([value]) * FILL_CHUNK)
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


def syncfs(directory: Path) -> None:
    """Write back the dirty pages of one filesystem: sync(2) would also wait for every other
    filesystem on the machine, some of which (another test's loop device) may never finish."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(directory))
    except AttributeError:  # no syncfs in this libc
        os.sync()
    finally:
        os.close(fd)


def drop_caches(directory: Path, enabled: bool) -> None:
    syncfs(directory)
    if enabled:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    return 0


def file_cached(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
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

    threads = [
        threading.Thread(target=worker, args=(fd, buf), daemon=True)
        for fd, buf in zip(fds, buffers, strict=True)
    ]
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
        for buf in buffers:
            buf.write(os.urandom(PY_BLOCK))
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
    directory: Path, size: int, name: str, options: Sequence[str], drop: Callable[[], None]
) -> tuple[float, float]:
    """(write, read) seconds for `size` bytes from fio's bandwidth (one file per job)."""
    numjobs = int(next(o for o in options if o.startswith("--numjobs=")).split("=")[1])
    argv = [
        "fio",
        f"--name={name}",
        f"--directory={directory}",
        "--direct=1",
        *options,
        f"--size={size // numjobs}",
        "--group_reporting",
        "--output-format=json",
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
    """One figure: its samples (one per round) and what it is, for tables and the plot."""

    key: str
    label: str
    nbytes: int
    op: str  # "save", "restore", "write" or "read" (the disk)
    tool: str  # "migd", "qemu", "fio" or "python"
    channels: int | None = None
    direct_io: bool = True
    memory: str = "random"  # random, adjacent (random, paired), zero75, zero30, holes75
    empty_dst: bool = False  # a restore into a never-touched memory file
    detect: bool = True  # zero-page detection (saves)
    times: list[float] = field(default_factory=list)
    cache_pct: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    written_pct: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_anon: int = 0
    verified: bool | None = None

    def add(self, timed: Timed) -> None:
        self.times.append(timed.seconds)
        self.cpu.append(timed.cpu)
        self.latencies += timed.latencies
        self.peak_anon = max(self.peak_anon, timed.peak_anon)

    @property
    def cpu_pct(self) -> float | None:
        """The server's CPU time per second of the operation, % of one core (median)."""
        return 100 * statistics.median(self.cpu) / self.seconds if self.cpu else None

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def gibs(self) -> float:
        return self.nbytes / GiB / self.seconds

    @property
    def gibs_range(self) -> tuple[float, float]:
        return self.nbytes / GiB / max(self.times), self.nbytes / GiB / min(self.times)

    def span(self) -> str:
        if len(self.times) < 2:
            return ""
        lo, hi = self.gibs_range
        return f"{lo:.2f}-{hi:.2f}"

    def p99_ms(self) -> float | None:
        return percentile_ms(self.latencies, 0.99)

    def max_ms(self) -> float | None:
        return 1000 * max(self.latencies) if self.latencies else None

    def as_dict(self) -> dict[str, Any]:
        lo, hi = self.gibs_range
        return {
            "key": self.key,
            "label": self.label,
            "op": self.op,
            "tool": self.tool,
            "channels": self.channels,
            "direct_io": self.direct_io,
            "memory": self.memory,
            "empty_dst": self.empty_dst,
            "zero_detection": self.detect,
            "bytes": self.nbytes,
            "seconds": self.times,
            "median_seconds": self.seconds,
            "gib_per_s": self.gibs,
            "gib_per_s_min": lo,
            "gib_per_s_max": hi,
            "page_cache_pct": self.cache_pct or None,
            "written_pct": self.written_pct or None,
            "query_migrate_p99_ms": self.p99_ms(),
            "query_migrate_max_ms": self.max_ms(),
            "query_migrate_answers": len(self.latencies) or None,
            "cpu_seconds": self.cpu or None,
            "cpu_pct_of_core": self.cpu_pct,
            "peak_rss_anon": self.peak_anon or None,
            "verified": self.verified,
        }


def human(nbytes: int) -> str:
    return f"{nbytes / GiB:g} GiB" if nbytes >= GiB else f"{nbytes / MiB:g} MiB"


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return 1000 * s[min(len(s) - 1, int(q * len(s)))]


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


# --- the machine -----------------------------------------------------------------------


def qemu_version(binary: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


def command_output(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def block_device(source: str) -> dict[str, str]:
    """The driver (virtio_blk, nvme...), scheduler and rotational flag of /dev/NAME."""
    name = Path(source).name
    sys_dev = Path("/sys/class/block") / name
    if not sys_dev.exists():
        return {}
    if (sys_dev / "partition").exists():  # a partition: the queue belongs to the disk
        sys_dev = sys_dev.resolve().parent
    facts: dict[str, str] = {}
    with contextlib.suppress(OSError):
        facts["driver"] = (sys_dev / "device" / "driver").resolve().name
    with contextlib.suppress(OSError):
        sched = (sys_dev / "queue" / "scheduler").read_text()
        m = re.search(r"\[(\S+)\]", sched)
        facts["scheduler"] = m.group(1) if m else sched.strip()
    with contextlib.suppress(OSError):
        rot = (sys_dev / "queue" / "rotational").read_text().strip()
        facts["rotational"] = {"0": "no", "1": "yes"}.get(rot, rot)
    return facts


def machine_facts(directory: Path, qemu: str | None) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mount = command_output(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", str(directory)])
    source, _, fstype = mount.partition(" ")
    fio = command_output(["fio", "--version"]) if shutil.which("fio") else ""
    return {
        "cpu": cpu or platform.processor() or "?",
        "cpus": os.cpu_count(),
        "memory_gib": round(meminfo("MemTotal") / GiB, 1),
        "kernel": platform.release(),
        "virtualization": command_output(["systemd-detect-virt"]) or None,
        "python": platform.python_version(),
        "migd": __version__,
        "qemu": qemu,
        "fio": fio or None,
        "dir": str(directory),
        "dir_device": source.strip() or None,
        "dir_fs": fstype.strip() or None,
        "dir_disk": block_device(source.strip()) if source.startswith("/dev/") else {},
        "loadavg_start": os.getloadavg()[0],
    }


# --- migd under test -------------------------------------------------------------------


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


# --- the benchmark ---------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, cleanup: Cleanup) -> None:
        self.args = args
        self.cleanup = cleanup
        self.started = time.time()
        self.finished: float | None = None
        self.complete = False
        self.size = int(args.size_gib * GiB) // (4 * MiB) * (4 * MiB)
        if self.size < 64 * MiB:
            raise BenchError("--size-gib must be at least 1/16 (64 MiB)")
        self.channels: list[int] = args.channels
        # the channel count of the single-count rows: 4 (performance.md's best) when asked
        self.ref = 4 if 4 in self.channels else max(self.channels)
        self.buffered: list[int] = args.buffered_channels
        self.runs: int = args.runs
        self.root = os.geteuid() == 0
        # Dropping the page cache also drops the filesystem's metadata, which every save then
        # reads back while it allocates: a fixed cost that weighs most on short saves.
        self.drop_enabled = self.root and not args.keep_caches
        self.rows: dict[str, Row] = {}
        self.qemu = None if args.no_qemu else qemu_version(args.qemu)
        self.use_qemu = self.qemu is not None and self.qemu >= QEMU_MIN
        self.qemu_channels: list[int] = args.qemu_channels if self.use_qemu else []
        self.has_fio = shutil.which("fio") is not None
        self.has_fincore = shutil.which("fincore") is not None
        mode = args.baseline
        if mode == "fio" and not self.has_fio:
            raise BenchError("--baseline fio: fio is not installed")
        self.disk_tools = {
            "auto": ["fio"] if self.has_fio else ["python"],
            "fio": ["fio"],
            "python": ["python"],
            "both": (["fio"] if self.has_fio else []) + ["python"],
        }[mode]
        self.machine = machine_facts(Path(args.dir), self.qemu_str() if self.qemu else None)
        self.work = cleanup.mkdtemp(args.dir)  # save files and disk-baseline files
        self.shm = cleanup.mkdtemp("/dev/shm")  # memory files
        self.run_dir = cleanup.mkdtemp("/tmp")  # sockets (short paths) and logs
        self.src = self.shm / "src.ram"
        self.dst = self.shm / "dst.ram"
        self.zero_src = self.shm / "zero.ram"
        self.restore_src = self.work / "migd-restore-source.img"
        self.qemu_file = self.work / "qemu-restore-source.img"
        self.op_count = 0

    # -- helpers ---------------------------------------------------------------------------

    def drop(self) -> None:
        drop_caches(self.work, self.drop_enabled)

    def drop_note(self) -> str:
        if self.drop_enabled:
            return "yes"
        return "no (--keep-caches)" if self.root else "no (not root)"

    def row(self, key: str, label: str, **kw: Any) -> Row:
        return self.rows.setdefault(key, Row(key, label, self.size, **kw))

    def migration_row(
        self,
        tool: str,
        op: str,
        channels: int,
        direct_io: bool = True,
        empty: bool = False,
        detect: bool = True,
        memory: str = "random",
    ) -> Row:
        key = (
            f"{tool}-{op}-{channels}"
            + ("" if direct_io else "-buffered")
            + ("-empty" if empty else "")
            + ("" if detect else "-nodetect")
            + ("" if memory == "random" else f"-{memory}")
        )
        name = "migd" if tool == "migd" else f"QEMU {self.qemu_str()}"
        what = [f"{name} {op}", f"{channels} ch", "direct-io" if direct_io else "buffered"]
        if empty:
            what.append("into an empty memory file")
        if not detect:
            what.append("zero detection off")
        what += {
            "random": [],
            "zero75": ["75% zero pages in 2 MiB clusters"],
            "zero30": ["30% zero pages scattered"],
            "holes75": ["75% zero pages as 2 MiB file holes"],
            "adjacent": ["random RAM, paired with each save below"],
        }[memory]
        return self.row(
            key,
            ", ".join(what),
            op=op,
            tool=tool,
            channels=channels,
            direct_io=direct_io,
            empty_dst=empty,
            detect=detect,
            memory=memory,
        )

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

    def cache_left(self, path: Path, cached_before: int) -> float | None:
        """The page cache `path` holds after an operation, % of the bytes moved."""
        if self.has_fincore:
            return 100 * file_cached(path) / self.size
        if path.is_relative_to(self.shm):
            return None  # shmem is 'Cached' itself: /proc/meminfo cannot tell
        return 100 * max(0, meminfo("Cached") - cached_before) / self.size

    @contextlib.contextmanager
    def qemu_session(
        self, mem: Path, incoming: bool
    ) -> Iterator[tuple[QMP, subprocess.Popen[bytes]]]:
        self.op_count += 1
        sock = self.run_dir / f"qemu{self.op_count}.sock"
        log_path = self.run_dir / f"qemu{self.op_count}.log"
        argv = [
            self.args.qemu,
            "-M",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-object",
            f"memory-backend-file,id=ram0,size={self.size},mem-path={mem},share=on",
            "-machine",
            "memory-backend=ram0",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ]
        if incoming:
            argv += ["-incoming", "defer"]
        proc = self.cleanup.spawn(argv, log_path)
        qmp = QMP(sock, proc, log_path)
        try:
            yield qmp, proc
        finally:
            with contextlib.suppress(Exception):
                qmp.execute("quit")
            qmp.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            self.cleanup.stop(proc)

    def qemu_str(self) -> str:
        return ".".join(map(str, self.qemu)) if self.qemu else "?"

    # -- measurements ----------------------------------------------------------------------

    def disk(self, run: int) -> None:
        if "fio" in self.disk_tools:
            for name, what, options in FIO_CONFIGS:
                log(f"round {run + 1}: disk, {what}")
                w, r = fio_disk(self.work, self.size, name, options, self.drop)
                self.row(
                    f"disk-write-{name}", f"disk O_DIRECT write, {what}", op="write", tool="fio"
                ).times.append(w)
                self.row(
                    f"disk-read-{name}", f"disk O_DIRECT read, {what}", op="read", tool="fio"
                ).times.append(r)
        if "python" in self.disk_tools:
            log(f"round {run + 1}: disk, Python {PY_THREADS} threads")
            w, r = python_disk(self.work, self.size, self.drop)
            label = f"Python {PY_THREADS} threads x 4 MiB"
            self.row(
                "disk-write-py", f"disk O_DIRECT write, {label}", op="write", tool="python"
            ).times.append(w)
            self.row(
                "disk-read-py", f"disk O_DIRECT read, {label}", op="read", tool="python"
            ).times.append(r)

    def migd_save(
        self, migd: Migd, row: Row, mem: Path, run: int, keep: Path | None = None
    ) -> None:
        """One timed save of `mem` through a freshly mapped backend, into a new file."""
        self.op_count += 1
        path = self.work / f"migd-save-{self.op_count}.img"
        log(f"round {run + 1}: {row.label}")
        migd.attach(mem, self.size)
        assert row.channels is not None
        configure(
            migd.qmp,
            row.channels,
            row.direct_io,
            **{
                "max-bandwidth": 0,
                "zero-page-detection": "multifd" if row.detect else "none",
            },
        )
        self.drop()
        before = meminfo("Cached")
        timed = timed_migration(migd.qmp, "migrate", {"uri": f"file:{path}"}, migd.proc.pid)
        cache = self.cache_left(path, before)
        if cache is not None:
            row.cache_pct.append(cache)
        pages = self.size // PAGE
        row.written_pct.append(100 * timed.info.get("ram", {}).get("normal", pages) / pages)
        row.add(timed)
        if keep is not None:
            path.replace(keep)
        else:
            path.unlink()

    def qemu_save(self, row: Row, run: int, migd: Migd, keep: Path | None = None) -> None:
        """One timed save by a new QEMU; `migd` lets go of the memory file first."""
        migd.detach()
        self.op_count += 1
        path = self.work / f"qemu-save-{self.op_count}.img"
        log(f"round {run + 1}: {row.label}")
        assert row.channels is not None
        with self.qemu_session(self.src, incoming=False) as (qmp, proc):
            configure(qmp, row.channels, row.direct_io, **{"max-bandwidth": 0})
            self.drop()
            before = meminfo("Cached")
            timed = timed_migration(qmp, "migrate", {"uri": f"file:{path}"}, proc.pid, False)
        row.add(timed)
        cache = self.cache_left(path, before)
        if cache is not None:
            row.cache_pct.append(cache)
        if keep is not None:
            path.replace(keep)
        else:
            path.unlink()

    def prepare_dst(self, empty: bool, value: int) -> None:
        """Pre-fill the destination with other data, or leave it an empty (sparse) file."""
        if empty:
            with open(self.dst, "a+b") as f:
                os.ftruncate(f.fileno(), 0)  # frees every page, mapped or not
                os.ftruncate(f.fileno(), self.size)
        else:
            fill_pattern(self.dst, self.size, value)

    def restore(self, row: Row, run: int, migd: Migd | None, other: Migd | None = None) -> None:
        """One timed restore into dst: by `migd`, or by a new QEMU when it is None (and
        then `other`, a migd that maps dst, lets go of it first)."""
        log(f"round {run + 1}: {row.label}")
        if other is not None:
            other.detach()
        self.prepare_dst(row.empty_dst, 0x11 * (1 + (run + self.op_count) % 15))
        assert row.channels is not None
        if migd is not None:
            source = self.restore_src
            migd.attach(self.dst, self.size)
            configure(migd.qmp, row.channels, row.direct_io)
            self.drop()
            before = meminfo("Cached")
            timed = timed_migration(
                migd.qmp, "migrate-incoming", {"uri": f"file:{source}"}, migd.proc.pid
            )
        else:
            source = self.qemu_file
            with self.qemu_session(self.dst, incoming=True) as (qmp, proc):
                configure(qmp, row.channels, row.direct_io)
                self.drop()
                before = meminfo("Cached")
                timed = timed_migration(
                    qmp, "migrate-incoming", {"uri": f"file:{source}"}, proc.pid, False
                )
        row.add(timed)
        cache = self.cache_left(source, before)
        if cache is not None:
            row.cache_pct.append(cache)
        ok = same_contents(self.src, self.dst, self.size)
        row.verified = ok and row.verified is not False
        if not ok and migd is not None:
            raise BenchError(f"{row.label}: restored memory differs from the source")

    def round(self, run: int, saver: Migd, loader: Migd) -> None:
        """Every figure once: saves, then the restores that read their files.

        Within each group the order is shuffled afresh every round (the first round keeps
        the table's order), so that no figure always follows the same neighbour: a
        buffered save, for one, leaves the host writing back for a while after it ends.
        """
        self.disk(run)
        mig = self.migration_row
        saves: list[Callable[[], None]] = []
        for ch in self.channels:
            keep = self.restore_src if ch == self.ref else None
            saves.append(
                partial(self.migd_save, saver, mig("migd", "save", ch), self.src, run, keep=keep)
            )
        for ch in self.buffered:
            saves.append(
                partial(
                    self.migd_save, saver, mig("migd", "save", ch, direct_io=False), self.src, run
                )
            )
        for i, ch in enumerate(self.qemu_channels):
            keep = self.qemu_file if i == 0 else None
            saves.append(partial(self.qemu_save, mig("qemu", "save", ch), run, saver, keep=keep))
        if self.qemu_channels:
            saves.append(
                partial(self.qemu_save, mig("qemu", "save", self.ref, direct_io=False), run, saver)
            )
        restores: list[Callable[[], None]] = []
        for ch in self.channels:
            restores.append(partial(self.restore, mig("migd", "restore", ch), run, loader))
        for ch in self.buffered:
            restores.append(
                partial(self.restore, mig("migd", "restore", ch, direct_io=False), run, loader)
            )
        restores.append(
            partial(self.restore, mig("migd", "restore", self.ref, empty=True), run, loader)
        )
        for ch in self.qemu_channels:
            restores.append(partial(self.restore, mig("qemu", "restore", ch), run, None, loader))
        if self.qemu_channels:
            for kw in ({"direct_io": False}, {"empty": True}):
                restores.append(
                    partial(self.restore, mig("qemu", "restore", self.ref, **kw), run, None, loader)
                )
        order = random.Random(run)
        for group in (saves, restores):
            if run:
                order.shuffle(group)
            for op in group:
                op()
        saver.detach()
        loader.detach()

    def paired_saves(self, migd: Migd) -> None:
        """Zero-page saves and detection off, each next to a random-RAM save (alternately
        before and after it): their time ratios shrug off disk drift."""
        ref = self.migration_row("migd", "save", self.ref, memory="adjacent")
        for kind in ("nodetect", "zero75", "zero30", "holes75"):
            if kind == "nodetect":
                row = self.migration_row("migd", "save", self.ref, detect=False)
                mem = self.src
            else:
                row = self.migration_row("migd", "save", self.ref, memory=kind)
                mem = self.zero_src
                log(f"filling the memory file: {row.label.split(', ')[-1]}")
                fill_memory(mem, self.size, kind, seed=7)
            for run in range(self.runs):
                pair = [(ref, self.src), (row, mem)]
                for r, m in pair[:: 1 if run % 2 == 0 else -1]:
                    self.migd_save(migd, r, m, run)
        migd.detach()
        self.zero_src.unlink(missing_ok=True)

    def run(self) -> None:
        self.check_space()
        log(f"filling {human(self.size)} of random memory in {self.src}")
        fill_memory(self.src, self.size, "random", seed=1)
        saver = Migd(self, "migd-save")
        loader = Migd(self, "migd-restore")
        try:
            for run in range(self.runs):
                self.round(run, saver, loader)
            for path in (self.dst, self.restore_src, self.qemu_file):
                path.unlink(missing_ok=True)  # room in /dev/shm for the zero-page memory
            self.paired_saves(saver)
        finally:
            saver.close()
            loader.close()
        self.complete = True

    # -- report ----------------------------------------------------------------------------

    def measured(self) -> dict[str, Row]:
        """The rows with at least one run (an interrupted run leaves empty ones)."""
        return {k: r for k, r in self.rows.items() if r.times}

    def best_disk(self, rw: str) -> Row | None:
        rows = [r for r in self.measured().values() if r.op == rw]
        fio = [r for r in rows if r.tool == "fio"]
        pool = fio or rows  # fio is the reference when it ran
        return max(pool, key=lambda r: r.gibs) if pool else None

    def best(self, tool: str, op: str, **match: Any) -> Row | None:
        rows = [
            r
            for r in self.measured().values()
            if r.tool == tool
            and r.op == op
            and r.memory == "random"
            and not r.empty_dst
            and r.detect
            and all(getattr(r, k) == v for k, v in match.items())
        ]
        return max(rows, key=lambda r: r.gibs) if rows else None

    def qemu_match(self, row: Row) -> Row | None:
        """QEMU's figure for the same operation, channels, direct-io and destination."""
        if row.tool != "migd" or row.memory != "random":
            return None
        key = (
            f"qemu-{row.op}-{row.channels}"
            + ("" if row.direct_io else "-buffered")
            + ("-empty" if row.empty_dst else "")
        )
        return self.measured().get(key)

    def ratios(self) -> list[Ratio]:
        rows = self.measured()
        save, restore = (
            self.best("migd", "save", direct_io=True),
            self.best("migd", "restore", direct_io=True),
        )
        qsave, qrestore = (
            self.best("qemu", "save", direct_io=True),
            self.best("qemu", "restore", direct_io=True),
        )
        zero_ref = rows.get(f"migd-save-{self.ref}-adjacent")  # paired with each below

        def speed(a: Row | None, b: Row | None) -> float | None:
            return a.gibs / b.gibs if a and b else None

        def time_ratio(key: str) -> float | None:
            row = rows.get(key)
            return row.seconds / zero_ref.seconds if row and zero_ref else None

        out: list[Ratio] = []

        def add(
            name: str,
            value: float | None,
            target: str,
            good: Callable[[float], bool],
            unit: str = "x",
        ) -> None:
            out.append(Ratio(name, value, target, None if value is None else good(value), unit))

        def ch(row: Row | None) -> str:
            return f"{row.channels} ch" if row else "-"

        add(
            f"best migd save ({ch(save)}) / best disk write",
            speed(save, self.best_disk("write")),
            ">= 0.90",
            lambda v: v >= 0.9,
        )
        add(
            f"best migd save ({ch(save)}) / best QEMU save ({ch(qsave)})",
            speed(save, qsave),
            "> 1",
            lambda v: v > 1,
        )
        add(
            f"best migd restore ({ch(restore)}) / best disk read",
            speed(restore, self.best_disk("read")),
            ">= 0.85",
            lambda v: v >= 0.85,
        )
        add(
            f"best migd restore ({ch(restore)}) / best QEMU restore ({ch(qrestore)})",
            speed(restore, qrestore),
            ">= 2",
            lambda v: v >= 2,
        )
        add(
            f"restore / QEMU restore, both into an empty memory file ({self.ref} ch)",
            speed(
                rows.get(f"migd-restore-{self.ref}-empty"),
                rows.get(f"qemu-restore-{self.ref}-empty"),
            ),
            ">= 2",
            lambda v: v >= 2,
        )
        for key, what, target in (
            ("zero75", "zero75", 0.4),
            ("holes75", "zero75 as holes", 0.4),
            ("zero30", "zero30", 1.0),
        ):
            add(
                f"{what} / random save time ({self.ref} ch, paired runs)",
                time_ratio(f"migd-save-{self.ref}-{key}"),
                f"<= {target:.2f}",
                lambda v, t=target: v <= t,
            )
        nodetect = time_ratio(f"migd-save-{self.ref}-nodetect")
        cost = 100 * (1 / nodetect - 1) if nodetect else None
        add(
            f"zero detection cost on random RAM ({self.ref} ch, paired runs)",
            cost,
            "< 10 %",
            lambda v: v < 10,
            "%",
        )
        cache = [
            p
            for r in rows.values()
            if r.tool == "migd" and r.op == "save" and r.direct_io
            for p in r.cache_pct
        ]
        add(
            "page cache left by a migd direct-io save (worst)",
            max(cache) if cache else None,
            "< 1 %",
            lambda v: v < 1,
            "%",
        )
        lat = [x for r in rows.values() if r.tool == "migd" and r.op == "save" for x in r.latencies]
        add(
            "query-migrate p99 during migd saves",
            percentile_ms(lat, 0.99),
            "< 20 ms",
            lambda v: v < 20,
            " ms",
        )
        peak = max((r.peak_anon for r in rows.values()), default=0)
        bitmaps = self.size // PAGE // 8
        add(
            "migd private memory (RssAnon) peak",
            peak / MiB if peak else None,
            f"< {100 + bitmaps / MiB:.1f} MiB",
            lambda v: v < 100 + bitmaps / MiB,
            " MiB",
        )
        return out

    def command(self) -> str:
        """The command line that repeats this run, every option spelled out."""
        a = self.args
        argv = [
            "migd",
            "bench",
            "--size-gib",
            f"{a.size_gib:g}",
            "--dir",
            a.dir,
            "--channels",
            ",".join(map(str, a.channels)),
            "--runs",
            str(a.runs),
            "--buffered-channels",
            ",".join(map(str, a.buffered_channels)) or "none",
        ]
        if a.no_qemu:
            argv.append("--no-qemu")
        else:
            argv += ["--qemu-channels", ",".join(map(str, a.qemu_channels)) or "none"]
            if a.qemu != DEFAULT_QEMU:
                argv += ["--qemu", a.qemu]
        if a.baseline != "auto":
            argv += ["--baseline", a.baseline]
        if a.out:
            argv += ["--out", a.out]
        if a.json:
            argv.append("--json")
        return shlex.join(argv)

    def facts(self) -> list[str]:
        m = self.machine
        disk = m["dir_disk"]
        dev = m["dir_device"] or "?"
        if disk:
            dev += f" ({', '.join(f'{k} {v}' for k, v in disk.items())})"
        elapsed = (self.finished or time.time()) - self.started
        qemu = (
            f"QEMU {self.qemu_str()}"
            if self.use_qemu
            else "QEMU: skipped (--no-qemu)"
            if self.args.no_qemu
            else f"QEMU: {'not found' if not self.qemu else self.qemu_str() + ' (< 9.1)'}"
        )
        buffered = (
            "all channel counts"
            if self.buffered == self.channels
            else f"{', '.join(map(str, self.buffered)) or 'no'} channels only"
        )
        return [
            f"- command: `{self.command()}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(self.started))}, "
            f"took {elapsed / 60:.1f} min{'' if self.complete else ' (**interrupted**)'}",
            f"- machine: {m['cpus']} x {m['cpu']}, {m['memory_gib']:g} GiB RAM, kernel "
            f"{m['kernel']}"
            + (f", {m['virtualization']}" if m["virtualization"] else "")
            + f"; load average {m['loadavg_start']:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end",
            f"- disk: save files in {m['dir']} on {dev}, {m['dir_fs'] or '?'}; memory files "
            "in /dev/shm",
            f"- software: migd {m['migd']}, Python {m['python']}, {qemu}, {m['fio'] or 'no fio'}",
            f"- {self.size / GiB:g} GiB per operation, {self.runs} round{'s' * (self.runs > 1)}"
            f" (median, min-max); page cache dropped before each measurement: "
            f"{self.drop_note()}; page cache measured with "
            f"{'fincore' if self.has_fincore else '/proc/meminfo Cached'}; disk baseline: "
            f"{' + '.join(self.disk_tools)}; direct-io off measured for {buffered}",
        ]

    def summary(self) -> list[str]:
        """Throughput by channel count: the table for the README."""
        rows = self.measured()
        w, r = self.best_disk("write"), self.best_disk("read")
        qemu = bool(self.qemu_channels)

        def cell(key: str, disk: Row | None) -> str:
            row = rows.get(key)
            if row is None:
                return "| |" if qemu else "|"
            text = f"{row.gibs:.2f} ({row.gibs / disk.gibs:.0%})" if disk else f"{row.gibs:.2f}"
            if not qemu:
                return f"{text} |"
            q = self.qemu_match(row)
            return f"{text} | {f'{row.gibs / q.gibs:.2f}x' if q else ''} |"

        vs = " | vs QEMU" if qemu else ""
        head = (
            f"| ch | save, direct-io{vs} | save, buffered{vs} | restore, direct-io{vs} "
            f"| restore, buffered{vs} |"
        )
        lines = [head, "|---:" + "|---:" * (8 if qemu else 4) + "|"]
        for ch in self.channels:
            lines.append(
                f"| {ch} | "
                + " ".join(
                    cell(k, d)
                    for k, d in (
                        (f"migd-save-{ch}", w),
                        (f"migd-save-{ch}-buffered", w),
                        (f"migd-restore-{ch}", r),
                        (f"migd-restore-{ch}-buffered", r),
                    )
                )
            )
        for label, key, disk in (("QEMU save", "save", w), ("QEMU restore", "restore", r)):
            best = self.best("qemu", key, direct_io=True)
            if best:
                lines.append(
                    f"\nBest {label}: {best.gibs:.2f} GiB/s ({best.channels} ch, "
                    f"direct-io)" + (f", {best.gibs / disk.gibs:.0%} of the disk." if disk else ".")
                )
        return lines

    def markdown(self) -> str:
        w, r = self.best_disk("write"), self.best_disk("read")
        lines = [
            "# migd bench",
            "",
            *self.facts(),
            "",
            "## Throughput by channel count",
            "",
            "GiB/s of RAM, median of the rounds; in brackets the share of the disk's best "
            f"O_DIRECT figure ({w.label if w else '-'}: {w.gibs if w else 0:.2f} GiB/s; "
            f"{r.label if r else '-'}: {r.gibs if r else 0:.2f} GiB/s); vs QEMU: against "
            "QEMU with the same channels and direct-io setting.",
            "",
            *self.summary(),
            "",
            "## Every figure",
            "",
            "| what | GiB/s | min-max | s | vs disk | vs QEMU | pages written | page cache "
            "left | CPU | qm p99 / max ms (answers) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        rows = self.measured()
        for row in rows.values():
            disk = {"save": w, "restore": r}.get(row.op)
            qemu = self.qemu_match(row)
            vs_disk = f"{row.gibs / disk.gibs:.2f}" if disk else ""
            vs_qemu = f"{row.gibs / qemu.gibs:.2f}" if qemu else ""
            written = f"{statistics.median(row.written_pct):.0f} %" if row.written_pct else ""
            cache = f"{max(row.cache_pct):.3g} %" if row.cache_pct else ""
            cpu = "" if row.cpu_pct is None else f"{row.cpu_pct:.0f} %"
            p99, top = row.p99_ms(), row.max_ms()
            qm = (
                ""
                if p99 is None or top is None
                else (f"{p99:.1f} / {top:.0f} ({len(row.latencies)})")
            )
            label = (
                row.label + {True: " (verified)", False: " (**MISMATCH**)", None: ""}[row.verified]
            )
            lines.append(
                f"| {label} | {row.gibs:.2f} | {row.span()} | {row.seconds:.2f} | {vs_disk} "
                f"| {vs_qemu} | {written} | {cache} | {cpu} | {qm} |"
            )
        lat = [
            x for r_ in rows.values() if r_.tool == "migd" and r_.op == "save" for x in r_.latencies
        ]
        lines += [
            "",
            "vs disk: against the best disk figure above; zero-page rows count GiB/s of RAM. "
            "Page cache left: the file's cached pages after the operation (worst round), "
            "% of the bytes moved. CPU: the CPU time of the migd or QEMU process over the "
            "operation's time, % of one core (median; this machine has "
            f"{os.cpu_count()}). qm: query-migrate round trips during the operation, polled "
            "every 10 ms, and how many answers came (all rounds).",
        ]
        if lat:
            lines.append(
                f"query-migrate during all migd saves: {len(lat)} answers, median "
                f"{percentile_ms(lat, 0.5):.2f} ms, p99 {percentile_ms(lat, 0.99):.2f} ms, "
                f"max {1000 * max(lat):.2f} ms."
            )
        lines += [
            "",
            "## Against docs/performance.md",
            "",
            "| ratio | value | target | met |",
            "|---|---:|---:|:---:|",
        ]
        for ratio in self.ratios():
            met = {True: "yes", False: "**no**", None: ""}[ratio.ok]
            lines.append(f"| {ratio.name} | {ratio.shown()} | {ratio.target} | {met} |")
        return "\n".join(lines) + "\n"

    def as_json(self) -> str:
        w, r = self.best_disk("write"), self.best_disk("read")
        return (
            json.dumps(
                {
                    "command": self.command(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
                    "seconds": (self.finished or time.time()) - self.started,
                    "loadavg_end": os.getloadavg()[0],
                    "complete": self.complete,
                    "machine": self.machine,
                    "size_bytes": self.size,
                    "runs": self.runs,
                    "dir": self.args.dir,
                    "channels": self.channels,
                    "buffered_channels": self.buffered,
                    "qemu_channels": self.qemu_channels,
                    "ref_channels": self.ref,
                    "qemu": self.qemu_str() if self.use_qemu else None,
                    "disk_tools": self.disk_tools,
                    "dropped_caches": self.drop_enabled,
                    "disk_write_key": w.key if w else None,
                    "disk_read_key": r.key if r else None,
                    "rows": [row.as_dict() for row in self.measured().values()],
                    "ratios": [
                        {"name": x.name, "value": x.value, "target": x.target, "met": x.ok}
                        for x in self.ratios()
                    ],
                },
                indent=2,
            )
            + "\n"
        )

    def plot(self, path: Path) -> str | None:
        """Write the PNG; returns why not when matplotlib is missing."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return "matplotlib is not installed (pip install 'migd[bench]'): no PNG written"
        rows = self.measured()
        fig, axes = plt.subplots(1, 2, figsize=(12, 6.5), sharey=True)
        top = 0.0
        for ax, op, rw in zip(axes, ("save", "restore"), ("write", "read"), strict=True):
            for tool, direct, style, name in (
                ("migd", True, "o-", "migd, direct-io"),
                ("migd", False, "o--", "migd, buffered"),
                ("qemu", True, "s", f"QEMU {self.qemu_str()}, direct-io"),
                ("qemu", False, "D", f"QEMU {self.qemu_str()}, buffered"),
            ):
                pts = sorted(
                    (r.channels, r)
                    for r in rows.values()
                    if r.tool == tool
                    and r.op == op
                    and r.direct_io == direct
                    and r.memory == "random"
                    and not r.empty_dst
                    and r.detect
                )
                if not pts:
                    continue
                shift = {
                    ("migd", True): 1.0,
                    ("migd", False): 1.0,
                    ("qemu", True): 1.05,
                    ("qemu", False): 0.95,
                }[tool, direct]
                xs = [c * shift for c, _ in pts]  # side by side, not on top of each other
                ys = [r.gibs for _, r in pts]
                err = [
                    [r.gibs - r.gibs_range[0] for _, r in pts],
                    [r.gibs_range[1] - r.gibs for _, r in pts],
                ]
                top = max(top, *(r.gibs_range[1] for _, r in pts))
                ax.errorbar(
                    xs,
                    ys,
                    yerr=err,
                    fmt=style,
                    capsize=3,
                    label=name,
                    markersize=7 if tool == "qemu" else 5,
                )
            for tool, marker in (("migd", "^"), ("qemu", "v")):
                row = rows.get(f"{tool}-{op}-{self.ref}-empty")
                if row:
                    name = "migd" if tool == "migd" else "QEMU"
                    shift = 0.9 if tool == "migd" else 1.1
                    ax.plot(
                        [row.channels * shift],
                        [row.gibs],
                        marker,
                        markersize=8,
                        label=f"{name}, direct-io, into empty memory",
                    )
                    top = max(top, row.gibs)
            disk = self.best_disk(rw)
            if disk:
                ax.axhline(
                    disk.gibs,
                    color="black",
                    linestyle=":",
                    label=f"disk {rw}: {disk.label.split(', ', 1)[1]}",
                )
                lo, hi = disk.gibs_range
                ax.axhspan(lo, hi, color="grey", alpha=0.15)
                top = max(top, hi)
            ax.set_title(f"{op} of {human(self.size)} of random RAM")
            ax.set_xscale("log", base=2)
            ax.set_xticks(self.channels, [str(c) for c in self.channels])
            ax.minorticks_off()
            ax.set_xlabel("multifd channels")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
        axes[0].set_ylabel("GiB/s (median, bars: min-max)")
        axes[0].set_ylim(0, top * 1.1 or 1)
        m = self.machine
        fig.suptitle(
            f"migd bench, {time.strftime('%Y-%m-%d', time.localtime(self.started))}: "
            f"{m['cpus']} CPUs, {m['dir_fs'] or '?'} on {m['dir_device'] or '?'} "
            f"({m['dir_disk'].get('driver', '?')}), median of {self.runs} "
            f"round{'s' * (self.runs > 1)}",
            fontsize=11,
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return None

    def write_out(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "bench.md").write_text(self.markdown())
        (directory / "bench.json").write_text(self.as_json())
        png = directory / "bench.png"
        why = self.plot(png)
        if why:
            log(why)
            png.unlink(missing_ok=True)  # not a stale picture next to new tables
        log(f"wrote {directory}/bench.md, bench.json" + ("" if why else ", bench.png"))


# --- command line ----------------------------------------------------------------------

DEFAULT_QEMU = "qemu-system-x86_64"


def _counts(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        values = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list like 1,2,4,8") from None
    if any(not 1 <= v <= 255 for v in values):
        raise argparse.ArgumentTypeError(f"'{text}': channel counts are 1..255")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--size-gib",
        type=float,
        default=4.0,
        help="bytes per operation in GiB (default 4; at least 0.0625)",
    )
    p.add_argument(
        "--dir",
        default="/tmp",
        help="directory of the save files: the disk under test (default /tmp)",
    )
    p.add_argument(
        "--channels",
        type=_counts,
        default=[1, 2, 4, 8],
        help="multifd channel counts (default 1,2,4,8)",
    )
    p.add_argument(
        "--buffered-channels",
        type=_counts,
        default=None,
        metavar="CHANNELS",
        help="channel counts also measured without direct-io (default: all of "
        "--channels; 'none' for none)",
    )
    p.add_argument(
        "--qemu-channels",
        type=_counts,
        default=None,
        metavar="CHANNELS",
        help="channel counts of QEMU's saves and restores (default: --channels)",
    )
    p.add_argument(
        "--runs", type=int, default=3, help="rounds; each figure is the median (default 3)"
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="write bench.md, bench.json and bench.png there"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument(
        "--baseline",
        choices=("auto", "fio", "python", "both"),
        default="auto",
        help="disk baseline: fio if installed (auto), or the Python loop, or both",
    )
    p.add_argument("--qemu", default=DEFAULT_QEMU, help=f"QEMU binary (default {DEFAULT_QEMU})")
    p.add_argument("--no-qemu", action="store_true", help="leave QEMU out")
    p.add_argument(
        "--keep-caches",
        action="store_true",
        help="do not drop the page cache between measurements (it is dropped by "
        "default when running as root)",
    )


def check_arguments(args: argparse.Namespace) -> str | None:
    """Fills in the defaults that depend on --channels; the usage error, if any."""
    if not args.channels or args.runs < 1:
        return "--channels and --runs must be positive"
    if args.buffered_channels is None:
        args.buffered_channels = list(args.channels)
    if args.qemu_channels is None:
        args.qemu_channels = list(args.channels)
    if not set(args.buffered_channels) <= set(args.channels):
        return "--buffered-channels must be a subset of --channels"
    return None


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    """Runs the suite for parsed arguments (`migd bench` or the script); the exit code."""
    error = check_arguments(args)
    if error:
        print(f"migd bench: error: {error}", file=sys.stderr)
        return 2
    old = {s: signal.signal(s, _terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    cleanup = Cleanup()
    bench: Bench | None = None
    code = 1
    try:
        bench = Bench(args, cleanup)
        bench.run()
        code = 0
    except BenchError as exc:
        log(f"error: {exc}")
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        cleanup.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if bench is not None and bench.measured():
            bench.finished = time.time()
            if args.out:
                bench.write_out(Path(args.out))
            print(bench.as_json() if args.json else bench.markdown(), end="", flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="migd bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
