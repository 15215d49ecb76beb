"""migd serve with UnitChecksums.done, MemoryReader.copy and the threads' I/O timed per
thread; SIGUSR1 writes the totals to stderr and resets them."""

import collections
import signal
import sys
import threading
import time

import migd.io.checksums as cs
import migd.io.threads as th
import migd.io.zero_scan as zs

stats = collections.defaultdict(float)
lock = threading.Lock()


def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        c = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            dt = time.perf_counter() - t
            dc = time.thread_time() - c
            with lock:
                stats[name + ".wall"] += dt
                stats[name + ".cpu"] += dc
                stats[name + ".n"] += 1

    return wrapper


cs.UnitChecksums.done = timed("done", cs.UnitChecksums.done)
zs.MemoryReader.copy = timed("copy", zs.MemoryReader.copy)
# the channel class: whatever in io/threads.py has _read_run
for obj in vars(th).values():
    if isinstance(obj, type) and hasattr(obj, "_read_run"):
        obj._read_run = timed("read_run", obj._read_run)
        obj._save_run = timed("save_run", obj._save_run)
        obj.save = timed("thread_save", obj.save)
        obj.restore = timed("thread_restore", obj.restore)


def dump(*_):
    with lock:
        items = dict(stats)
        stats.clear()
    print(
        "STATS " + " ".join(f"{k}={v:.4f}" for k, v in sorted(items.items())),
        file=sys.stderr,
        flush=True,
    )


signal.signal(signal.SIGUSR1, dump)
from migd.app.cli import main  # noqa: E402 (after the patches above)

sys.exit(main(sys.argv[1:]))
