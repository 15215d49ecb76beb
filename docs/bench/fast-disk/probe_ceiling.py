"""What the fast disk allows a save or a restore of memory at all, against the bench's
disk baseline: plain loops, no daemon, alternated round by round on the same disk.

Each loop moves 1.5 GiB between a file on the fast disk and a memory file in /dev/shm
(all of its pages present), with 4 threads and 4 MiB O_DIRECT calls, each thread its
share of the offsets:

- restore, bench baseline: O_DIRECT reads into each thread's own 4 MiB buffer, used over
  and over (what `migd bench` calls the disk's read);
- restore into memory: O_DIRECT reads straight into the memory file's mapping (a restore
  that does nothing else: no checks, no staging);
- restore, hashed: read into a buffer, xxh3-128 of each MiB, pwrite into the memory file
  (migd's staged restore, without the daemon);
- restore, hashed, kernel copy (warm / new mapping): read into a buffer, xxh3-128 of
  each MiB, then process_vm_writev of the buffer into the memory file's mapping (the
  kernel copies, so a file cut short is EFAULT, not SIGBUS; no inode lock: the four
  threads copy side by side); "new mapping" maps the file afresh each round and unmaps
  it at the end, inside the timing, as a restore into a backend just added would;
- save, bench baseline: O_DIRECT writes from each thread's own 4 MiB buffer;
- save from memory: O_DIRECT writes straight from the mapping (no checks, no copy);
- save, hashed: pread from the memory file into a buffer, xxh3-128 of each MiB, O_DIRECT
  write (migd's staged save, without the daemon).

Printed: GiB/s, this process's CPU s/GiB, and the whole machine's busy CPUs over the
loop (from /proc/stat: the loop disk's own copying runs in kernel threads, not here).

    sudo [ONLY=restore] .venv/bin/python docs/bench/fast-disk/probe_ceiling.py [ROUNDS]

ONLY=restore (or save): only the loops whose name starts so.
"""
import ctypes, mmap, os, resource, sys, tempfile, threading, time, statistics as st
sys.path.insert(0, os.getcwd())
import xxhash
from migd.bench.fastdisk import FastDisk
MiB = 1 << 20; RUN = 4 * MiB; SIZE = 1536 * MiB; GIB = SIZE / 2**30
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
disk = FastDisk(SIZE + 512 * MiB); outdir = disk.open()
img = f"{outdir}/ceiling-img"; mem = "/dev/shm/probe-ceiling-mem"


def busy_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)  # all but idle and iowait, all


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


libc = ctypes.CDLL(None, use_errno=True)
libc.process_vm_writev.restype = ctypes.c_ssize_t
libc.process_vm_writev.argtypes = [ctypes.c_int, ctypes.POINTER(IoVec), ctypes.c_ulong,
                                   ctypes.POINTER(IoVec), ctypes.c_ulong, ctypes.c_ulong]
fresh = {}  # "new mapping" ways: the mapping of this round


