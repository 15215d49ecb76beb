"""Cache-aware restore (x-read-cached): direct-io restores of a cached and of an uncached
save file, 'auto' against 'never', paired in every round.

    .venv/bin/python docs/bench/cache-aware/bench.py --size 1G --rounds 5 --dir /tmp

A daemon maps --jobs /dev/shm backends of --size / --jobs each (random data) and saves
each, without direct-io, to its own file in --dir (so their pages stay in the page
cache). Then, every round, in shuffled order, for each of "cached" (every page of the
files in the page cache, checked with cachestat before the run) and "dropped" (the
files' pages dropped with posix_fadvise DONTNEED on those files only, after fdatasync:
never a global drop_caches), it restores all the files at once with memory-restore jobs
(direct-io on, 'auto' and 'never' in shuffled order) and times them from the first
command to the last job concluded. Also reported: the daemon's CPU seconds per restore,
how much of each run the page cache held, and what one cachestat call costs (the price
'auto' pays per MiB read). Root (posix_fadvise on the files is enough, but the
backends live in /dev/shm).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from migd.io.residency import PageCacheProbe  # noqa: E402

MiB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")


class Client:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buf = b""
        self.recv()
        self.call("qmp_capabilities")

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("migd closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, name: str, args: dict | None = None) -> object:
        msg = {"execute": name} | ({"arguments": args} if args else {})
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while "event" in (reply := self.recv()):
            pass
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']['desc']}")
        return reply["return"]

    def wait_jobs(self, ids: list[str]) -> None:
        while True:
            jobs = {j["id"]: j for j in self.call("query-jobs")}  # type: ignore[union-attr]
            if all(jobs[i]["status"] == "concluded" for i in ids):
                break
            time.sleep(0.002)
        for i in ids:
            if "error" in jobs[i]:
                raise RuntimeError(f"{i}: {jobs[i]['error']}")
            self.call("job-dismiss", {"id": i})


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def cached_fraction(paths: list[Path]) -> float:
    probe, cached, pages = PageCacheProbe(), 0, 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            cached += probe.cached_pages(fd, 0, size)
            pages += -(-size // 4096)
        finally:
            os.close(fd)
    return cached / pages


def make_cached(paths: list[Path]) -> None:
    """Read the files through the page cache (a no-op for pages already there)."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(8 * MiB):
                pass


def drop(paths: list[Path]) -> None:
    """These files' pages out of the page cache: fdatasync, then DONTNEED on each."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def probe_cost(path: Path, use_cachestat: bool, calls: int = 20000) -> float:
    """Microseconds per PageCacheProbe.cached_pages call over 1 MiB ranges of `path`."""
    probe = PageCacheProbe(use_cachestat)
    fd = os.open(path, os.O_RDONLY)
    try:
        ranges = max(1, os.fstat(fd).st_size // MiB)
        started = time.perf_counter()
        for i in range(calls):
            probe.cached_pages(fd, (i % ranges) * MiB, MiB)
        return (time.perf_counter() - started) / calls * 1e6
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="memory in all (K/M/G suffix)")
    parser.add_argument("--jobs", type=int, default=1, help="concurrent restores")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--dir", default="/tmp", help="where the save files go (a disk)")
    args = parser.parse_args()
    size = parse_size(args.size) // args.jobs // MiB * MiB

    work = Path(tempfile.mkdtemp(prefix="migd-ca-", dir=args.dir))
    shm = Path(tempfile.mkdtemp(prefix="migd-ca-", dir="/dev/shm"))
    sock = Path(tempfile.mkdtemp(prefix="ca-", dir="/tmp")) / "s"
    log = open(work / "migd.log", "w+b")  # noqa: SIM115 (closed with the daemon)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "migd", "serve", "--socket", str(sock)], cwd=REPO, stderr=log
    )
    log_reader = open(work / "migd.log", "rb")  # noqa: SIM115 (its own offset, not the daemon's)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline and daemon.poll() is None, "migd did not start"
            time.sleep(0.05)
        client = Client(sock)
        client.call("migrate-set-parameters", {"multifd-channels": args.channels})
        ids = [f"vm{i}" for i in range(args.jobs)]
        files = [work / f"{i}.sav" for i in ids]
        rng = np.random.default_rng(7)
        for i in ids:
            rng.integers(0, 256, size, dtype=np.uint8).tofile(shm / i)
            client.call("object-add", {"qom-type": "memory-backend-file", "id": i, "size": size,
                                       "mem-path": str(shm / i), "share": True})  # fmt: skip
        for i, f in zip(ids, files, strict=True):
            client.call("memory-save", {"job-id": f"s-{i}", "backends": [i],
                                        "uri": f"file:{f}", "direct-io": False})  # fmt: skip
        client.wait_jobs([f"s-{i}" for i in ids])

        def read_buffered() -> float:
            """Of the bytes the restores since the last call read, the share the daemon
            logged as read from the page cache (its 'N of M bytes' line per job)."""
            cached = moved = 0
            for line in log_reader.read().decode().splitlines():
                if line.endswith("bytes read from the page cache"):
                    words = line.split()
                    cached, moved = cached + int(words[-9]), moved + int(words[-7])
            return cached / moved if moved else 0.0

        def restore(read_cached: str) -> tuple[float, float]:
            read_buffered()  # skip what came before
            cpu = cpu_seconds(daemon.pid)
            started = time.perf_counter()
            for i, f in zip(ids, files, strict=True):
                client.call("memory-restore", {
                    "job-id": f"r-{i}", "backends": [i], "uri": f"file:{f}",
                    "direct-io": True, "x-read-cached": read_cached,
                })  # fmt: skip
            client.wait_jobs([f"r-{i}" for i in ids])
            return time.perf_counter() - started, cpu_seconds(daemon.pid) - cpu

        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        order = [(c, m) for c in ("cached", "dropped") for m in ("auto", "never")]
        for number in range(args.rounds):
            random.shuffle(order)
            for case, mode in order:
                (make_cached if case == "cached" else drop)(files)
                resident = cached_fraction(files)
                seconds, cpu = restore(mode)
                buffered = read_buffered()
                results.setdefault((case, mode), []).append((seconds, cpu, resident))
                print(f"round {number + 1} {case:7} {mode:5} {seconds:.3f} s  cpu {cpu:.2f} s  "
                      f"cached before {resident:.0%}  read buffered {buffered:.0%}",
                      flush=True)  # fmt: skip

        total = size * args.jobs
        print(f"\nmedians of {args.rounds} rounds: {args.jobs} x {size // MiB} MiB, "
              f"{args.channels} channels, direct-io, save files in {args.dir}")  # fmt: skip
        print("| page cache | x-read-cached | restore s | GiB/s | CPU s |")
        print("|---|---|---|---|---|")
        for case, mode in sorted(results):
            runs = results[(case, mode)]
            s = statistics.median(r[0] for r in runs)
            c = statistics.median(r[1] for r in runs)
            print(f"| {case} | {mode} | {s:.3f} | {total / s / (1 << 30):.2f} | {c:.2f} |")
        for case in ("cached", "dropped"):
            pairs = zip(results[(case, "auto")], results[(case, "never")], strict=True)
            ratios = [auto[0] / never[0] for auto, never in pairs]
            print(f"{case}: auto/never time, median of per-round ratios = "
                  f"{statistics.median(ratios):.3f}")  # fmt: skip
        for name, use in (("cachestat", True), ("mincore fallback", False)):
            print(f"{name} per 1 MiB range: {probe_cost(files[0], use):.2f} us per call")
    finally:
        daemon.terminate()
        daemon.wait(30)
        log.close()
        log_reader.close()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(sock.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
