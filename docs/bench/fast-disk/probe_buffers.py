"""Where a save's or a restore's buffers come from, as plain loops on the fast disk,
alternated (session 28). 4 threads, 1.5 GiB in 4 MiB O_DIRECT calls, between a file on the
fast disk (ext4 on a loop device over tmpfs, allocated first) and a memory file in /dev/shm.

SET=sources (the default): O_DIRECT writes from
- reuse4k: each thread's own anonymous 4 MiB buffer, 4 KiB pages, used over and over (the
  bench's Python write line; fio's buffers are alike);
- reusethp: the same on transparent huge pages (migd's staging buffers);
- two_thp: two such buffers in turn;
- mapping_moving: the memory file's mapping (tmpfs, 4 KiB pages, every page mapped), each
  call the next 4 MiB (a save without staging, its mapping already made);
- mapping_reused: one 4 MiB of that mapping per thread, over and over;
- anon_moving: a 1.5 GiB anonymous buffer, each call the next 4 MiB;
- staged_thp: pread of the memory file into a huge-page buffer, then the write (migd's
  staged save without checksums).
SET=staged: migd's staged save and restore with their staging buffers on anonymous huge
pages (migd's) or in a memfd (shmem, 4 KiB pages here): save = pread from the memory file
into the buffer, xxh3-128 per MiB, O_DIRECT write; restore = O_DIRECT read into the buffer,
xxh3-128 per MiB, pwrite into the memory file.
Printed: GiB/s and this process's CPU s/GiB, medians (min-max).

    sudo [SET=staged] .venv/bin/python docs/bench/fast-disk/probe_buffers.py [ROUNDS]   # repo root
"""
import mmap, os, resource, sys, threading, time, statistics as st
sys.path.insert(0, os.getcwd())
import xxhash
from migd.bench.fastdisk import FastDisk
MiB = 1 << 20; RUN = 4 * MiB; SIZE = 1536 * MiB; GIB = SIZE / 2**30
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
SET = os.environ.get("SET", "sources")
disk = FastDisk(SIZE + 512 * MiB); out = disk.open()
img = f"{out}/probe-buffers-img"; mem = "/dev/shm/probe-buffers-mem"
with open(mem, "wb") as f:
    for _ in range(SIZE // (64 * MiB)): f.write(os.urandom(64 * MiB))
fd_mem = os.open(mem, os.O_RDWR)
fd_img = os.open(img, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
os.posix_fallocate(fd_img, 0, SIZE)


def offsets(i): return range(i * RUN, SIZE, 4 * RUN)


def anon(thp):
    b = mmap.mmap(-1, RUN, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if thp: b.madvise(mmap.MADV_HUGEPAGE)
    b.write(os.urandom(RUN)); return b


def thp(): return anon(True)


def shm():
    fd = os.memfd_create("stage"); os.ftruncate(fd, RUN); b = mmap.mmap(fd, RUN); os.close(fd)
    b.write(b"\1" * RUN); return b


def source_ways():
    mapping = mmap.mmap(fd_mem, SIZE); view = memoryview(mapping)
    for at in range(0, SIZE, MiB): view[at]  # touch: map every page
    big = mmap.mmap(-1, SIZE); big.write(b"\x5a" * SIZE); bview = memoryview(big)

    def reuse4k(i):
        b = anon(False)
        for at in offsets(i): os.pwritev(fd_img, [b], at)

    def reusethp(i):
        b = anon(True)
        for at in offsets(i): os.pwritev(fd_img, [b], at)

    def two_thp(i):
        bs = [anon(True), anon(True)]
        for k, at in enumerate(offsets(i)): os.pwritev(fd_img, [bs[k & 1]], at)

    def mapping_moving(i):
        for at in offsets(i): os.pwritev(fd_img, [view[at:at + RUN]], at)

    def mapping_reused(i):
        src = i * RUN
        for at in offsets(i): os.pwritev(fd_img, [view[src:src + RUN]], at)

    def anon_moving(i):
        for at in offsets(i): os.pwritev(fd_img, [bview[at:at + RUN]], at)

    def staged_thp(i):  # migd's way: pread into a huge-page buffer, then write
        b = anon(True)
        for at in offsets(i):
            os.preadv(fd_mem, [b], at); os.pwritev(fd_img, [b], at)
    return [reuse4k, reusethp, two_thp, mapping_moving, mapping_reused, anon_moving, staged_thp]


def hash4(v):
    for m in range(0, RUN, MiB): xxhash.xxh3_128_digest(v[m:m + MiB])


def save(make):
    def body(i):
        b = make(); v = memoryview(b)
        for at in offsets(i):
            os.preadv(fd_mem, [b], at); hash4(v); os.pwritev(fd_img, [b], at)
    body.__name__ = "save_" + make.__name__; return body


def restore(make):
    def body(i):
        b = make(); v = memoryview(b)
        for at in offsets(i):
            os.preadv(fd_img, [b], at); hash4(v); os.pwrite(fd_mem, v, at)
    body.__name__ = "restore_" + make.__name__; return body


def run(body):
    os.posix_fadvise(fd_img, 0, 0, os.POSIX_FADV_DONTNEED)
    r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
    ts = [threading.Thread(target=body, args=(i,)) for i in range(4)]
    for t in ts: t.start()
    for t in ts: t.join()
    t = time.perf_counter() - t0; r1 = resource.getrusage(resource.RUSAGE_SELF)
    return GIB / t, ((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)) / GIB


try:
    if SET == "staged":
        WAYS = [save(thp), save(shm), restore(thp), restore(shm)]
        run(save(thp))  # every block of the file written once, so that restores read data
    else:
        WAYS = source_ways()
    res = {w.__name__: [] for w in WAYS}
    for r in range(ROUNDS):
        ways = WAYS[r % len(WAYS):] + WAYS[:r % len(WAYS)]
        if r % 2: ways = ways[::-1]
        for w in ways: res[w.__name__].append(run(w))
    print(time.strftime("%Y-%m-%d %H:%M UTC"), f"SET={SET}, {ROUNDS} rounds alternated, medians")
    for k, v in res.items():
        print(f"{k:16s} {st.median(x[0] for x in v):6.2f} GiB/s "
              f"({min(x[0] for x in v):.2f}-{max(x[0] for x in v):.2f}) "
              f"cpu {st.median(x[1] for x in v):.3f} s/GiB")
finally:
    os.close(fd_img); os.unlink(mem); disk.close()
