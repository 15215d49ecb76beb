"""Save paths compared: O_DIRECT pwritev from the populated mapping vs splice through a pipe."""
import fcntl, mmap, os, sys, time, threading
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, "/work/main")
from migd.bench.fastdisk import FastDisk
import xxhash
MiB = 1 << 20; RUN = 4 * MiB; SIZE = int(1.5 * 1024) * MiB; CH = 4
memdir = sys.argv[1] if len(sys.argv) > 1 else "/dev/shm"
fast = len(sys.argv) > 2 and sys.argv[2] == "fast"
disk = FastDisk(SIZE * 2 + 512 * MiB) if fast else None
outdir = disk.open() if disk else "/tmp"
mem = f"{memdir}/probe-mem"
with open(mem, "wb") as f:
    for _ in range(SIZE // (64 * MiB)): f.write(os.urandom(64 * MiB))
out = f"{outdir}/probe-out"
def hashrun(fd, off, buf):
    n = os.preadv(fd, [buf], off); 
    for u in range(0, n, MiB): xxhash.xxh3_64_intdigest(buf[u:u + MiB])
def zerocopy(check):
    fd = os.open(mem, os.O_RDWR)
    mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)
    view = memoryview(mm)
    def ch(i):
        o = os.open(out, os.O_WRONLY | os.O_DIRECT)
        buf = bytearray(RUN)
        for off in range(i * RUN, SIZE, CH * RUN):
            mm.madvise(mmap.MADV_POPULATE_READ if hasattr(mmap, "MADV_POPULATE_READ") else 22, off, RUN)
            os.pwritev(o, [view[off:off + RUN]], off)
            if check: hashrun(fd, off, buf)
        os.close(o)
    with ThreadPoolExecutor(CH) as ex: list(ex.map(ch, range(CH)))
    view.release(); mm.close(); os.close(fd)
def spliced(check):
    fd = os.open(mem, os.O_RDONLY)
    def ch(i):
        o = os.open(out, os.O_WRONLY | os.O_DIRECT)
        r, w = os.pipe(); P = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, MiB)
        buf = bytearray(RUN)
        for off in range(i * RUN, SIZE, CH * RUN):
            for p in range(off, off + RUN, P):
                n = 0
                while n < P:
                    n += os.splice(fd, w, P - n, offset_src=p + n)
                m = 0
                while m < P:
                    m += os.splice(r, o, P - m, offset_dst=p + m)
            if check: hashrun(fd, off, buf)
        os.close(o); os.close(r); os.close(w)
    with ThreadPoolExecutor(CH) as ex: list(ex.map(ch, range(CH)))
    os.close(fd)
def bounce(check):
    fd = os.open(mem, os.O_RDONLY)
    def ch(i):
        o = os.open(out, os.O_WRONLY | os.O_DIRECT)
        bm = mmap.mmap(-1, RUN, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        bm.madvise(mmap.MADV_HUGEPAGE)
        buf = memoryview(bm)
        for off in range(i * RUN, SIZE, CH * RUN):
            n = os.preadv(fd, [buf], off)
            assert n == RUN
            if check:
                for u in range(0, n, MiB): xxhash.xxh3_64_intdigest(buf[u:u + MiB])
            os.pwritev(o, [buf], off)
        os.close(o); buf.release(); bm.close()
    with ThreadPoolExecutor(CH) as ex: list(ex.map(ch, range(CH)))
    os.close(fd)
def same():
    with open(mem, "rb") as a, open(out, "rb") as b:
        for off in range(0, SIZE, 64 * MiB):
            if os.pread(a.fileno(), 64 * MiB, off) != os.pread(b.fileno(), 64 * MiB, off): return False
    return True
try:
    res = {}
    for rnd in range(5):
        for name, fn in (("zerocopy", zerocopy), ("splice", spliced), ("bounce", bounce)):
            for check in (False, True):
                if os.path.exists(out): os.unlink(out)
                with open(out, "wb") as f: f.truncate(SIZE)
                os.sync(); open("/proc/sys/vm/drop_caches", "w").write("1")
                t0 = os.times(); w0 = time.perf_counter()
                fn(check)
                _f = os.open(out, os.O_RDONLY); os.fsync(_f); os.close(_f)
                w1 = time.perf_counter(); t1 = os.times()
                g = SIZE / (1 << 30)
                res.setdefault((name, check), []).append(((w1 - w0), (t1.user - t0.user) / g, (t1.system - t0.system) / g))
                if rnd == 0: assert same(), name
    for k, v in res.items():
        v.sort()
        w, u, s = v[len(v) // 2]
        print(f"{k[0]:9s} checksums={k[1]!s:5s} {SIZE/(1<<30)/w:5.2f} GiB/s  user {sorted(x[1] for x in v)[2]:.2f} sys {sorted(x[2] for x in v)[2]:.2f} s/GiB  walls {[round(x[0],2) for x in v]}")
finally:
    for p in (mem, out):
        if os.path.exists(p): os.unlink(p)
    if disk: disk.close()
