"""Which part of migd's save shape costs speed on the fast disk: plain save loops, no
daemon, against migd's own save, rounds alternated, 1.5 GiB of random data in a /dev/shm
memory file, 4 writers with 4 MiB O_DIRECT calls:

- four threads: each preads 4 MiB from the memory file into its buffer, hashes it a MiB
  at a time (xxh3-128) and writes it (probe_ceiling.py's "save, hashed");
- four threads + zero scan: the same with numpy's test of every page for zeros (migd's
  BufferReader way: bitwise_or.reduce over the page's words);
- one copier, four writers: one thread preads, (scans,) hashes into a ring of 8 buffers
  and hands them over a queue to four threads that only write (migd's Loader shape);
  two or four copiers: the same with the runs dealt out among them in turn;
- eight threads + zero scan: as four threads + zero scan, with eight;
- four threads + zero scan, one copying at a time: the reading, scanning and hashing
  under one lock, the writes side by side (migd's shape since session 24);
- migd: a daemon's save of the same memory (`migrate`), checksums and zero scan on.

The plain loops overwrite one file, whose blocks exist after the first round; NEWFILE=1
gives each a new file, sized and allocated first (as migd's saves on ext4 since session
24). DIR=/some/dir: the files there instead of on a fast disk (DIR=/tmp: the virtio disk).

ONLY="name;name": only those ways (names as printed).

Printed: GiB/s, CPU s/GiB (this process, or the daemon), medians of the rounds.

    sudo [DIR=...] [NEWFILE=1] .venv/bin/python docs/bench/fast-disk/probe_save_shape.py [ROUNDS]
"""
import contextlib, mmap, os, queue, resource, shutil, subprocess, sys, tempfile, threading, time, statistics as st
sys.path.insert(0, os.getcwd())
from pathlib import Path
import numpy as np
import xxhash
from migd.bench.fastdisk import FastDisk
from migd.bench.processes import QMP, serve_argv, timed_migration, configure
MiB = 1 << 20; RUN = 4 * MiB; SIZE = 1536 * MiB; GIB = SIZE / 2**30; PAGE = 4096
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
work = Path(tempfile.mkdtemp(prefix="probe-shape-"))
disk = FastDisk(2 * SIZE + 512 * MiB) if not os.environ.get("DIR") else None
outdir = disk.open() if disk else os.environ["DIR"]
img = f"{outdir}/shape-img"; migd_img = f"{outdir}/shape-migd.img"; mem = "/dev/shm/probe-shape-mem"
procs = []


