"""How a new file's blocks being allocated ahead changes O_DIRECT writes into it: plain
loops, no daemon, 1.5 GiB, four threads writing 4 MiB calls of random data in turn, ways
alternated round by round, medians (min-max) printed:

- new: a new, empty file (each write allocates, and extends the file);
- size: a new file sized first (ftruncate; as migd's saves are: their head ends past the
  pages), each write allocating into a hole;
- size+fallocate: sized, then all its blocks allocated with one fallocate before the
  writes (what migration/mapped_ram/page_slots.py does on ext4);
- size+each: sized, each thread allocating its 4 MiB just before writing it;
- size+ahead: sized, a helper thread allocating 64 MiB at a time beside the writers;
- overwrite: the last round's file written again, its blocks all there.

ext4 takes its inode lock exclusively for an O_DIRECT write that allocates or extends,
so such writes go one at a time; into allocated blocks they share it.

    sudo .venv/bin/python docs/bench/fast-disk/probe_alloc.py [ROUNDS]        # the fast disk
    sudo DIR=/tmp/x .venv/bin/python docs/bench/fast-disk/probe_alloc.py [ROUNDS]   # a directory
"""
import mmap, os, sys, threading, time, statistics as st
sys.path.insert(0, os.getcwd())  # run from the repo root
from migd.bench.fastdisk import FastDisk
MiB = 1 << 20; RUN = 4 * MiB; SIZE = 1536 * MiB; T = 4
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 6
disk = FastDisk(SIZE + 512 * MiB) if not os.environ.get("DIR") else None
outdir = disk.open() if disk else os.environ["DIR"]
path = f"{outdir}/alloc-probe.img"
bufs = []
for _ in range(T):
    m = mmap.mmap(-1, RUN); m.write(os.urandom(RUN)); bufs.append(m)


def writes(fd, each=False):
    def body(i):
        for at in range(i * RUN, SIZE, T * RUN):
            if each: os.posix_fallocate(fd, at, RUN)
            os.pwritev(fd, [bufs[i]], at)
    ts = [threading.Thread(target=body, args=(i,)) for i in range(T)]
    [t.start() for t in ts]; [t.join() for t in ts]


def way(name):
    if name != "overwrite" and os.path.exists(path): os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    t0 = time.perf_counter()
    if name.startswith("size"): os.ftruncate(fd, SIZE)
    if name == "size+fallocate": os.posix_fallocate(fd, 0, SIZE)
    helper = None
    if name == "size+ahead":
        def ahead():
            for at in range(0, SIZE, 64 * MiB): os.posix_fallocate(fd, at, 64 * MiB)
        helper = threading.Thread(target=ahead); helper.start()
    writes(fd, each=name == "size+each")
    if helper: helper.join()
    os.fdatasync(fd)
    secs = time.perf_counter() - t0
    os.close(fd)
    return SIZE / 2**30 / secs


try:
    ways = ["new", "size", "size+fallocate", "size+each", "size+ahead", "overwrite"]
    res = {w: [] for w in ways}
    way("new")  # a file for the first round's overwrite
    for r in range(ROUNDS):
        for w in (ways if r % 2 == 0 else ways[::-1]):
            res[w].append(way(w))
    print(f"{time.strftime('%Y-%m-%d %H:%M')} UTC, {outdir}, {ROUNDS} rounds alternated")
    for w in ways:
        print(f"{w}: {st.median(res[w]):.2f} GiB/s ({min(res[w]):.2f}-{max(res[w]):.2f})")
finally:
    if os.path.exists(path): os.unlink(path)
    if disk: disk.close()
