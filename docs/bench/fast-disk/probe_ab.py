"""A/B: two daemons (old tree, new tree), alternated saves and restores into used memory
of 1.5 GiB on the fast disk, 4 channels, direct-io; GiB/s and daemon CPU s/GiB. Each
daemon imports migd from its tree (its working directory); the old one is a worktree:

    git worktree add /tmp/wt-old <commit>
    sudo OLD_TREE=/tmp/wt-old [SIZE_MIB=1536] .venv/bin/python docs/bench/fast-disk/probe_ab.py [ROUNDS]

DIR=/some/dir: the image files there instead of on a fast disk (DIR=/tmp: the virtio disk).
EMPTY=1: each restore into an empty memory file (truncated to 0 and back just before).
FRESH=1: each restore into a backend added again just before (object-del, object-add): one
the daemon has not mapped yet, as a restore into a new VM's memory finds it.
FILL=zero75 (zero30, holes75): the memory as the bench's rows of that name fill it, not random
(filled again before each save where restores run: a restore makes zero pages holes).
OPS=save (or restore): those operations only (a restore needs a save's file first).
DROP=1: the page cache dropped before each operation (sync, drop_caches), as the bench does.
SERVE_ARGS="--log-level debug": extra `migd serve` arguments; each restore line then also
counts the daemon's "new pages are dear" messages so far (io/threads.py NewPages) and its
"store their own runs" ones (StorerLoad).
"""
import os, subprocess, sys, tempfile, statistics as st
from pathlib import Path
sys.path.insert(0, os.getcwd())
from migd.bench.fastdisk import FastDisk
from migd.bench.fill import fill_memory
from migd.bench.processes import QMP, serve_argv, timed_migration, configure
MiB = 1 << 20; SIZE = int(os.environ.get("SIZE_MIB", "1536")) * MiB; G = SIZE / 2**30
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 6
OPS = os.environ.get("OPS", "save,restore").split(",")
trees = {"old": os.environ["OLD_TREE"], "new": os.getcwd()}
work = Path(tempfile.mkdtemp(prefix="probe-ab-"))
disk = FastDisk(3 * SIZE + 512 * MiB) if not os.environ.get("DIR") else None
outdir = disk.open() if disk else os.environ["DIR"]
procs = []; mems = {}
try:
    d = {}
    for name, tree in trees.items():
        mem = f"/dev/shm/ab-{name}"; mems[name] = mem
        if os.environ.get("FILL"):  # the bench's memory kinds: zero75, zero30, holes75
            fill_memory(Path(mem), SIZE, os.environ["FILL"], seed=1)
        else:
            with open(mem, "wb") as f:
                for _ in range(SIZE // (64 * MiB)): f.write(os.urandom(64 * MiB))
        os.chmod(mem, 0o600)
        sock, log = work / f"{name}.sock", work / f"{name}.log"
        p = subprocess.Popen(serve_argv(sock, *os.environ.get("SERVE_ARGS", "").split()), cwd=tree, stdout=open(log, "wb"), stderr=subprocess.STDOUT); procs.append(p)
        q = QMP(sock, p, log)
        q.execute("object-add", {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE, "mem-path": mem, "share": True})
        configure(q, 4, True)
        d[name] = (p, q)
    res = {}
    for r in range(ROUNDS):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        for op in OPS:
            for name in order:
                p, q = d[name]; img = f"{outdir}/ab-{name}.img"
                if os.environ.get("DROP"):  # as the bench does before every operation
                    os.sync(); Path("/proc/sys/vm/drop_caches").write_text("3\n")
                if op == "save":
                    if os.environ.get("FILL") and "restore" in OPS:
                        # a restore left the zero pages holes: zero pages again
                        fill_memory(Path(mems[name]), SIZE, os.environ["FILL"], seed=1)
                    if os.path.exists(img): os.unlink(img)
                    t = timed_migration(q, "migrate", {"uri": f"file:{img}"}, p.pid)
                else:
                    if os.environ.get("FRESH"):  # a backend the daemon has not mapped yet
                        q.execute("object-del", {"id": "ram0"})
                        q.execute("object-add", {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE, "mem-path": mems[name], "share": True})
                    if os.environ.get("EMPTY"):  # restore into an empty memory file
                        with open(mems[name], "r+b") as f:
                            os.ftruncate(f.fileno(), 0); os.ftruncate(f.fileno(), SIZE)
                    t = timed_migration(q, "migrate-incoming", {"uri": f"file:{img}"}, p.pid)
                res.setdefault((op, name), []).append((G / t.seconds, t.cpu / G))
                lat = sorted(t.latencies)
                print(f"r{r} {op} {name}: {G/t.seconds:.2f} GiB/s {t.cpu/G:.3f} CPU s/GiB; query-migrate max {lat[-1]*1000:.1f} ms, 2nd {lat[-2]*1000:.1f} ms ({len(lat)} polls); dear so far {(work / (name + '.log')).read_text().count(' is dear ')}; own runs so far {(work / (name + '.log')).read_text().count('store their own runs')}", flush=True)
    for op in OPS:
        o, n = res[(op, "old")], res[(op, "new")]
        ratios = [b[0] / a[0] for a, b in zip(o, n)]
        print(f"{op}: old {st.median(x[0] for x in o):.2f} GiB/s {st.median(x[1] for x in o):.3f} CPU; "
              f"new {st.median(x[0] for x in n):.2f} GiB/s {st.median(x[1] for x in n):.3f} CPU; "
              f"new/old speed median {st.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})")
finally:
    for p in procs: p.terminate(); p.wait()
    for m in mems.values():
        try: os.unlink(m)
        except OSError: pass
    disk and disk.close()
