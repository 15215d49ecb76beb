"""Control plane under load: many clients polling query-migrate during a full-speed save.

Runs, in one process and one run, the same direct-io save twice: alone, then with N
clients (default 200) each polling query-migrate every --interval seconds (default
0.1, as a management app's progress display would; 0 hammers without pause). Prints the
p50/p99/max answer times seen by the pollers, the number of errors (must be 0), and the
save throughput with polling as a ratio of the throughput without (target >= 0.9), and
where the CPU went: the daemon's CPU per answer (its CPU during the polled save less
during the save alone, per answer) and the pollers' own (this process: on a machine of
few cores the clients compete with the save as much as the daemon's answers do).

    .venv/bin/python -m migd.bench.load [--size-gib 2] [--clients 200] [--interval 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from qemu.qmp import QMPClient

from .disk import drop_caches
from .processes import connect_qmp, cpu_seconds, start_migd

MiB = 1 << 20
GiB = 1 << 30


def prepare(target: Path) -> None:
    """Remove the last save and drop caches: done before the pollers start, because these
    block this process's event loop and would show up as slow answers."""
    target.unlink(missing_ok=True)
    drop_caches(target.parent, enabled=os.geteuid() == 0)


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


async def query_migrate(control: QMPClient) -> dict[str, Any]:
    info = await control.execute("query-migrate")
    assert isinstance(info, dict)
    return info


async def timed_save(control: QMPClient, target: Path) -> float:
    """Seconds from `migrate` to `completed`, polled by the control client every 20 ms."""
    started = time.monotonic()
    await control.execute("migrate", {"uri": f"file:{target}"})
    while (info := await query_migrate(control))["status"] not in (
        "completed",
        "failed",
        "cancelled",
    ):
        await asyncio.sleep(0.02)
    if info["status"] != "completed":
        raise RuntimeError(f"save {info['status']}: {info.get('error-desc')}")
    return time.monotonic() - started


async def poll(
    client: QMPClient, interval: float, stop: asyncio.Event, times: list[float], errors: list[str]
) -> None:
    # Start at a random phase so the clients do not all ask in the same instant.
    await asyncio.sleep(interval * np.random.default_rng().random())
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            await client.execute("query-migrate")
        except Exception as exc:  # counted, never fatal: the figure is the error count
            errors.append(repr(exc))
        times.append(time.perf_counter() - t0)
        await asyncio.sleep(interval)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--dir", default="/tmp", help="where the save file goes")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument(
        "--interval",
        type=float,
        default=0.1,
        help="seconds between one client's polls (0: as fast as answered)",
    )
    args = parser.parse_args()
    size = int(args.size_gib * GiB) // MiB * MiB
    with (
        tempfile.TemporaryDirectory(prefix="migd-load-", dir="/dev/shm") as shm,
        tempfile.TemporaryDirectory(prefix="migd-load-", dir=args.dir) as work,
    ):
        mem = Path(shm) / "ram"
        rng = np.random.default_rng(7)
        with open(mem, "wb") as f:
            for at in range(0, size, 64 * MiB):
                f.write(rng.integers(0, 256, min(64 * MiB, size - at), dtype=np.uint8).tobytes())
        sock = os.path.join(work, "qmp.sock")
        daemon = start_migd(sock, "--log-level", "warning")
        try:
            control = await connect_qmp(sock, daemon, "control")
            caps = [{"capability": c, "state": True} for c in ("multifd", "mapped-ram")]
            await control.execute("migrate-set-capabilities", {"capabilities": caps})
            await control.execute(
                "migrate-set-parameters", {"multifd-channels": args.channels, "direct-io": True}
            )
            await control.execute(
                "object-add",
                {
                    "qom-type": "memory-backend-file",
                    "id": "ram",
                    "size": size,
                    "mem-path": str(mem),
                },
            )
            target = Path(work) / "vm.sav"
            prepare(target)
            await timed_save(control, target)  # warm-up: maps the memory once
            prepare(target)
            daemon_cpu, own_cpu = cpu_seconds(daemon.pid), _own_cpu()
            alone = await timed_save(control, target)
            cpu_alone = cpu_seconds(daemon.pid) - daemon_cpu
            prepare(target)

            pollers = await asyncio.gather(
                *(connect_qmp(sock, daemon, f"poller{i}") for i in range(args.clients))
            )
            stop = asyncio.Event()
            times: list[float] = []
            errors: list[str] = []
            tasks = [
                asyncio.create_task(poll(c, args.interval, stop, times, errors)) for c in pollers
            ]
            await asyncio.sleep(0.5)  # let every poller reach its steady loop
            times.clear()
            daemon_cpu, own_cpu = cpu_seconds(daemon.pid), _own_cpu()
            loaded = await timed_save(control, target)
            cpu_loaded = cpu_seconds(daemon.pid) - daemon_cpu
            cpu_pollers = _own_cpu() - own_cpu
            stop.set()
            await asyncio.gather(*tasks)
            await asyncio.gather(*(c.disconnect() for c in pollers))
            await control.disconnect()
        finally:
            daemon.terminate()
            daemon.wait(30)

    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"# migd control plane under load, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    print(
        f"{size / GiB:.2f} GiB direct-io save, {args.channels} channels, save file in "
        f"{args.dir}; {args.clients} clients each polling query-migrate every "
        f"{args.interval * 1000:.0f} ms\n"
    )
    print("| what | value | target |")
    print("|---|---:|---:|")
    print(f"| query-migrate answers during the save | {len(ms)} | |")
    print(f"| errors | {len(errors)} | 0 |")
    print(f"| answer time p50 | {statistics.median(ms):.1f} ms | |")
    print(f"| answer time p99 | {p99:.1f} ms | < 20 ms |")
    print(f"| answer time max | {ms[-1]:.1f} ms | |")
    print(f"| save alone | {size / alone / GiB:.2f} GiB/s | |")
    print(f"| save with the pollers | {size / loaded / GiB:.2f} GiB/s | |")
    print(f"| throughput with / without polling | {alone / loaded:.2f} | >= 0.90 |")
    per_answer = (cpu_loaded - cpu_alone) / max(len(ms), 1) * 1e6
    print(f"| daemon CPU per answer | {per_answer:.0f} us | |")
    print(f"| daemon CPU, save alone / polled | {cpu_alone:.2f} / {cpu_loaded:.2f} s | |")
    print(f"| the pollers' own CPU (this process) | {cpu_pollers:.2f} s | |")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
