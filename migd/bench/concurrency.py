"""Many jobs at once: N concurrent saves, then restores, against the same N one after
another in the same daemon, and against N QEMU processes saving concurrently.

Each job has its own backend (a tmpfs file of --size-mib of random data) and its own
file in --dir, with direct-io and --channels channels. Prints, per phase: total time,
the concurrent / serial ratio (target <= 1.05: the disk stays saturated), each job's
throughput and Jain's fairness index over them (target >= 0.95; each job within 25% of
the median), query-jobs answer times while the jobs run (p99 target < 20 ms), and the
daemon's peak private memory (RssAnon; target < 100 MiB + bitmaps).

    .venv/bin/python -m migd.bench.concurrency [--jobs 8] [--size-mib 512] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from qemu.qmp import QMPClient

from ..limits import CHANNELS_MAX
from .common import JOB_MIB_MAX, JOBS_MAX, RUNS_MAX, int_in
from .disk import drop_caches
from .processes import connect_qmp, rss_anon, start_migd
from .results import percentile_ms

MiB = 1 << 20
GiB = 1 << 30
POLL = 0.02  # seconds between query-jobs polls


@dataclass
class Phase:
    name: str
    seconds: float
    per_job: dict[str, float]  # job -> seconds from its start to concluded
    latencies: list[float] = field(default_factory=list)  # query-jobs round trips, s
    peak_anon: int = 0
    round: int = 1


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one takes everything."""
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


async def run_jobs(
    qmp: QMPClient, command: str, specs: list[dict[str, Any]], pid: int, concurrent: bool
) -> Phase:
    """Start every job (all at once, or each after the last concluded) and poll query-jobs
    until all have concluded; per-job times are from its start to the poll that saw it
    concluded."""
    latencies: list[float] = []
    peak = 0
    started: dict[str, float] = {}
    done: dict[str, float] = {}
    t0 = time.perf_counter()
    pending = list(specs)

    async def start(spec: dict[str, Any]) -> None:
        started[spec["job-id"]] = time.perf_counter()
        await qmp.execute(command, spec)

    if concurrent:
        for spec in pending:
            await start(spec)
        pending = []
    else:
        await start(pending.pop(0))
    while len(done) < len(specs):
        sent = time.perf_counter()
        jobs = await qmp.execute("query-jobs")
        now = time.perf_counter()
        latencies.append(now - sent)
        peak = max(peak, rss_anon(pid))
        assert isinstance(jobs, list)
        for job in jobs:
            if job["status"] == "concluded" and job["id"] not in done:
                if "error" in job:
                    raise RuntimeError(f"{job['id']}: {job['error']}")
                done[job["id"]] = now - started[job["id"]]
                await qmp.execute("job-dismiss", {"id": job["id"]})
                if pending:
                    await start(pending.pop(0))
        await asyncio.sleep(POLL)
    return Phase(
        f"{'concurrent' if concurrent else 'serial'} {command}",
        time.perf_counter() - t0,
        done,
        latencies,
        peak,
    )


async def qemu_concurrent_saves(
    mems: list[Path], size: int, out_dir: Path, channels: int
) -> float | None:
    """N QEMU processes (-M none, one shared memory-backend-file each) saving at once with
    mapped-ram + multifd + direct-io; seconds from the first migrate to the last done."""
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        return None
    procs, clients = [], []
    try:
        for i, mem in enumerate(mems):
            sock = out_dir / f"qemu{i}.sock"
            backend = f"memory-backend-file,id=ram0,size={size},mem-path={mem},share=on"
            argv = [binary, "-M", "none", "-nodefaults", "-display", "none", "-S",
                    "-object", backend, "-machine", "memory-backend=ram0",
                    "-qmp", f"unix:{sock},server=on,wait=off"]  # fmt: skip
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            client = await connect_qmp(sock, proc, f"qemu{i}")
            clients.append(client)
            caps = [{"capability": c, "state": True} for c in ("multifd", "mapped-ram")]
            await client.execute("migrate-set-capabilities", {"capabilities": caps})
            await client.execute(
                "migrate-set-parameters", {"multifd-channels": channels, "direct-io": True}
            )
        t0 = time.perf_counter()
        for i, client in enumerate(clients):
            await client.execute("migrate", {"uri": f"file:{out_dir}/qemu{i}.sav"})
        for client in clients:
            while True:
                info = await client.execute("query-migrate")
                assert isinstance(info, dict)
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                await asyncio.sleep(POLL)
            if info["status"] != "completed":
                raise RuntimeError(f"QEMU save {info['status']}: {info.get('error-desc')}")
        return time.perf_counter() - t0
    finally:
        for client in clients:
            await client.disconnect()
        for proc in procs:
            proc.kill()
            proc.wait(30)


