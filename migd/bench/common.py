"""Units, limits, and the error and log line that every part of `migd bench` shares."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TypeVar

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


# The stop signal the bench's handlers saw (bench/__init__.py). They raise at once, but
# a signal that lands in a finalizer or a weakref callback has its exception printed and
# dropped ("Exception ignored in ..."), and the bench went on to its next round: the
# rounds ask again (raise_if_stopped).
_stopped: list[int] = []


def note_stop(signum: int) -> None:
    _stopped.append(signum)


def raise_if_stopped() -> None:
    """Raise what a stop signal the bench saw should have raised (SIGINT: Ctrl-C)."""
    if _stopped:
        if _stopped[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + _stopped[0])


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP only logged while the bench removes what it made: a
    second one (an impatient operator, a service manager repeating its SIGTERM) cut the
    teardown short and left the fast disk mounted on its loop device, its GiB of /dev/shm
    kept (and `--vm`'s QEMU or daemon running). Noted as a stop: a teardown between
    rounds (`--vm`'s QEMU) is followed by raise_if_stopped, not by the next round."""

    def note(signum: int, _frame: FrameType | None) -> None:
        note_stop(signum)
        log(f"{signal.Signals(signum).name}: still removing what the bench made")

    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


DEFAULT_QEMU = "qemu-system-x86_64"


# --- the command lines' numbers: checked as they are parsed, before anything is made ---

_N = TypeVar("_N", int, float)


def _bounded(text: str, value: float, low: float, high: float) -> None:
    # written so that NaN fails too (every comparison with NaN is false)
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: {low:g} to {high:g}")


def _number_in(
    convert: Callable[[str], _N], noun: str, low: float, high: float
) -> Callable[[str], _N]:
    def parse(text: str) -> _N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        _bounded(text, value, low, high)
        return value

    return parse


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse `type=`: an integer from low to high; argparse names the option."""
    return _number_in(int, "an integer", low, high)


def float_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse `type=`: a finite number from low to high (never NaN or infinite)."""
    return _number_in(float, "a number", low, high)


def floats_in(low: float, high: float) -> Callable[[str], list[float]]:
    """An argparse `type=`: a comma-separated list like 1,2 of numbers from low to high."""
    one = float_in(low, high)

    def parse(text: str) -> list[float]:
        items = [item.strip() for item in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,2")
        return [one(item) for item in items]

    return parse


# bounds of `migd bench`'s numbers (its own and those of its --vm and --concurrency parts)
SIZE_GIB_MIN, SIZE_GIB_MAX = 1 / 16, 1024.0  # the suite's bytes per operation
VM_GIB_MIN, VM_GIB_MAX = 1 / 64, 1024.0  # a guest's RAM (16 MiB: QEMU's firmware fits)
RUNS_MAX = 1000
JOBS_MAX = 1024
JOB_MIB_MAX = 1 << 20  # 1 TiB
