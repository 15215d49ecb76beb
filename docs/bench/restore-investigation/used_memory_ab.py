"""Restore into used memory, all readers on ONE file: migd with and without its populator,
QEMU, and fio's plain O_DIRECT read, in an order shuffled every round, with the disk's own
read throughput (/proc/diskstats) sampled in 0.5 s windows during each run.

An experiment (root, QEMU >= 9.1, fio, 4 GiB in /dev/shm twice and in /tmp), not a test:

    .venv/bin/python docs/bench/restore-investigation/used_memory_ab.py --rounds 5

Its output on 2026-12-02 is in findings.md next to this file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

GiB = 1 << 30
HERE = Path(__file__).resolve()
REPO = HERE.parents[3]
# migd with the populator switched off: the thread does nothing, channels fault pages in
NO_POPULATOR = (
    "import sys; from migd import channels, cli; "
    "channels.Populator.run = lambda self: None; sys.exit(cli.main(sys.argv[1:]))"
)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def disk_read_bytes(device: str) -> int:
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if fields[2] == device:
            return int(fields[5]) * 512
    raise SystemExit(f"no block device {device!r} in /proc/diskstats")


class DiskWindows:
    """The device's read throughput in 0.5 s windows while the block runs."""

    def __init__(self, device: str) -> None:
        self.device, self.samples, self.stop = device, [], threading.Event()

    def __enter__(self) -> DiskWindows:
        def sample() -> None:
            while not self.stop.is_set():
                self.samples.append((time.perf_counter(), disk_read_bytes(self.device)))
                self.stop.wait(0.1)

        self.thread = threading.Thread(target=sample)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def gibs(self) -> list[float]:
        s = self.samples
        return [
            (b1 - b0) / (t1 - t0) / GiB for (t0, b0), (t1, b1) in zip(s[::5], s[5::5], strict=False)
        ]


def call(q: QEMUMonitorProtocol, cmd: str, args: dict | None = None) -> dict:
    reply = q.cmd_raw(cmd, args or {})
    if "error" in reply:
        raise SystemExit(f"{cmd}: {reply['error']['desc']}")
    return reply["return"]


def wait(q: QEMUMonitorProtocol) -> None:
    while (status := call(q, "query-migrate")["status"]) not in ("completed", "failed"):
        time.sleep(0.01)
    if status != "completed":
        raise SystemExit(f"migration {status}")


def configure(q: QEMUMonitorProtocol, channels: int) -> None:
    caps = [{"capability": c, "state": True} for c in ("multifd", "mapped-ram")]
    call(q, "migrate-set-capabilities", {"capabilities": caps})
    call(q, "migrate-set-parameters", {"multifd-channels": channels, "direct-io": True})


class Migd:
    def __init__(self, sock: Path, populator: bool, channels: int) -> None:
        argv = [sys.executable] + (["-m", "migd"] if populator else ["-c", NO_POPULATOR])
        self.proc = subprocess.Popen(
            [*argv, "serve", "--socket", str(sock)], cwd=REPO, stderr=subprocess.DEVNULL
        )
        while not sock.exists():
            time.sleep(0.05)
        self.q = QEMUMonitorProtocol(str(sock))
        self.q.connect()
        configure(self.q, channels)

    def migrate(self, cmd: str, uri: str, mem: Path, size: int) -> float:
        """Seconds from the command to `completed`."""
        backend = {"qom-type": "memory-backend-file", "id": "ram0", "size": size,
                   "mem-path": str(mem), "share": True}  # fmt: skip
        call(self.q, "object-add", backend)
        if cmd == "migrate-incoming":
            drop_caches()
        start = time.perf_counter()
        call(self.q, cmd, {"uri": uri})
        wait(self.q)
        seconds = time.perf_counter() - start
        call(self.q, "object-del", {"id": "ram0"})
        return seconds

    def close(self) -> None:
        self.q.close()
        self.proc.terminate()
        self.proc.wait()


def qemu_restore(sock: Path, save: Path, dst: Path, size: int, channels: int) -> float:
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none", "-S",
         "-object", f"memory-backend-file,id=ram0,size={size},mem-path={dst},share=on",
         "-machine", "memory-backend=ram0", "-qmp", f"unix:{sock},server=on,wait=off",
         "-incoming", "defer"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while not sock.exists():
        time.sleep(0.05)
    q = QEMUMonitorProtocol(str(sock))
    q.connect()
    configure(q, channels)
    drop_caches()
    start = time.perf_counter()
    call(q, "migrate-incoming", {"uri": f"file:{save}"})
    wait(q)
    seconds = time.perf_counter() - start
    q.cmd_raw("quit", {})
    with contextlib.suppress(EOFError):
        q.close()
    proc.wait()
    sock.unlink(missing_ok=True)
    return seconds


def fio_read(save: Path, size: int) -> float:
    """Seconds by fio's own clock: one job, psync, 1 MiB blocks, O_DIRECT."""
    drop_caches()
    out = subprocess.run(
        ["fio", "--name=read", f"--filename={save}", "--direct=1", "--rw=read", "--bs=1M",
         "--ioengine=psync", f"--size={size}", "--output-format=json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return size / json.loads(out.stdout)["jobs"][0]["read"]["bw_bytes"]


def prefill(dst: Path, size: int, value: int) -> None:
    block = bytes([value]) * (64 << 20)
    with open(dst, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=int, default=4)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", type=Path, default=Path("/tmp"))
    p.add_argument("--device", default="vda", help="the block device under --dir")
    a = p.parse_args()
    size = a.size_gib * GiB
    work = Path(f"/tmp/migd-ab-{os.getpid()}")
    work.mkdir()
    save, src, dst = (
        a.dir / f"migd-ab-{os.getpid()}.img",
        Path("/dev/shm/ab-src"),
        Path("/dev/shm/ab-dst"),
    )
    daemons = {"migd": Migd(work / "a.sock", True, a.channels),
               "migd, populator off": Migd(work / "b.sock", False, a.channels)}  # fmt: skip
    try:
        with open(src, "wb") as f:
            for _ in range(size // (64 << 20)):
                f.write(os.urandom(64 << 20))
        daemons["migd"].migrate("migrate", f"file:{save}", src, size)
        src.unlink()
        results: dict[str, list[float]] = {}
        cases = [*daemons, "QEMU", "fio read"]
        for rnd in range(a.rounds):
            order = list(cases)
            random.Random(rnd).shuffle(order)
            for case in order:
                if case != "fio read":
                    prefill(dst, size, 0x11 * (1 + rnd % 15))
                with DiskWindows(a.device) as windows:
                    if case == "fio read":
                        seconds = fio_read(save, size)
                    elif case == "QEMU":
                        seconds = qemu_restore(work / "qemu.sock", save, dst, size, a.channels)
                    else:
                        seconds = daemons[case].migrate(
                            "migrate-incoming", f"file:{save}", dst, size
                        )
                gibs = size / GiB / seconds
                results.setdefault(case, []).append(gibs)
                shown = " ".join(f"{x:.2f}" for x in windows.gibs())
                print(f"round {rnd + 1} {case:20s} {gibs:.2f} GiB/s; disk, 0.5 s windows: {shown}",
                      flush=True)  # fmt: skip
        for case, values in results.items():
            print(f"{case:20s} median {statistics.median(values):.2f} GiB/s, rounds "
                  + " ".join(f"{x:.2f}" for x in values))  # fmt: skip
    finally:
        for d in daemons.values():
            d.close()
        for path in (save, src, dst, *work.iterdir()):
            path.unlink(missing_ok=True)
        work.rmdir()


if __name__ == "__main__":
    main()
