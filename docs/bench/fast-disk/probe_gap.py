"""migd against the plainest loop that does the same work, on the fast disk, alternated.

Restore (default): migd's migrate-incoming into used memory against 4 threads that each
O_DIRECT preadv 4 MiB from a file into a huge-page buffer, hash every MiB (xxh3-128) and
pwrite it into the memory file. Save (SAVE=1): migd's migrate against 4 threads that each
pread 4 MiB from the memory file, hash it and write it with O_DIRECT. GiB/s and CPU s/GiB
(migd: its process; the loop: this one). PERF=1: instead, `perf record -g` of migd over 3
operations (and, for restores, of the loop over 3), into perf-migd.data / perf-plain.data
(PERF_EVENT=cpu-clock where hardware counters are missing; MIGD_STAGING=0 for a daemon
that reads into the mapping). PYSPY=1: `py-spy record --native --format raw` of migd over
8 operations into pyspy-migd.txt (collapsed stacks, busy samples only; py-spy is not one of
migd's dependencies: `pip install py-spy`).

    sudo .venv/bin/python docs/bench/fast-disk/probe_gap.py [ROUNDS]   # from the repo root
"""
import mmap, os, resource, shutil, subprocess, sys, tempfile, threading, time, statistics as st
sys.path.insert(0, os.getcwd())
import xxhash
from pathlib import Path
from migd.bench.fastdisk import FastDisk
from migd.bench.processes import QMP, serve_argv, timed_migration, configure
MiB = 1 << 20; RUN = 4 * MiB; SIZE = 1536 * MiB; GIB = SIZE / 2**30
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
OP = "save" if os.environ.get("SAVE") else "restore"
work = Path(tempfile.mkdtemp(prefix="probe-gap-"))
disk = FastDisk(2 * SIZE + 512 * MiB); outdir = disk.open()
plain_file = f"{outdir}/probe-plain"; img = f"{outdir}/probe-img"; mem = "/dev/shm/probe-mem"
procs = []


def random_file(path):
    with open(path, "wb") as f:
        for _ in range(SIZE // (64 * MiB)): f.write(os.urandom(64 * MiB))


def thp(n):
    m = mmap.mmap(-1, n, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS); m.madvise(mmap.MADV_HUGEPAGE)
    m.write(b"\0" * n); return m


def plain_loop(threads=4):
    """Read, hash and write every 4 MiB, each thread its share, in the direction of OP."""
    def body(i):
        disk_fd = os.open(plain_file, (os.O_RDONLY if OP == "restore" else os.O_WRONLY) | os.O_DIRECT)
        src, dst = (disk_fd, mem_fd) if OP == "restore" else (mem_fd, disk_fd)
        bm = thp(RUN); buf = memoryview(bm)
        for off in range(i * RUN, SIZE, threads * RUN):
            n = os.preadv(src, [buf], off)
            for u in range(0, n, MiB): xxhash.xxh3_128_digest(buf[u:u + MiB])
            os.pwrite(dst, buf[:n], off)
        buf.release(); bm.close(); os.close(disk_fd)
    ts = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    [t.start() for t in ts]; [t.join() for t in ts]


def migd_once():
    """(seconds, CPU s, system CPU s) of one migd save or restore."""
    if OP == "save":
        os.unlink(img)
        t = timed_migration(q, "migrate", {"uri": f"file:{img}"}, daemon.pid)
    else:
        t = timed_migration(q, "migrate-incoming", {"uri": f"file:{img}"}, daemon.pid)
    return t.seconds, t.cpu, t.cpu_sys


def plain_once():
    u0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
    plain_loop()
    secs = time.perf_counter() - t0; u1 = resource.getrusage(resource.RUSAGE_SELF)
    sys_cpu = u1.ru_stime - u0.ru_stime
    return secs, u1.ru_utime - u0.ru_utime + sys_cpu, sys_cpu


def perf(name, pid, once):
    # PERF_EVENT=cpu-clock where the CPU's counters are not exposed (the Intel machine).
    event = ["-e", os.environ["PERF_EVENT"]] if os.environ.get("PERF_EVENT") else []
    pr = subprocess.Popen(["perf", "record", *event, "-F", "1999", "-g", "-p", str(pid), "-o",
                           f"perf-{name}.data"], stderr=subprocess.DEVNULL)
    time.sleep(1)  # perf attached
    for _ in range(3): once()
    pr.send_signal(2); pr.wait()


try:
    random_file(mem); os.chmod(mem, 0o600)  # migd restores into no file others may read
    if OP == "restore":
        random_file(plain_file)
    else:
        with open(plain_file, "wb") as f: f.truncate(SIZE)
    os.sync()
    sock, log = work / "migd.sock", work / "migd.log"
    daemon = subprocess.Popen(serve_argv(sock), stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    procs.append(daemon)
    q = QMP(sock, daemon, log)
    q.execute("object-add", {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE,
                             "mem-path": mem, "share": True})
    configure(q, 4, True)
    t = timed_migration(q, "migrate", {"uri": f"file:{img}"}, daemon.pid)  # the restores' file
    print(f"save {GIB / t.seconds:.2f} GiB/s", flush=True)
    mem_fd = os.open(mem, os.O_RDWR)
    if os.environ.get("PERF"):
        perf("migd", daemon.pid, migd_once)
        if OP == "restore":
            perf("plain", os.getpid(), plain_once)
        ROUNDS = 0
    if os.environ.get("PYSPY"):
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--native",
                                "--threads", "--format", "raw", "-r", "500", "-o",
                                "pyspy-migd.txt", "-p", str(daemon.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)  # py-spy attached
        for _ in range(8): migd_once()
        spy.send_signal(2); spy.wait()
        ROUNDS = 0
    ways = {"migd": migd_once, "plain loop": plain_once}
    res = {name: [] for name in ways}
    for r in range(ROUNDS):
        for name in (list(ways) if r % 2 == 0 else list(reversed(ways))):
            secs, cpu, sys_cpu = ways[name]()
            res[name].append((GIB / secs, cpu / GIB, sys_cpu / GIB))
            print(f"r{r} {OP} {name}: {GIB / secs:.2f} GiB/s cpu {cpu / GIB:.3f} "
                  f"(sys {sys_cpu / GIB:.3f}) s/GiB", flush=True)
    for name, v in res.items():
        if v:
            print(f"median {OP} {name}: {st.median(x[0] for x in v):.2f} GiB/s cpu "
                  f"{st.median(x[1] for x in v):.3f} (sys {st.median(x[2] for x in v):.3f}) s/GiB")
finally:
    for p in procs: p.terminate(); p.wait()
    for f in (mem, plain_file, img):
        try: os.unlink(f)
        except OSError: pass
    shutil.rmtree(work, ignore_errors=True)
    disk.close()