def fill(path: Path, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for at in range(0, size, 64 * MiB):
            f.write(rng.integers(0, 256, min(64 * MiB, size - at), dtype=np.uint8).tobytes())


def report(phases: list[Phase], qemu: float | None, size: int, args: argparse.Namespace) -> str:
    lines = [
        f"# migd: {args.jobs} jobs at once, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"{args.jobs} jobs of {size // MiB} MiB each (own backend, own file in {args.dir}), "
        f"direct-io, {args.channels} channels each, {args.slots or 'default'} I/O slots",
        "",
        "| phase | total s | GiB/s | concurrent / serial | Jain | slowest / median job "
        "| query-jobs p99 ms | peak RssAnon MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_name = {(p.round, p.name): p for p in phases}
    rounds = max(p.round for p in phases)
    ratios: dict[str, list[float]] = {}
    for p in phases:
        total = size * len(p.per_job)
        rates = [size / s for s in p.per_job.values()]
        serial = by_name.get((p.round, p.name.replace("concurrent", "serial")))
        if serial is not None and serial is not p:
            ratios.setdefault(p.name, []).append(p.seconds / serial.seconds)
        ratio = f"{p.seconds / serial.seconds:.3f}" if serial and serial is not p else ""
        fair = f"{jain(rates):.3f}" if p.name.startswith("concurrent") else ""
        spread = ""
        if p.name.startswith("concurrent"):
            spread = f"{max(p.per_job.values()) / statistics.median(p.per_job.values()):.2f}"
        p99 = percentile_ms(p.latencies, 0.99) or 0.0
        name = f"{p.name} (round {p.round})" if rounds > 1 else p.name
        lines.append(
            f"| {name} | {p.seconds:.2f} | {total / p.seconds / GiB:.2f} | {ratio} | {fair} "
            f"| {spread} | {p99:.1f} | {p.peak_anon / MiB:.0f} |"
        )
    if rounds > 1:
        lines.append("")
        # A phase's p99 is about its worst answer (80-200 polls); over every round's
        # phases of a kind it is the 99th percentile the target speaks of.
        for name in sorted({p.name for p in phases}):
            pooled = [x for p in phases if p.name == name for x in p.latencies]
            if pooled:
                lines.append(
                    f"query-jobs during every round's {name}: "
                    f"p99 {percentile_ms(pooled, 0.99):.1f} ms, "
                    f"p50 {1000 * statistics.median(pooled):.1f} ms, "
                    f"max {1000 * max(pooled):.1f} ms ({len(pooled)} answers)"
                )
        for name, values in ratios.items():
            lines.append(
                f"{name} / serial, round by round (serial and concurrent in mirrored order): "
                f"median {statistics.median(values):.3f}, "
                f"{min(values):.3f}-{max(values):.3f} over {len(values)} rounds"
            )
    if qemu is not None:
        concurrent = by_name.get((1, "concurrent memory-save"))
        versus = f" (migd's concurrent saves: {concurrent.seconds:.2f} s)" if concurrent else ""
        lines.append("")
        lines.append(
            f"{args.jobs} QEMU processes saving at once: {qemu:.2f} s, "
            f"{size * args.jobs / qemu / GiB:.2f} GiB/s{versus}"
        )
    return "\n".join(lines)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int_in(1, JOBS_MAX), default=8)
    parser.add_argument("--size-mib", type=int_in(1, JOB_MIB_MAX), default=512)
    parser.add_argument("--channels", type=int_in(1, CHANNELS_MAX), default=2)
    parser.add_argument("--dir", default="/tmp", help="where the save files go")
    parser.add_argument(
        "--slots", type=int_in(0, JOBS_MAX), default=0, help="MIGD_IO_SLOTS for the daemon"
    )
    parser.add_argument("--no-qemu", action="store_true")
    parser.add_argument(
        "--rounds",
        type=int_in(1, RUNS_MAX),
        default=1,
        help="serial and concurrent phases, mirrored order",
    )
    args = parser.parse_args(argv)
    size = args.size_mib * MiB
    env_slots = {"MIGD_IO_SLOTS": str(args.slots)} if args.slots else {}
    with (
        tempfile.TemporaryDirectory(prefix="migd-conc-", dir="/dev/shm") as shm,
        tempfile.TemporaryDirectory(prefix="migd-conc-", dir=args.dir) as work,
    ):
        mems = [Path(shm) / f"vm{i}" for i in range(args.jobs)]
        for i, mem in enumerate(mems):
            fill(mem, size, seed=i)
        sock = os.path.join(work, "qmp.sock")
        os.environ.update(env_slots)
        daemon = start_migd(sock, "--log-level", "warning")
        phases: list[Phase] = []
        try:
            qmp = await connect_qmp(sock, daemon, "bench")
            for i, mem in enumerate(mems):
                await qmp.execute(
                    "object-add",
                    {"qom-type": "memory-backend-file", "id": f"vm{i}", "size": size,
                     "mem-path": str(mem), "ramblock-name": f"vm{i}"},
                )  # fmt: skip

            def specs(kind: str) -> list[dict[str, Any]]:
                return [
                    {"job-id": f"{kind}{i}", "backends": [f"vm{i}"],
                     "uri": f"file:{work}/vm{i}.sav", "direct-io": True,
                     "multifd-channels": args.channels}
                    for i in range(args.jobs)
                ]  # fmt: skip

            for round_ in range(1, args.rounds + 1):
                # Mirrored order (serial first, then concurrent first): a steady drift of
                # the disk's speed hits both sides alike.
                order = (False, True) if round_ % 2 else (True, False)
                for command, kind in (("memory-save", "save"), ("memory-restore", "load")):
                    for concurrent in order:
                        drop_caches(Path(work), enabled=os.geteuid() == 0)
                        phase = await run_jobs(qmp, command, specs(kind), daemon.pid, concurrent)
                        phase.round = round_
                        phases.append(phase)
            await qmp.disconnect()
        finally:
            daemon.terminate()
            daemon.wait(30)
            for key in env_slots:
                os.environ.pop(key, None)
        qemu = None
        if not args.no_qemu:
            drop_caches(Path(work), enabled=os.geteuid() == 0)
            qemu = await qemu_concurrent_saves(mems, size, Path(work), args.channels)
    print(report(phases, qemu, size, args))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
