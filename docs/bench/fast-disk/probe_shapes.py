"""Restore shapes as plain loops, no daemon: 1.5 GiB from a file on the fast disk (or
DIR) into a memory file in /dev/shm whose pages are all present, 4 channels (threads
with their own O_DIRECT fd), 4 MiB runs, each MiB hashed (xxh3-128) before the run is
written with pwrite. Alternated round by round; GiB/s and this process's CPU s/GiB.

- storer: each channel reads into two buffers in turn, one Storer thread hashes and
  writes (migd's shape until session 26);
- storer2: the channels read and hash, the Storer only writes;
- inline: each channel reads, hashes and writes its own runs, one buffer;
- inlinel: inline, the writes under one lock (waiters sleep instead of spinning on the
  memory file's inode lock); inline2buf: the same with two buffers in turn; inlinel8:
  two threads per channel fd;
- uring / uringl: inline (/ with the lock), the next run's read in flight through
  io_uring (uring_ring.py: a minimal ring in ctypes) while the last one is hashed and
  written;
- hybrid: the Storer, a channel that finds it busy (HY runs handed and not yet written)
  stores its own run;
- adaptive: the Storer until the channels waited for buffers over FRAC of their time in
  a WIN-byte window, then inline (two buffers in turn);
- adaptive2: the Storer until it was idle under IDLE of its time over WIN bytes, then
  inline with one buffer (migd's shape since session 26, io/threads.py StorerLoad); the
  first window only warms up (WARMUP=0: it decides too).

    sudo [DIR=/tmp/abv] [ONLY="storer;inlinel;adaptive2"] [WIN=33554432] \
        .venv/bin/python docs/bench/fast-disk/probe_shapes.py [ROUNDS]   # from the repo root
"""
import mmap, os, queue, resource, sys, threading, time, statistics as st
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xxhash
from uring_ring import Ring
from migd.bench.fastdisk import FastDisk
MiB = 1 << 20; RUN = 4 * MiB; SIZE = 1536 * MiB; GIB = SIZE / 2**30; T = 4
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
ONLY = os.environ.get("ONLY", "storer;inline;uring").split(";")
disk = None
if os.environ.get("DIR"):
    outdir = os.environ["DIR"]; os.makedirs(outdir, exist_ok=True)
else:
    disk = FastDisk(SIZE + 512 * MiB); outdir = disk.open()
src = f"{outdir}/shapes-src"; mem = "/dev/shm/probe-shapes-mem"


def thp(n):
    m = mmap.mmap(-1, n, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS); m.madvise(mmap.MADV_HUGEPAGE)
    m.write(b"\0" * n); return m


import ctypes
def address(m):
    c = ctypes.c_char.from_buffer(m); a = ctypes.addressof(c); del c; return a


bufs = [[thp(RUN) for _ in range(2)] for _ in range(T)]


def store(fd, buf, off, n, lock=None):
    """Hash each MiB of the run, then write it (under `lock`, if given)."""
    for u in range(0, n, MiB): xxhash.xxh3_128_digest(buf[u:u + MiB])
    if lock is None:
        os.pwrite(fd, buf[:n], off)
    else:
        with lock:
            os.pwrite(fd, buf[:n], off)


def inline():
    def body(i):
        s = os.open(src, os.O_RDONLY | os.O_DIRECT); buf = memoryview(bufs[i][0])
        for off in range(i * RUN, SIZE, T * RUN):
            n = os.preadv(s, [buf], off); store(memfd, buf, off, n)
        buf.release(); os.close(s)
    run_threads(body)


store_lock = threading.Lock()


def inline_lock():
    """Inline, the pwrite under a lock of the job's (waiters sleep, not spin)."""
    def body(i):
        s = os.open(src, os.O_RDONLY | os.O_DIRECT); buf = memoryview(bufs[i][0])
        for off in range(i * RUN, SIZE, T * RUN):
            n = os.preadv(s, [buf], off)
            store(memfd, buf, off, n, store_lock)
        buf.release(); os.close(s)
    run_threads(body)


def uring(lock=None):
    def body(i):
        s = os.open(src, os.O_RDONLY | os.O_DIRECT); r = Ring(4)
        views = [memoryview(b) for b in bufs[i]]; addrs = [address(b) for b in bufs[i]]
        offs = list(range(i * RUN, SIZE, T * RUN))
        r.read(s, addrs[0], RUN, offs[0], 0); r.enter(0)
        for k, off in enumerate(offs):
            if k + 1 < len(offs):
                r.read(s, addrs[(k + 1) & 1], RUN, offs[k + 1], k + 1); r.enter(0)
            ud, res = r.reap(); assert ud == k and res == RUN, (ud, k, res)
            store(memfd, views[k & 1], off, res, lock)
        [v.release() for v in views]; r.close(); os.close(s)
    run_threads(body)


