"""Where a daemon's save loses against its own channel code: migd's ThreadEngine run
outside the daemon, on a file it makes itself, against the daemon's `migrate` of the same
memory and a plain loop, alternated, 1.5 GiB of random data, 4 channels, O_DIRECT, on the
fast disk (session 25: this found the save file's size on disk, save.write_head).

- engine: migd's ThreadEngine in this process (the daemon's channel code: staging
  buffers, zero scan, checksums, the copy slot), writing a file sized with ftruncate and
  its slots allocated (fallocate KEEP_SIZE), as page_slots does;
- server: the same in a process of its own (a line on its stdin, one save);
- daemon: a migd daemon's `migrate` of the same memory, timed to its MIGRATION event;
- plain: four threads, one copying at a time (pread, sampled zero test, xxh3 per MiB),
  each writing its own buffers;
- baseline: the bench's disk write baseline (migd/bench/disk.py's direct_pass: 4 threads,
  each an anonymous 4 MiB buffer written over and over, into a file allocated first).

LIKE_DAEMON=1: the server makes its file as save.write_head did before session 25 (cut
to 0, the head's first piece written at 0 and its last one past the pages through the
page cache, so only the page cache knows the file's size), and opens its channels through
/proc/self/fd; SIZE_FIRST=1 with it: sized with ftruncate before those writes (the fix).
DROP=1: the page cache dropped before each save (the save file removed first), and
REATTACH=1: the daemon's backend added again before each, as the bench does; POLL=1:
the daemon's saves timed as the bench times them, query-migrate polled every 10 ms;
PAUSE=seconds: a pause before each operation; FRESH=1: the memory file written over
before each operation (the same bytes), so that every way reads memory it has not read
since (session 28: the first read of such memory cost twice the kernel CPU of a re-read); PERF=FILE: `perf record -g` of the daemon
over the rounds into FILE.
WAYS=engine,server,daemon,plain,baseline: those only. TREE=/path: migd imported from that tree
(the engine, the server and the daemon). Printed: GiB/s and CPU s/GiB (the process
that saved), medians.

    sudo [LIKE_DAEMON=1 [SIZE_FIRST=1]] .venv/bin/python docs/bench/fast-disk/probe_engine.py [ROUNDS]
"""
import asyncio, mmap, os, statistics as st, subprocess, sys, tempfile, threading, time
from pathlib import Path
TREE = os.environ.get("TREE", os.getcwd())
sys.path.insert(0, TREE)
import numpy as np, uvloop, xxhash
from migd.bench.disk import direct_pass, drop_caches
from migd.bench.fastdisk import FastDisk
from migd.bench.processes import QMP, configure, cpu_seconds, serve_argv, timed_migration
from migd.fallocate import KEEP_SIZE, fallocate
from migd.io.checksums import UnitChecksums
from migd.io.engine import BlockIO, PageRun, Transfer
from migd.io.share import DiskShare
from migd.io.threads import WORKERS, ThreadEngine
from migd.io.throttle import Throttle
MiB = 1 << 20; SIZE = 1536 * MiB; G = SIZE / 2**30; RUN = 4 * MiB; PAGES = SIZE // 4096