def buffer():
    m = mmap.mmap(-1, RUN, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    return m


def prepare(view, scan):
    """Hash a 4 MiB buffer a MiB at a time; with `scan`, find its zero pages first."""
    if scan:
        words = np.frombuffer(view, dtype=np.uint64).reshape(-1, PAGE // 8)
        np.bitwise_or.reduce(words, axis=1) == 0
    for m in range(0, RUN, MiB):
        xxhash.xxh3_128_digest(view[m:m + MiB])


def four_threads(scan, threads=4, one_at_a_time=False):
    """`one_at_a_time`: the reading, scanning and hashing under one lock (migd's shape)."""
    copying = threading.Lock() if one_at_a_time else contextlib.nullcontext()

    def body(i):
        b = buffer(); v = memoryview(b)
        for at in range(i * RUN, SIZE, threads * RUN):
            with copying:
                os.preadv(mem_fd, [v], at)
                prepare(v, scan)
            os.pwritev(disk_fd, [v], at)
        v.release(); b.close()
    ts = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    [t.start() for t in ts]; [t.join() for t in ts]


def one_copier(scan, copiers=1):
    """`copiers` threads (each its share of the runs, in turn) feed the four writers."""
    ring = [buffer() for _ in range(8)]
    views = [memoryview(b) for b in ring]
    free = [threading.Semaphore(1) for _ in ring]
    ready: queue.SimpleQueue = queue.SimpleQueue()

    left = [copiers]
    lock = threading.Lock()

    def copier(c):
        for n, at in enumerate(range(0, SIZE, RUN)):
            if n % copiers != c:
                continue
            k = n % len(ring)
            free[k].acquire()
            os.preadv(mem_fd, [views[k]], at)
            prepare(views[k], scan)
            ready.put((k, at))
        with lock:
            left[0] -= 1
            if left[0] == 0:
                for _ in range(4):
                    ready.put(None)

    def writer():
        while (item := ready.get()) is not None:
            k, at = item
            os.pwritev(disk_fd, [views[k]], at)
            free[k].release()

    ts = [threading.Thread(target=copier, args=(c,)) for c in range(copiers)]
    ts += [threading.Thread(target=writer) for _ in range(4)]
    [t.start() for t in ts]; [t.join() for t in ts]
    for v in views: v.release()
    for b in ring: b.close()


def new_image():
    """NEWFILE=1: each plain loop writes a new file, sized and allocated first (fallocate),
    as migd's saves do; else they overwrite the one file, whose blocks exist."""
    global disk_fd
    if not os.environ.get("NEWFILE"):
        return
    os.close(disk_fd); os.unlink(img)
    disk_fd = os.open(img, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    os.ftruncate(disk_fd, SIZE); os.posix_fallocate(disk_fd, 0, SIZE)


def timed(body):
    def run():
        new_image()
        r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
        body()
        secs = time.perf_counter() - t0; r1 = resource.getrusage(resource.RUSAGE_SELF)
        return secs, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return run


def migd_once():
    os.unlink(migd_img)
    t = timed_migration(q, "migrate", {"uri": f"file:{migd_img}"}, daemon.pid)
    return t.seconds, t.cpu


try:
    with open(mem, "wb") as f:
        for _ in range(SIZE // (64 * MiB)): f.write(os.urandom(64 * MiB))
    os.chmod(mem, 0o600)
    with open(img, "wb") as f: f.truncate(SIZE)
    mem_fd = os.open(mem, os.O_RDONLY); disk_fd = os.open(img, os.O_WRONLY | os.O_DIRECT)
    sock, log = work / "migd.sock", work / "migd.log"
    daemon = subprocess.Popen(serve_argv(sock), stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    procs.append(daemon)
    q = QMP(sock, daemon, log)
    q.execute("object-add", {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE,
                             "mem-path": mem, "share": True})
    configure(q, 4, True)
    open(migd_img, "wb").close()
    ways = {"four threads": timed(lambda: four_threads(False)),
            "four threads + zero scan": timed(lambda: four_threads(True)),
            "eight threads + zero scan": timed(lambda: four_threads(True, 8)),
            "one copier, four writers": timed(lambda: one_copier(False)),
            "one copier + zero scan, four writers": timed(lambda: one_copier(True)),
            "two copiers, four writers": timed(lambda: one_copier(False, 2)),
            "four copiers, four writers": timed(lambda: one_copier(False, 4)),
            "four threads + zero scan, one copying at a time": timed(lambda: four_threads(True, 4, True)),
            "migd (daemon)": migd_once}
    if os.environ.get("ONLY"):  # ONLY="four threads + zero scan;migd (daemon)": those ways
        ways = {name: ways[name] for name in os.environ["ONLY"].split(";")}
    res = {name: [] for name in ways}
    for r in range(ROUNDS):
        for name in (list(ways) if r % 2 == 0 else list(reversed(ways))):
            secs, cpu = ways[name]()
            res[name].append((GIB / secs, cpu / GIB))
    print(f"{time.strftime('%Y-%m-%d %H:%M')} UTC, {ROUNDS} rounds alternated, medians (min-max GiB/s)")
    for name, v in res.items():
        speeds = [x[0] for x in v]
        print(f"{name}: {st.median(speeds):.2f} GiB/s ({min(speeds):.2f}-{max(speeds):.2f}), "
              f"{st.median(x[1] for x in v):.3f} CPU s/GiB")
finally:
    for p in procs: p.terminate(); p.wait()
    for f in (mem,):
        try: os.unlink(f)
        except OSError: pass
    shutil.rmtree(work, ignore_errors=True)
    if disk: disk.close()
    else: os.unlink(img); os.unlink(migd_img)
