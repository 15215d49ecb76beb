"""Same-run A/B of two migd trees: save and restore speed and the daemon's CPU time.

Issue 12 (trust) changed hot paths: the zero scan reads memory through process_vm_readv,
I/O calls adapt their size, buffered saves write behind, EFAULTs are explained. This runs
the tree before (--old, e.g. a worktree at the previous commit) and the tree after
(--new, default: this checkout) in one process, in an order shuffled every round:

    git worktree add --detach /tmp/migd-old 12a0879
    .venv/bin/python docs/bench/trust-ab/ab.py --old /tmp/migd-old --rounds 5

Each round, for each tree: a fresh daemon maps a 4 GiB /dev/shm file (random data, or
75% zero pages in 2 MiB clusters), saves it with 4 multifd channels and direct-io to
--dir (ext4 here), then restores that file into the same backend. Times are query-migrate's
total-time; CPU is the daemon's user+system time over the job (/proc/PID/stat). Root.
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

GiB = 1 << 30
MiB = 1 << 20
REPO = Path(__file__).resolve().parents[3]
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

    def call(self, name: str, args: dict | None = None) -> dict:
        msg = {"execute": name} | ({"arguments": args} if args else {})
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while "event" in (reply := self.recv()):
            pass
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']['desc']}")
        return reply["return"]

    def wait(self) -> dict:
        while (info := self.call("query-migrate"))["status"] not in ("completed", "failed"):
            time.sleep(0.02)
        if info["status"] != "completed":
            raise RuntimeError(info.get("error-desc"))
        return info


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def fill(path: Path, size: int, zero_fraction: float) -> None:
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            block = rng.integers(1, 255, 64 * MiB, dtype=np.uint8)
            if zero_fraction:
                clusters = block.reshape(-1, 2 * MiB)
                clusters[rng.random(clusters.shape[0]) < zero_fraction] = 0
            f.write(block.tobytes())
    path.chmod(0o600)


def run_one(tree: Path, mem: Path, save: Path, size: int, work: Path) -> dict[str, float]:
    sock = work / "qmp.sock"
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.Popen(
        [sys.executable, "-m", "migd", "serve", "--socket", str(sock), "--log-level", "warning"],
        env=env,
    )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "migd did not start"
            time.sleep(0.02)
        client = Client(sock)
        client.call(
            "object-add",
            {"qom-type": "memory-backend-file", "id": "ram0", "size": size, "mem-path": str(mem)},
        )
        caps = [{"capability": c, "state": True} for c in ("multifd", "mapped-ram")]
        client.call("migrate-set-capabilities", {"capabilities": caps})
        client.call("migrate-set-parameters", {"multifd-channels": 4, "direct-io": True})
        save.unlink(missing_ok=True)
        cpu0 = cpu_seconds(proc.pid)
        client.call("migrate", {"uri": f"file:{save}"})
        saved = client.wait()
        cpu1 = cpu_seconds(proc.pid)
        client.call("migrate-incoming", {"uri": f"file:{save}"})
        restored = client.wait()
        cpu2 = cpu_seconds(proc.pid)
        return {
            "save_s": saved["total-time"] / 1000,
            "save_cpu": cpu1 - cpu0,
            "restore_s": restored["total-time"] / 1000,
            "restore_cpu": cpu2 - cpu1,
        }
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, default=REPO)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-gib", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    size = args.size_gib * GiB
    work = Path(tempfile.mkdtemp(prefix="migd-ab-", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="migd-ab-", dir="/dev/shm"))
    out = Path(tempfile.mkdtemp(prefix="migd-ab-", dir=args.dir))
    trees = {"old": args.old, "new": args.new}
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for pattern, zero in (("random", 0.0), ("75% zero", 0.75)):
            mem = shm / "mem"
            fill(mem, size, zero)
            for _ in range(args.rounds):
                order = list(trees)
                random.shuffle(order)
                for name in order:
                    row = run_one(trees[name], mem, out / "save.img", size, work)
                    results.setdefault((pattern, name), []).append(row)
                    print(pattern, name, row, flush=True)
            mem.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    print(f"\nmedians of {args.rounds} rounds, {args.size_gib} GiB, 4 channels, direct-io")
    print("| memory | tree | save s | save CPU s | restore s | restore CPU s |")
    print("|---|---|---|---|---|---|")
    for (pattern, name), rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(
            f"| {pattern} | {name} | {med['save_s']:.2f} | {med['save_cpu']:.2f} | "
            f"{med['restore_s']:.2f} | {med['restore_cpu']:.2f} |"
        )
    for pattern in ("random", "75% zero"):
        old, new = results[(pattern, "old")], results[(pattern, "new")]
        for key in ("save_s", "restore_s"):
            ratio = statistics.median(n[key] / o[key] for n, o in zip(new, old, strict=True))
            print(f"{pattern} {key}: new/old time, median of per-round ratios = {ratio:.3f}")


if __name__ == "__main__":
    main()
