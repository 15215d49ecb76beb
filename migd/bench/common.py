"""Units, limits, and the error and log line that every part of `migd bench` shares."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..pages import PAGE_SIZE

MiB, GiB = 1 << 20, 1 << 30
PAGE = PAGE_SIZE  # the fills' zero pages are the pages migd's zero scan skips
CLUSTER = 2 * MiB  # zero clusters: the granule of free guest memory (a huge page)
FILL_CHUNK = 64 * MiB
PY_BLOCK = 4 * MiB
PY_THREADS = 4
# fio's O_DIRECT sequential passes: (key, label, options); the best is the disk's 100% line.
# The first two are docs/performance.md's reference; the third keeps several large I/Os in
# flight from one job, as migd's channels do.
FIO_CONFIGS = (
    ("fio1", "fio psync, 1 job, 1 MiB", ("--ioengine=psync", "--numjobs=1", "--bs=1M")),
    ("fio4", "fio psync, 4 jobs, 1 MiB", ("--ioengine=psync", "--numjobs=4", "--bs=1M")),
    (
        "fioaio",
        "fio libaio, 1 job, iodepth 8, 4 MiB",
        ("--ioengine=libaio", "--numjobs=1", "--iodepth=8", "--bs=4M"),
    ),
)
POLL = 0.01
SUM_REPEATS = 2  # samples of each setting per round in the paired checksum runs
QEMU_MIN = (9, 1)
FINAL = {"completed", "failed", "cancelled"}
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # where `python -m migd` finds migd


class BenchError(Exception):
    """A step of the benchmark failed; the text says which one and why."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


DEFAULT_QEMU = "qemu-system-x86_64"