def inline_lock8():
    """Inline with the store lock, two threads per channel (8)."""
    def body(i):
        s = os.open(src, os.O_RDONLY | os.O_DIRECT); buf = memoryview(bufs[i // 2][i % 2])
        for off in range(i * RUN, SIZE, 2 * T * RUN):
            n = os.preadv(s, [buf], off)
            store(memfd, buf, off, n, store_lock)
        buf.release(); os.close(s)
    ts = [threading.Thread(target=body, args=(i,)) for i in range(2 * T)]
    [t.start() for t in ts]; [t.join() for t in ts]


def hybrid():
    """Storer shape; a channel that finds the Storer busy checks and stores its own run
    (hash outside, pwrite under the job's store lock, as the Storer's)."""
    q = queue.SimpleQueue(); busy = [0]
    def st_body():
        while (item := q.get()) is not None:
            buf, off, n, free = item
            store(memfd, buf, off, n, store_lock)
            busy[0] -= 1; free.release()
    def body(i):
        s = os.open(src, os.O_RDONLY | os.O_DIRECT)
        pairs = [(memoryview(b), threading.Semaphore(1)) for b in bufs[i]]
        for k, off in enumerate(range(i * RUN, SIZE, T * RUN)):
            buf, free = pairs[k & 1]; free.acquire()
            n = os.preadv(s, [buf], off)
            if busy[0] >= HY:
                store(memfd, buf, off, n, store_lock)
                free.release()
            else:
                busy[0] += 1; q.put((buf, off, n, free))
        for buf, free in pairs: free.acquire(); buf.release()
        os.close(s)
    stt = threading.Thread(target=st_body); stt.start()
    run_threads(body); q.put(None); stt.join()


def adaptive():
    """Storer shape until the channels are seen waiting for their buffers (the Storer
    bounds the job): then every channel checks and stores its own runs, under the lock."""
    q = queue.SimpleQueue(); state = {"inline": False, "waited": 0.0, "bytes": 0, "t0": time.perf_counter()}
    lock = threading.Lock()
    def st_body():
        while (item := q.get()) is not None:
            buf, off, n, free = item
            store(memfd, buf, off, n, store_lock)
            free.release()
    def body(i):
        s = os.open(src, os.O_RDONLY | os.O_DIRECT)
        pairs = [(memoryview(b), threading.Semaphore(1)) for b in bufs[i]]
        for k, off in enumerate(range(i * RUN, SIZE, T * RUN)):
            buf, free = pairs[k & 1]
            w0 = time.perf_counter(); free.acquire(); w = time.perf_counter() - w0
            n = os.preadv(s, [buf], off)
            if state["inline"]:
                store(memfd, buf, off, n, store_lock)
                free.release(); continue
            q.put((buf, off, n, free))
            with lock:
                state["waited"] += w; state["bytes"] += n
                if state["bytes"] >= WIN:
                    el = time.perf_counter() - state["t0"]
                    if state["waited"] > FRAC * T * el:
                        state["inline"] = True; adaptive.at = off
                    state["waited"] = 0.0; state["bytes"] = 0; state["t0"] = time.perf_counter()
        for buf, free in pairs: free.acquire(); buf.release()
        os.close(s)
    stt = threading.Thread(target=st_body); stt.start()
    run_threads(body); q.put(None); stt.join()
    adaptive.switched = state["inline"]
adaptive.at = 0


WIN = int(os.environ.get("WIN", str(64 * MiB))); FRAC = float(os.environ.get("FRAC", "0.3"))
HY = int(os.environ.get("HY", "1"))


def adaptive2():
    """As adaptive, judged by the Storer's idle time: under IDLE of a window -> inline."""
    q = queue.SimpleQueue(); state = {"inline": False}
    def st_body():
        idle, nbytes, since, warm = 0.0, 0, None, not WARMUP
        while True:
            w0 = time.perf_counter(); item = q.get(); w1 = time.perf_counter()
            if item is None: break
            if since is None: since = w1
            else: idle += w1 - w0
            buf, off, n, free = item
            store(memfd, buf, off, n, store_lock)
            free.release()
            nbytes += n
            if nbytes >= WIN and not state["inline"]:
                now = time.perf_counter()
                if not warm:
                    warm = True
                elif idle < IDLE * (now - since):
                    state["inline"] = True; adaptive2.at = off
                idle, nbytes, since = 0.0, 0, now
    def body(i):
        s = os.open(src, os.O_RDONLY | os.O_DIRECT)
        pairs = [(memoryview(b), threading.Semaphore(1)) for b in bufs[i]]
        for k, off in enumerate(range(i * RUN, SIZE, T * RUN)):
            buf, free = pairs[0 if state["inline"] else k & 1]
            free.acquire()
            n = os.preadv(s, [buf], off)
            if state["inline"]:
                store(memfd, buf, off, n, store_lock)
                free.release(); continue
            q.put((buf, off, n, free))
        for buf, free in pairs: free.acquire(); buf.release()
        os.close(s)
    stt = threading.Thread(target=st_body); stt.start()
    run_threads(body); q.put(None); stt.join()
    adaptive2.switched = state["inline"]
adaptive2.at = 0
IDLE = float(os.environ.get("IDLE", "0.1"))
WARMUP = os.environ.get("WARMUP", "1") == "1"  # the first window decides nothing


def inline2buf():
    def body(i):
        s = os.open(src, os.O_RDONLY | os.O_DIRECT); views = [memoryview(b) for b in bufs[i]]
        for k, off in enumerate(range(i * RUN, SIZE, T * RUN)):
            buf = views[k & 1]
            n = os.preadv(s, [buf], off)
            store(memfd, buf, off, n, store_lock)
        [v.release() for v in views]; os.close(s)
    run_threads(body)


def uring_lock():
    uring(store_lock)


def storer():
    q = queue.SimpleQueue()
    def st_body():
        while (item := q.get()) is not None:
            buf, off, n, free = item; store(memfd, buf, off, n); free.release()
    def body(i):
        s = os.open(src, os.O_RDONLY | os.O_DIRECT)
        pairs = [(memoryview(b), threading.Semaphore(1)) for b in bufs[i]]
        for k, off in enumerate(range(i * RUN, SIZE, T * RUN)):
            buf, free = pairs[k & 1]; free.acquire()
            n = os.preadv(s, [buf], off); q.put((buf, off, n, free))
        for buf, free in pairs: free.acquire(); buf.release()
        os.close(s)
    stt = threading.Thread(target=st_body); stt.start()
    run_threads(body); q.put(None); stt.join()


def storer2():
    """Channels read and hash, the one Storer only writes."""
    q = queue.SimpleQueue()
    def st_body():
        while (item := q.get()) is not None:
            buf, off, n, free = item; os.pwrite(memfd, buf[:n], off); free.release()
    def body(i):
        s = os.open(src, os.O_RDONLY | os.O_DIRECT)
        pairs = [(memoryview(b), threading.Semaphore(1)) for b in bufs[i]]
        for k, off in enumerate(range(i * RUN, SIZE, T * RUN)):
            buf, free = pairs[k & 1]; free.acquire()
            n = os.preadv(s, [buf], off)
            for u in range(0, n, MiB): xxhash.xxh3_128_digest(buf[u:u + MiB])
            q.put((buf, off, n, free))
        for buf, free in pairs: free.acquire(); buf.release()
        os.close(s)
    stt = threading.Thread(target=st_body); stt.start()
    run_threads(body); q.put(None); stt.join()


def run_threads(body):
    ts = [threading.Thread(target=body, args=(i,)) for i in range(T)]
    [t.start() for t in ts]; [t.join() for t in ts]


try:
    with open(src, "wb") as f:
        for _ in range(SIZE // (64 * MiB)): f.write(os.urandom(64 * MiB))
    os.sync()
    memfd = os.open(mem, os.O_RDWR | os.O_CREAT); os.ftruncate(memfd, SIZE)
    for off in range(0, SIZE, 64 * MiB): os.pwrite(memfd, b"\x11" * (64 * MiB), off)
    fns = {"adaptive2": adaptive2, "inline2buf": inline2buf, "adaptive": adaptive, "hybrid": hybrid, "inlinel8": inline_lock8, "uringl": uring_lock, "inlinel": inline_lock, "storer": storer, "storer2": storer2, "inline": inline, "uring": uring}
    res = {k: [] for k in ONLY}
    for rnd in range(ROUNDS):
        for name in (ONLY if rnd % 2 == 0 else ONLY[::-1]):
            u0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
            fns[name].at = 0
            fns[name]()
            secs = time.perf_counter() - t0; u1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = u1.ru_utime - u0.ru_utime + u1.ru_stime - u0.ru_stime
            res[name].append((GIB / secs, cpu / GIB))
            print(f"round {rnd} {name:7s} {GIB / secs:6.2f} GiB/s {cpu / GIB:.3f} CPU s/GiB"
                  + (f" switched={fns[name].switched} at {fns[name].at / MiB:.0f} MiB" if name.startswith("adaptive") else ""), flush=True)
    for name in ONLY:
        print(f"median {name:7s} {st.median(g for g, _ in res[name]):6.2f} GiB/s "
              f"{st.median(c for _, c in res[name]):.3f} CPU s/GiB")
finally:
    for p in (src, mem):
        try: os.unlink(p)
        except OSError: pass
    if disk: disk.close()
