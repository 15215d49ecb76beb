"""migd's restore into used memory against the minimal loop (4 threads: O_DIRECT preadv
4 MiB into a THP buffer, xxh3-128 per MiB, pwrite into the memory file), same disk, alternated."""
import mmap, os, resource, subprocess, sys, threading, time, statistics as st
sys.path.insert(0, os.getcwd())
import xxhash
from pathlib import Path
from migd.bench.fastdisk import FastDisk
from migd.bench.processes import QMP, serve_argv, timed_migration, configure, cpu_times
MiB = 1 << 20; RUN = 4 * MiB; SIZE = 1536 * MiB
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
disk = FastDisk(2 * SIZE + 512 * MiB); outdir = disk.open()
src = f"{outdir}/probe-src"; img = f"{outdir}/probe-img"; mem = "/dev/shm/probe-mem"
procs = []
try:
    with open(src, "wb") as f:
        for _ in range(SIZE // (64 * MiB)): f.write(os.urandom(64 * MiB))
    with open(mem, "wb") as f:
        for _ in range(SIZE // (64 * MiB)): f.write(os.urandom(64 * MiB))
    os.sync()
    sock = Path("/tmp/p/gap.sock"); logf = open("/tmp/p/gap-daemon.log", "wb")
    p = subprocess.Popen(serve_argv(sock), stdout=logf, stderr=logf); procs.append(p)
    q = QMP(sock, p, Path("/tmp/p/gap-daemon.log"))
    q.execute("object-add", {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE, "mem-path": mem, "share": True})
    configure(q, 4, True)
    t = timed_migration(q, "migrate", {"uri": f"file:{img}"}, p.pid)
    print(f"save {SIZE/t.seconds/2**30:.2f} GiB/s", flush=True)
    fd = os.open(mem, os.O_RDWR)
    def thp(n):
        m = mmap.mmap(-1, n, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS); m.madvise(mmap.MADV_HUGEPAGE)
        m.write(b"\0" * n); return m
    def minimal(T=4):
        def ch(i):
            s = os.open(src, os.O_RDONLY | os.O_DIRECT); bm = thp(RUN); buf = memoryview(bm)
            for off in range(i * RUN, SIZE, T * RUN):
                n = os.preadv(s, [buf], off)
                for u in range(0, n, MiB): xxhash.xxh3_128_digest(buf[u:u + MiB])
                os.pwrite(fd, buf[:n], off)
            buf.release(); bm.close(); os.close(s)
        ts = [threading.Thread(target=ch, args=(i,)) for i in range(T)]
        [t.start() for t in ts]; [t.join() for t in ts]
    res = {"migd": [], "minimal": []}
    if os.environ.get("SAVE"):
        os.unlink(src); out = f"{outdir}/probe-out"
        with open(out, "wb") as f: f.truncate(SIZE)
        def minimal_save(T=4):
            def ch(i):
                o = os.open(out, os.O_WRONLY | os.O_DIRECT); bm = thp(RUN); buf = memoryview(bm)
                for off in range(i * RUN, SIZE, T * RUN):
                    n = os.preadv(fd, [buf], off)
                    for u in range(0, n, MiB): xxhash.xxh3_128_digest(buf[u:u + MiB])
                    os.pwrite(o, buf[:n], off)
                buf.release(); bm.close(); os.close(o)
            ts = [threading.Thread(target=ch, args=(i,)) for i in range(T)]
            [t.start() for t in ts]; [t.join() for t in ts]
        if os.environ.get("PERF"):
            pr = subprocess.Popen(["perf", "record", "-F", "1999", "-g", "-p", str(p.pid), "-o", "/tmp/p/perf-save.data"], stderr=subprocess.DEVNULL)
            time.sleep(1)
            for _ in range(3):
                os.unlink(img); timed_migration(q, "migrate", {"uri": f"file:{img}"}, p.pid)
            pr.send_signal(2); pr.wait()
            ROUNDS = 0
        for r in range(ROUNDS):
            for m in (["migd", "minimal"] if r % 2 == 0 else ["minimal", "migd"]):
                if m == "migd":
                    os.unlink(img)
                    tt = timed_migration(q, "migrate", {"uri": f"file:{img}"}, p.pid)
                    secs, cpu, sy = tt.seconds, tt.cpu, tt.cpu_sys
                else:
                    u0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
                    minimal_save()
                    secs = time.perf_counter() - t0; u1 = resource.getrusage(resource.RUSAGE_SELF)
                    cpu = u1.ru_utime - u0.ru_utime + u1.ru_stime - u0.ru_stime; sy = u1.ru_stime - u0.ru_stime
                g = SIZE / 2**30
                res[m].append((g / secs, cpu / g, sy / g))
                print(f"r{r} save {m}: {g/secs:.2f} GiB/s cpu {cpu/g:.3f} (sys {sy/g:.3f}) s/GiB", flush=True)
        ROUNDS = 0
    if os.environ.get("PERF") and not os.environ.get("SAVE"):
        if os.environ.get("PERF") == "spy":
            pr = subprocess.Popen(["/tmp/p/venv2/bin/py-spy", "record", "-r", "500", "-f", "raw", "-o", "/tmp/p/spy.txt", "-p", str(p.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2)
            for _ in range(4): timed_migration(q, "migrate-incoming", {"uri": f"file:{img}"}, p.pid)
            pr.send_signal(2); pr.wait()
        else:
          for who, pid, fn in (("migd", p.pid, lambda: [timed_migration(q, "migrate-incoming", {"uri": f"file:{img}"}, p.pid) for _ in range(3)]),
                             ("minimal", os.getpid(), lambda: [minimal() for _ in range(3)])):
            pr = subprocess.Popen(["perf", "record", "-F", "1999", "-g", "-p", str(pid), "-o", f"/tmp/p/perf-{who}.data"], stderr=subprocess.DEVNULL)
            time.sleep(1)
            fn()
            pr.send_signal(2); pr.wait()
        ROUNDS = 0
    for r in range(ROUNDS):
        for m in (["migd", "minimal"] if r % 2 == 0 else ["minimal", "migd"]):
            if m == "migd":
                tt = timed_migration(q, "migrate-incoming", {"uri": f"file:{img}"}, p.pid)
                secs, cpu, sy = tt.seconds, tt.cpu, tt.cpu_sys
            else:
                u0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
                minimal()
                secs = time.perf_counter() - t0; u1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu = u1.ru_utime - u0.ru_utime + u1.ru_stime - u0.ru_stime; sy = u1.ru_stime - u0.ru_stime
            g = SIZE / 2**30
            res[m].append((g / secs, cpu / g, sy / g))
            print(f"r{r} {m}: {g/secs:.2f} GiB/s cpu {cpu/g:.3f} (sys {sy/g:.3f}) s/GiB", flush=True)
    for m, v in res.items():
        if not v: continue
        print(f"median {m}: {st.median(x[0] for x in v):.2f} GiB/s cpu {st.median(x[1] for x in v):.3f} (sys {st.median(x[2] for x in v):.3f}) s/GiB")
finally:
    for p in procs: p.terminate(); p.wait()
    for f in (mem, src, img):
        try: os.unlink(f)
        except OSError: pass
    disk.close()
