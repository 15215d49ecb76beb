"""What a client's polling costs a migration: restores (OP=save: saves) of 1.5 GiB into
used memory in one daemon on the fast disk, 4 channels, direct-io, each timed to its
`completed` MIGRATION event, while the client waits for that event and every 10 ms does
one of (MODES, alternated round by round in mirrored order): event (nothing), qm
(query-migrate), ver (query-version: a wake-up of the daemon that computes nothing), proc
(reads the daemon's /proc/PID/status, as the bench samples its memory; wakes only the
client). Printed: GiB/s and the daemon's CPU s/GiB, medians, and each mode's ratio to the
first, round by round (docs/bench/fast-disk/README.md, "Session 27").

    sudo [MODES=event,qm,ver,proc] [OP=save] .venv/bin/python docs/bench/fast-disk/probe_polls.py [ROUNDS]
"""
import os, sys, time, subprocess, tempfile, statistics as st
sys.path.insert(0, os.getcwd())
from pathlib import Path
from migd.bench.fastdisk import FastDisk
from migd.bench.processes import (QMP, serve_argv, configure, cpu_times, rss_anon,
                                  event_time, _final_migration_event)
MiB = 1 << 20; SIZE = 1536 * MiB; GIB = SIZE / 2**30
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
MODES = os.environ.get("MODES", "event,qm,ver,proc").split(",")
OP = os.environ.get("OP", "restore")
work = Path(tempfile.mkdtemp(prefix="pm-"))
disk = FastDisk(SIZE + 512 * MiB); outdir = disk.open()
img = f"{outdir}/img"; mem = "/dev/shm/pm-mem"; procs = []

def once(mode):
    cmd = ("migrate-incoming" if OP == "restore" else "migrate")
    if OP == "save": os.unlink(img)
    q.events.clear(); c0 = sum(cpu_times(d.pid)); w0 = time.time()
    q.execute(cmd, {"uri": f"file:{img}"})
    n = 0
    while not q.wait_event(_final_migration_event, 0.01):
        n += 1
        if mode == "qm": q.execute("query-migrate")
        elif mode == "ver": q.execute("query-version")
        elif mode == "proc": rss_anon(d.pid)
    c1 = sum(cpu_times(d.pid))
    info = q.execute("query-migrate"); assert info["status"] == "completed", info
    secs = event_time(q.events, "completed") - w0
    return secs, c1 - c0, n

try:
    with open(mem, "wb") as f:
        for _ in range(SIZE // (64 * MiB)): f.write(os.urandom(64 * MiB))
    os.chmod(mem, 0o600)
    sock, log = work / "s", work / "log"
    d = subprocess.Popen(serve_argv(sock), stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    procs.append(d); q = QMP(sock, d, log)
    q.execute("object-add", {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE,
                             "mem-path": mem, "share": True})
    configure(q, 4, True)
    q.execute("migrate", {"uri": f"file:{img}"})
    while not q.wait_event(_final_migration_event, 1): pass
    res = {m: [] for m in MODES}
    for r in range(ROUNDS):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for m in order:
            secs, cpu, n = once(m)
            res[m].append((GIB / secs, cpu / GIB))
            print(f"r{r} {m}: {GIB/secs:.2f} GiB/s cpu {cpu/GIB:.3f} s/GiB ({n} polls)", flush=True)
    base = res[MODES[0]]
    for m, v in res.items():
        ratios = [a[0] / b[0] for a, b in zip(v, base)]
        print(f"median {m}: {st.median(x[0] for x in v):.2f} GiB/s cpu {st.median(x[1] for x in v):.3f}"
              f"  vs {MODES[0]} {st.median(ratios):.3f}x ({min(ratios):.2f}-{max(ratios):.2f})")
finally:
    for p in procs: p.terminate(); p.wait()
    for f in (mem, img):
        try: os.unlink(f)
        except OSError: pass
    disk.close()
