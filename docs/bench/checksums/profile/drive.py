"""Saves (checksums on, off) and restores (verify on, off) of --size GiB at CH channels,
direct-io, by serve.py's instrumented daemon; after each, the time inside UnitChecksums.done,
MemoryReader.copy and the channels' runs (wall and CPU, summed over the channels).

    PYTHONPATH=. .venv/bin/python docs/bench/checksums/profile/drive.py GIB ROUNDS CH
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from migd.bench.disk import drop_caches
from migd.bench.fill import fill_memory
from migd.bench.processes import QMP, configure, timed_migration

size = int(float(sys.argv[1]) * (1 << 30))
rounds = int(sys.argv[2])
CH = int(sys.argv[3])
d = Path(__file__).resolve().parent
run = Path("/tmp/migd-csum-profile")
run.mkdir(exist_ok=True)
shm = Path("/dev/shm/migd-csum-profile")
shm.mkdir(exist_ok=True)
work = run / "work"
work.mkdir(exist_ok=True)
src, dst = shm / "src", shm / "dst"
fill_memory(src, size, "random", seed=1)
with open(dst, "wb") as f:
    f.truncate(size)
sock = run / "s.sock"
log = open(run / "serve.log", "w")  # noqa: SIM115 (the daemon's log for its whole life)
proc = subprocess.Popen(
    [sys.executable, str(d / "serve.py"), "serve", "--socket", str(sock)], stderr=log, stdout=log
)
qmp = QMP(sock, proc, run / "serve.log")


def attach(mem):
    with contextlib.suppress(Exception):
        qmp.execute("object-del", {"id": "ram0"})
    qmp.execute(
        "object-add",
        {
            "qom-type": "memory-backend-file",
            "id": "ram0",
            "size": size,
            "mem-path": str(mem),
            "share": True,
        },
    )


def stats():
    os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(0.3)
    lines = [ln for ln in (run / "serve.log").read_text().splitlines() if ln.startswith("STATS")]
    return dict(kv.split("=") for kv in lines[-1].split()[1:]) if lines else {}


try:
    stats()
    img = work / "f.img"
    for _r in range(rounds):
        for op, val in (("save", True), ("save", False), ("restore", "on"), ("restore", "off")):
            if op == "save":
                attach(src)
                configure(qmp, CH, True, **{"max-bandwidth": 0})
                path = work / f"s-{val}.img"
                path.unlink(missing_ok=True)
                drop_caches(work, True)
                t = timed_migration(
                    qmp, "migrate", {"uri": f"file:{path}", "checksums": val}, proc.pid, False
                )
                if val:
                    path.replace(img)
                else:
                    path.unlink()
            else:
                attach(dst)
                configure(qmp, CH, True)
                drop_caches(work, True)
                t = timed_migration(
                    qmp, "migrate-incoming", {"uri": f"file:{img}", "verify": val}, proc.pid, False
                )
            s = stats()
            keep = {k: float(v) for k, v in s.items() if not k.endswith(" n") or True}
            print(
                f"{op} {val}: {t.seconds:.3f}s  cpu {t.cpu:.3f}s  "
                + "  ".join(f"{k}={v:.3f}" for k, v in keep.items()),
                flush=True,
            )
finally:
    proc.terminate()
    proc.wait()
    for p in (src, dst):
        p.unlink(missing_ok=True)
    shm.rmdir()
    for p in work.iterdir():
        p.unlink()
