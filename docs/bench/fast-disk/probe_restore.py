"""Restore paths: O_DIRECT read into the populated mapping + hash through pread, vs into a
THP staging buffer, hash there, pwrite into the memory file. Into used memory (4 KiB tmpfs)."""
import fcntl, mmap, os, sys, time
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, "/work/main")
from migd.bench.fastdisk import FastDisk
import xxhash
MiB = 1 << 20; RUN = 4 * MiB; SIZE = int(1.5 * 1024) * MiB; CH = 4
memdir = sys.argv[1]; fast = sys.argv[2] == "fast"
disk = FastDisk(SIZE + 512 * MiB) if fast else None
outdir = disk.open() if disk else "/tmp"
mem = f"{memdir}/probe-mem"; src = f"{outdir}/probe-src"
with open(src, "wb") as f:
    for _ in range(SIZE // (64 * MiB)): f.write(os.urandom(64 * MiB))
os.sync()
def fill():
    fd = os.open(mem, os.O_RDWR | os.O_CREAT); os.ftruncate(fd, 0); os.ftruncate(fd, SIZE)
    for off in range(0, SIZE, 64 * MiB): os.pwrite(fd, b"\x11" * (64 * MiB), off)
    os.close(fd)
def zerocopy():
    fd = os.open(mem, os.O_RDWR)
    mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED); view = memoryview(mm)
    def ch(i):
        s = os.open(src, os.O_RDONLY | os.O_DIRECT); buf = bytearray(RUN)
        for off in range(i * RUN, SIZE, CH * RUN):
            mm.madvise(23, off, RUN)  # MADV_POPULATE_WRITE
            os.preadv(s, [view[off:off + RUN]], off)
            n = os.preadv(fd, [buf], off)
            for u in range(0, n, MiB): xxhash.xxh3_128_digest(memoryview(buf)[u:u + MiB])
        os.close(s)
    with ThreadPoolExecutor(CH) as ex: list(ex.map(ch, range(CH)))
    view.release(); mm.close(); os.close(fd)
def bounce():
    fd = os.open(mem, os.O_RDWR)
    mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)  # mapped as the backend is, never touched
    def ch(i):
        s = os.open(src, os.O_RDONLY | os.O_DIRECT)
        bm = mmap.mmap(-1, RUN, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS); bm.madvise(mmap.MADV_HUGEPAGE)
        buf = memoryview(bm)
        for off in range(i * RUN, SIZE, CH * RUN):
            os.preadv(s, [buf], off)
            for u in range(0, RUN, MiB): xxhash.xxh3_128_digest(buf[u:u + MiB])
            os.pwrite(fd, buf, off)
        os.close(s); buf.release(); bm.close()
    with ThreadPoolExecutor(CH) as ex: list(ex.map(ch, range(CH)))
    mm.close(); os.close(fd)
def bounce2():
    import queue, threading
    fd = os.open(mem, os.O_RDWR)
    mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)
    q = queue.SimpleQueue()
    def storer():
        while (item := q.get()) is not None:
            buf, off, free = item
            for u in range(0, RUN, MiB): xxhash.xxh3_128_digest(buf[u:u + MiB])
            os.pwrite(fd, buf, off)
            free.release()
    def ch(i):
        s = os.open(src, os.O_RDONLY | os.O_DIRECT)
        maps = []
        for _ in range(2):
            bm = mmap.mmap(-1, RUN, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS); bm.madvise(mmap.MADV_HUGEPAGE); maps.append(bm)
        bufs = [memoryview(b) for b in maps]; frees = [threading.Semaphore(1) for _ in bufs]
        k = 0
        for off in range(i * RUN, SIZE, CH * RUN):
            frees[k].acquire()
            os.preadv(s, [bufs[k]], off)
            q.put((bufs[k], off, frees[k]))
            k ^= 1
        for f in frees: f.acquire()
        os.close(s)
        for b in bufs: b.release()
        for b in maps: b.close()
    t = threading.Thread(target=storer); t.start()
    with ThreadPoolExecutor(CH) as ex: list(ex.map(ch, range(CH)))
    q.put(None); t.join()
    mm.close(); os.close(fd)
def same():
    with open(mem, "rb") as a, open(src, "rb") as b:
        for off in range(0, SIZE, 64 * MiB):
            if os.pread(a.fileno(), 64 * MiB, off) != os.pread(b.fileno(), 64 * MiB, off): return False
    return True
try:
    res = {}
    for rnd in range(5):
        for name, fn in (("zerocopy", zerocopy), ("bounce", bounce), ("bounce2", bounce2))[:: 1 if rnd % 2 == 0 else -1]:
            fill(); open("/proc/sys/vm/drop_caches", "w").write("1")
            t0 = os.times(); w0 = time.perf_counter(); fn(); w1 = time.perf_counter(); t1 = os.times()
            g = SIZE / (1 << 30)
            res.setdefault(name, []).append((w1 - w0, (t1.user - t0.user) / g, (t1.system - t0.system) / g))
            if rnd == 0: assert same(), name
    for k, v in res.items():
        w = sorted(x[0] for x in v)[2]
        print(f"{k:9s} {SIZE/(1<<30)/w:5.2f} GiB/s user {sorted(x[1] for x in v)[2]:.2f} sys {sorted(x[2] for x in v)[2]:.2f} s/GiB walls {[round(x[0],2) for x in v]}")
finally:
    for p in (mem, src):
        if os.path.exists(p): os.unlink(p)
    if disk: disk.close()