def address(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def run(body):
    os.posix_fadvise(fd_img, 0, 0, os.POSIX_FADV_DONTNEED)
    b0, a0 = busy_jiffies(); r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
    if getattr(body, "new_mapping", False):
        fresh["map"] = mmap.mmap(fd_mem, SIZE); fresh["at"] = address(fresh["map"])
    threads = [threading.Thread(target=body, args=(i,)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    if "map" in fresh:
        fresh.pop("at"); fresh.pop("map").close()
    t = time.perf_counter() - t0; r1 = resource.getrusage(resource.RUSAGE_SELF); b1, a1 = busy_jiffies()
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return GIB / t, cpu / GIB, 2 * (b1 - b0) / (a1 - a0)


def offsets(i):
    return range(i * RUN, SIZE, 4 * RUN)


def buffer():
    return mmap.mmap(-1, RUN)


def read_baseline(i):
    b = buffer()
    for at in offsets(i): os.preadv(fd_direct, [b], at)


def read_into_memory(i):
    for at in offsets(i): os.preadv(fd_direct, [view[at:at + RUN]], at)


def read_hashed(i):
    b = buffer(); v = memoryview(b)
    for at in offsets(i):
        os.preadv(fd_direct, [b], at)
        for m in range(0, RUN, MiB): xxhash.xxh3_128_digest(v[m:m + MiB])
        os.pwrite(fd_mem, v, at)


def read_hashed_kernel_copy(i, target=None):
    b = buffer(); v = memoryview(b)
    local = IoVec(address(b), RUN); pid = os.getpid()
    for at in offsets(i):
        os.preadv(fd_direct, [b], at)
        for m in range(0, RUN, MiB): xxhash.xxh3_128_digest(v[m:m + MiB])
        remote = IoVec((target if target is not None else fresh["at"]) + at, RUN)
        if libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) != RUN:
            raise OSError(ctypes.get_errno(), "process_vm_writev")
    del v; b.close()


def read_hashed_kernel_copy_warm(i):
    read_hashed_kernel_copy(i, map_at)


def read_hashed_kernel_copy_new(i):
    read_hashed_kernel_copy(i)


read_hashed_kernel_copy_new.new_mapping = True


def write_baseline(i):
    b = buffer(); b.write(os.urandom(RUN))
    for at in offsets(i): os.pwritev(fd_direct, [b], at)


def write_from_memory(i):
    for at in offsets(i): os.pwritev(fd_direct, [view[at:at + RUN]], at)


def write_hashed(i):
    b = buffer(); v = memoryview(b)
    for at in offsets(i):
        os.preadv(fd_mem, [b], at)
        for m in range(0, RUN, MiB): xxhash.xxh3_128_digest(v[m:m + MiB])
        os.pwritev(fd_direct, [b], at)


try:
    for path in (img, mem):
        with open(path, "wb") as f:
            for _ in range(SIZE // (64 * MiB)): f.write(os.urandom(64 * MiB))
    fd_direct = os.open(img, os.O_RDWR | os.O_DIRECT); fd_img = os.open(img, os.O_RDONLY)
    fd_mem = os.open(mem, os.O_RDWR)
    mapping = mmap.mmap(fd_mem, SIZE); view = memoryview(mapping); map_at = address(mapping)
    loops = {"restore, bench baseline (reused buffers)": read_baseline,
             "restore into memory (O_DIRECT into the mapping)": read_into_memory,
             "restore, hashed (buffer, xxh3, pwrite)": read_hashed,
             "restore, hashed, kernel copy into the mapping (warm)": read_hashed_kernel_copy_warm,
             "restore, hashed, kernel copy into a new mapping": read_hashed_kernel_copy_new,
             "save, bench baseline (reused buffers)": write_baseline,
             "save from memory (O_DIRECT from the mapping)": write_from_memory,
             "save, hashed (pread, xxh3, O_DIRECT write)": write_hashed}
    only = os.environ.get("ONLY")
    loops = {k: v for k, v in loops.items() if not only or k.startswith(only)}
    res = {k: [] for k in loops}
    for r in range(ROUNDS):
        names = list(loops) if r % 2 == 0 else list(reversed(loops))
        for name in names:
            res[name].append(run(loops[name]))
    print(f"{time.strftime('%Y-%m-%d %H:%M')} UTC, {ROUNDS} rounds alternated, medians (min-max GiB/s)")
    for name, rows in res.items():
        speeds = [x[0] for x in rows]
        print(f"{name}: {st.median(speeds):.2f} GiB/s ({min(speeds):.2f}-{max(speeds):.2f}), "
              f"{st.median(x[1] for x in rows):.3f} CPU s/GiB here, "
              f"{st.median(x[2] for x in rows):.2f} of 2 CPUs busy")
finally:
    try:
        del view; mapping.close()
    except NameError:
        pass
    for path in (mem,):
        try: os.unlink(path)
        except OSError: pass
    disk.close()
