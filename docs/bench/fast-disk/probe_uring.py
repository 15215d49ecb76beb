"""io_uring (liburing 2024.5.3, built from its sdist: the 2026 wheels die with SIGILL on this CPU) against
 preadv threads, restore-like. Run with a venv holding liburing==2024.5.3 and xxhash, as root.

O_DIRECT read from the fast disk into staging buffers [+ xxh3 + pwrite into used memory]."""
import mmap, os, resource, sys, threading, time
sys.path.insert(0, os.getcwd())  # run from the repo root
import xxhash
import liburing as L
from migd.bench.fastdisk import FastDisk
MiB = 1 << 20; RUN = 4 * MiB; SIZE = 1536 * MiB
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
disk = FastDisk(SIZE + 512 * MiB); outdir = disk.open()
src = f"{outdir}/probe-src"; mem = "/dev/shm/probe-mem"
try:
    with open(src, "wb") as f:
        for _ in range(SIZE // (64 * MiB)): f.write(os.urandom(64 * MiB))
    os.sync()
    fd = os.open(mem, os.O_RDWR | os.O_CREAT); os.ftruncate(fd, SIZE)
    for off in range(0, SIZE, 64 * MiB): os.pwrite(fd, b"\x11" * (64 * MiB), off)
    def thp(n):
        m = mmap.mmap(-1, n, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS); m.madvise(mmap.MADV_HUGEPAGE)
        m.write(b"\0" * n); return m
    def consume(buf, off, n, full):
        if full:
            for u in range(0, n, MiB): xxhash.xxh3_128_digest(buf[u:u + MiB])
            os.pwrite(fd, buf[:n], off)
    def preadv_mode(full, T=4):
        def ch(i):
            s = os.open(src, os.O_RDONLY | os.O_DIRECT); bm = thp(RUN); buf = memoryview(bm)
            for off in range(i * RUN, SIZE, T * RUN):
                n = os.preadv(s, [buf], off); consume(buf, off, n, full)
            buf.release(); bm.close(); os.close(s)
        ts = [threading.Thread(target=ch, args=(i,)) for i in range(T)]
        [t.start() for t in ts]; [t.join() for t in ts]
    def uring_mode(full, T=2, D=2):
        def ch(i):
            s = os.open(src, os.O_RDONLY | os.O_DIRECT)
            ring = L.io_uring(); L.io_uring_queue_init(8, ring, 0)
            bms = [thp(RUN) for _ in range(D)]
            views = [memoryview(b) for b in bms]
            iovs = [L.iovec(v) for v in views]
            offs = list(range(i * RUN, SIZE, T * RUN)); nxt = 0; inflight = {}
            cqe = L.io_uring_cqe()
            def submit(slot):
                nonlocal nxt
                off = offs[nxt]; nxt += 1
                sqe = L.io_uring_get_sqe(ring)
                L.io_uring_prep_readv(sqe, s, iovs[slot], off)
                sqe.user_data = slot + 1; inflight[slot] = off
            for slot in range(min(D, len(offs))): submit(slot)
            L.io_uring_submit(ring)
            while inflight:
                L.io_uring_wait_cqe(ring, cqe)
                slot = cqe.user_data - 1; res = cqe.res
                L.io_uring_cqe_seen(ring, cqe)
                off = inflight.pop(slot)
                assert res == RUN, res
                consume(views[slot], off, res, full)
                if nxt < len(offs):
                    submit(slot); L.io_uring_submit(ring)
            L.io_uring_queue_exit(ring)
            del iovs
            for v in views: v.release()
            for b in bms: b.close()
            os.close(s)
        ts = [threading.Thread(target=ch, args=(i,)) for i in range(T)]
        [t.start() for t in ts]; [t.join() for t in ts]
    modes = {"preadv4": lambda f: preadv_mode(f, 4), "uring2x2": lambda f: uring_mode(f, 2, 2),
             "uring1x4": lambda f: uring_mode(f, 1, 4), "uring4x1": lambda f: uring_mode(f, 4, 1)}
    # correctness: uring full then compare hash of memory vs src
    uring_mode(True); 
    def h(path, direct=False):
        x = xxhash.xxh3_128()
        with open(path, "rb") as g:
            while (b := g.read(64 * MiB)): x.update(b)
        return x.hexdigest()
    assert h(mem) == h(src), "uring restore mismatch"
    print("uring restore verified", flush=True)
    res = {}
    for r in range(ROUNDS):
        order = list(modes) if r % 2 == 0 else list(reversed(modes))
        for full in (False, True):
            for m in order:
                u0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
                modes[m](full)
                t = time.perf_counter() - t0; u1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu = (u1.ru_utime - u0.ru_utime + u1.ru_stime - u0.ru_stime) / (SIZE / 1024 / MiB)
                sy = (u1.ru_stime - u0.ru_stime) / (SIZE / 1024 / MiB)
                res.setdefault((m, full), []).append((SIZE / t / 1024 / MiB, cpu, sy))
                print(f"r{r} {'full' if full else 'read'} {m}: {SIZE/t/1024/MiB:.2f} GiB/s cpu {cpu:.3f} (sys {sy:.3f}) s/GiB", flush=True)
    import statistics as st
    for (m, full), v in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"median {'full' if full else 'read'} {m}: {st.median(x[0] for x in v):.2f} GiB/s, cpu {st.median(x[1] for x in v):.3f} s/GiB (sys {st.median(x[2] for x in v):.3f})")
finally:
    os.close(fd) if 'fd' in dir() else None
    with __import__('contextlib').suppress(OSError): os.unlink(mem)
    with __import__('contextlib').suppress(OSError): os.unlink(src)
    disk.close()