def new_file(img):
    """The engine's file: sized, its slots allocated; LIKE_DAEMON: as write_head made it."""
    if os.path.exists(img):
        os.unlink(img)
    main = os.open(img, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if os.environ.get("LIKE_DAEMON"):
        os.ftruncate(main, 0)
        if os.environ.get("SIZE_FIRST"):
            os.ftruncate(main, SIZE + MiB + 13)
        os.pwrite(main, b"h" * 130, 0); os.pwrite(main, b"e" * 13, SIZE + MiB)
        fallocate(main, KEEP_SIZE, MiB, SIZE)
        fds = [os.open(f"/proc/self/fd/{main}", os.O_WRONLY | os.O_DIRECT) for _ in range(4)]
    else:
        os.ftruncate(main, SIZE + 2 * MiB); fallocate(main, KEEP_SIZE, MiB, SIZE)
        fds = [os.open(img, os.O_WRONLY | os.O_DIRECT) for _ in range(4)]
    return main, fds


def engine_save(mem_fd, mapping, img):
    main, fds = new_file(img)
    block = BlockIO("pc.ram", MiB, PAGES, memoryview(mapping), np.zeros(PAGES, bool),
                    content_fd=mem_fd)
    runs = [PageRun(0, p, 2048) for p in range(0, PAGES, 2048)]
    t = Transfer("save", img, fds, [block], runs, threading.Event(), Throttle(0), True, False,
                 checksums=UnitChecksums([block], img, None, runs), share=DiskShare(),
                 stage_saves=True)
    t0 = time.perf_counter()
    asyncio.run(ThreadEngine().run(t))
    secs = time.perf_counter() - t0
    for fd in fds:
        os.fdatasync(fd); os.close(fd)
    os.fdatasync(main); os.close(main)
    return secs


if len(sys.argv) > 1 and sys.argv[1] == "--server":  # the server's side
    mem, img = sys.argv[2], sys.argv[3]
    mem_fd = os.open(mem, os.O_RDWR); mapping = mmap.mmap(mem_fd, SIZE, mmap.MAP_SHARED)
    uvloop.install(); WORKERS.warm()
    for _ in sys.stdin:
        print(engine_save(mem_fd, mapping, img), flush=True)
    sys.exit(0)

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 6
work = Path(tempfile.mkdtemp(prefix="probe-engine-"))
disk = FastDisk(4096 * MiB); outdir = disk.open()
mem, img = "/dev/shm/probe-engine-mem", f"{outdir}/probe-engine.img"
procs = []
try:
    fresh_bytes = [os.urandom(64 * MiB) for _ in range(SIZE // (64 * MiB))]
    with open(mem, "wb") as f:
        for chunk in fresh_bytes: f.write(chunk)
    os.chmod(mem, 0o600)
    mem_fd = os.open(mem, os.O_RDWR); mapping = mmap.mmap(mem_fd, SIZE, mmap.MAP_SHARED)
    env = {**os.environ, "PYTHONPATH": TREE}
    server = subprocess.Popen([sys.executable, __file__, "--server", mem, img], cwd=TREE,
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sock, log = work / "migd.sock", work / "migd.log"
    daemon = subprocess.Popen(serve_argv(sock), cwd=TREE, env=env, stdout=open(log, "wb"),
                              stderr=subprocess.STDOUT)
    procs += [server, daemon]
    q = QMP(sock, daemon, log)
    q.execute("object-add", {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE,
                             "mem-path": mem, "share": True})
    configure(q, 4, True)
    uvloop.install(); WORKERS.warm()

    def plain():
        main, fds = new_file(img); copying = threading.Lock()

        def body(i):
            b = mmap.mmap(-1, RUN, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            b.madvise(mmap.MADV_HUGEPAGE); v = memoryview(b); w = np.frombuffer(v, np.uint64)
            for at in range(i * RUN, SIZE, 4 * RUN):
                with copying:
                    os.preadv(mem_fd, [v], at)
                    w[::512 * 64].all()
                    for m in range(0, RUN, MiB): xxhash.xxh3_128_digest(v[m:m + MiB])
                os.pwritev(fds[i], [v], MiB + at)
            del w; v.release(); b.close()
        t0 = time.perf_counter()
        ts = [threading.Thread(target=body, args=(i,)) for i in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        secs = time.perf_counter() - t0
        for fd in fds: os.close(fd)
        os.close(main)
        return secs

    def baseline():
        if os.path.exists(img):
            os.unlink(img)
        fd = os.open(img, os.O_WRONLY | os.O_CREAT, 0o600)
        fallocate(fd, 0, 0, SIZE); os.close(fd)
        buffers = [mmap.mmap(-1, RUN) for _ in range(4)]
        for b in buffers: b.write(os.urandom(RUN))
        secs = direct_pass(Path(img), SIZE, buffers, write=True)
        for b in buffers: b.close()
        return secs

    def on_server():
        server.stdin.write("save\n"); server.stdin.flush()
        return float(server.stdout.readline())

    def on_daemon():
        if os.path.exists(img):
            os.unlink(img)
        if os.environ.get("POLL"):  # the bench's way: query-migrate every 10 ms meanwhile
            return timed_migration(q, "migrate", {"uri": f"file:{img}"}, daemon.pid).seconds
        t0 = time.perf_counter()
        q.execute("migrate", {"uri": f"file:{img}"})
        while True:
            m = q._recv()
            if m.get("event") == "MIGRATION" and m["data"]["status"] in ("completed", "failed"):
                break
        assert m["data"]["status"] == "completed", m
        return time.perf_counter() - t0

    ways = {"engine": (lambda: engine_save(mem_fd, mapping, img), None),
            "server": (on_server, server.pid), "daemon": (on_daemon, daemon.pid),
            "plain": (plain, None), "baseline": (baseline, None)}
    if os.environ.get("WAYS"):
        ways = {name: ways[name] for name in os.environ["WAYS"].split(",")}
    res = {name: [] for name in ways}
    if os.environ.get("PERF"):  # perf record of the daemon over the rounds, into perf-daemon.data
        perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-g", "-p", str(daemon.pid),
                                 "-o", os.environ["PERF"]], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(1.5)
    for r in range(ROUNDS):
        for name in (list(ways) if r % 2 == 0 else list(reversed(ways))):
            body, pid = ways[name]
            if os.environ.get("REATTACH") and name == "daemon":  # as the bench's rows do
                q.execute("object-del", {"id": "ram0"})
                q.execute("object-add", {"qom-type": "memory-backend-file", "id": "ram0",
                                         "size": SIZE, "mem-path": mem, "share": True})
            if os.environ.get("FRESH"):  # every page written since anyone last read it
                for at in range(0, SIZE, 64 * MiB):
                    os.pwrite(mem_fd, fresh_bytes[at // (64 * MiB)], at)
            if os.environ.get("PAUSE"):  # seconds between the operations
                time.sleep(float(os.environ["PAUSE"]))
            if os.environ.get("DROP"):  # as the bench does before each measurement
                if os.path.exists(img):
                    os.unlink(img)
                drop_caches(Path(outdir), True)
            c0 = cpu_seconds(pid) if pid else time.process_time()
            secs = body()
            cpu = (cpu_seconds(pid) if pid else time.process_time()) - c0
            res[name].append((G / secs, cpu / G))
    if os.environ.get("PERF"):
        perf.send_signal(2); perf.wait()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} UTC, {ROUNDS} rounds alternated, medians "
          f"(LIKE_DAEMON={os.environ.get('LIKE_DAEMON', '')} SIZE_FIRST="
          f"{os.environ.get('SIZE_FIRST', '')})")
    for name, v in res.items():
        speeds = [x[0] for x in v]
        print(f"{name}: {st.median(speeds):.2f} GiB/s ({min(speeds):.2f}-{max(speeds):.2f}), "
              f"{st.median(x[1] for x in v):.3f} CPU s/GiB")
finally:
    for p in procs:
        if p is procs[0] and p.stdin:
            p.stdin.close()
        p.terminate(); p.wait()
    if os.environ.get("SHOWLOG"):
        print(open(log).read()[-5000:])
    for path in (mem, img):
        if os.path.exists(path):
            os.unlink(path)
    disk.close()
