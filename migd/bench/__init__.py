"""`migd bench`: how fast is migd on this machine, and why, measured in one run.

Everything is measured in one run on one machine and reported as GiB/s of RAM and as
ratios, because absolute figures drift on shared machines (docs/performance.md). The run
is made of rounds (--runs, default 3); each round measures every figure once, in an order
shuffled afresh each round, so that drift during the run and the after-effects of one
measurement on the next hit every figure alike; each figure is the median of its rounds,
with min-max.

In every round:

* disk: O_DIRECT sequential write, then read, of the same number of bytes in --dir. With
  fio installed: psync with 1 MiB blocks, 1 and 4 jobs, and libaio with 8 x 4 MiB in
  flight (the best is the 100% line).
  Without fio: a built-in loop of 4 threads, each with its own O_DIRECT fd, doing
  os.pwritev / os.preadv of 4 MiB mmap-allocated (aligned) buffers. These passes are
  one of the saves' group, shuffled with the saves, and the saves' ratio to the disk is
  taken round by round (each round's best save against the same round's best write),
  as the restores' is.
* migd save of --size-gib of random data held in a /dev/shm memory-backend-file
  (multifd + mapped-ram) for each --channels count, with direct-io and without it (for
  --buffered-channels).
* QEMU (>= 9.1, unless --no-qemu) saving the same memory file (-M none,
  memory-backend-file share=on, multifd + mapped-ram, max-bandwidth 0) with direct-io for
  each --qemu-channels count and once without direct-io.
* migd restore of migd's file into a second /dev/shm memory file pre-filled with other
  data, for each channel count, with and without direct-io, and once into an empty
  (never touched) memory file; QEMU likewise from the same file (files of one size can
  sit on parts of the disk that read at different speeds). Restored memory is compared
  with the source. Among the restores, shuffled with them: a plain O_DIRECT sequential
  read of that same file (fio psync, 1 job, 1 MiB; without fio one Python thread), the
  restores' 100% line. Restore ratios are taken round by round (each round's restore
  time against the same round's read or QEMU restore) and the median of the rounds
  reported, since the disk's speed here swings by tens of percent from minute to minute.
* the page cache each save or restore leaves behind: `fincore` on the save file (or the
  growth of Cached in /proc/meminfo), as a percentage of the bytes moved.

Then, in pairs with a direct-io save of random RAM at the same channel count (in turn
before and after it), so that their time ratios shrug off disk drift: a save with
zero-page detection off (the cost of detection), and saves of RAM that is 75% zero pages
in randomly chosen 2 MiB clusters (written zeros, and once more as file holes) and of RAM
with 30% zero pages scattered at random.

Then the cost of checksums, in pairs at the same channel count: migd saves of the random
RAM with checksums on and off (the migrate argument 'checksums'), and restores of one
checksummed save with verify on, off and before-write (migrate-incoming's 'verify'). Each
round runs every setting twice in mirrored order (on, off, off, on; the next round off,
on, on, off), so that a steady drift of the disk hits both sides alike; the report gives
throughput with / without for each round and the median and min-max of the rounds.
Every other migd row runs migd's defaults: its saves record checksums, its restores
verify them as they land. With --checksums-only, only these pairs are measured.

Then what the bench's own polling costs, in pairs the same way: migd saves and restores
at the reference channel count timed while query-migrate is polled every 10 ms (as every
other row is) and waiting for the `completed` MIGRATION event alone (as libvirt waits
with `events` on; the daemon's memory still sampled from /proc, which wakes only the
bench); the report gives event / polled throughput per round. On two CPUs that the
migration keeps busy, waking the daemon and the bench every 10 ms cost about a tenth of
a save on the fast disk (docs/bench/fast-disk, "Session 25").

A migration is timed from the `migrate` / `migrate-incoming` command to the timestamp of
its `completed` MIGRATION event (both migd and QEMU send it, the capability `events` on);
query-migrate is polled every 10 ms meanwhile (the end time where no event came, a poll
being up to 10 ms late); the polls' round trips give the control plane latency,
/proc/PID/stat the CPU time of migd or QEMU, and /proc/PID/status migd's private memory
(RssAnon). migd maps the memory file afresh (object-del, object-add) before every
timed operation, as for a real save or restore; QEMU is a new process each time. As root
the page cache is dropped before every measurement (after syncfs of --dir only: a global
sync would wait on every other filesystem too). All files and processes the benchmark
creates are removed at the end, also on error, SIGINT, SIGTERM or SIGHUP.

With --out DIR: DIR/bench.md (the tables, the command, the date, the machine),
DIR/bench.json, and DIR/bench.png (throughput against channels; needs matplotlib, the
`bench` extra). The Markdown (or with --json the JSON) also goes to stdout.

    migd bench --size-gib 4 --runs 3 --out docs/bench

With --concurrency, only the concurrency section runs (migd/bench/concurrency.py: many
jobs at once against the same jobs one after another, and against QEMU processes).
With --fast-disk, the suite runs on ext4 over a loop device backed by /dev/shm (issue 19:
where the disk no longer hides migd's CPU cost; the CPU column gives user and system
seconds per GiB). With --vm, only the whole-VM section runs (migd/bench/vm.py: the
downtime of `migd vm save` and `migd vm restore` against QEMU's own save and restore of
the same VM).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from ..limits import CHANNELS_MAX
from ..signals import hand_caught_signals_to
from .common import (
    DEFAULT_QEMU,
    JOB_MIB_MAX,
    JOBS_MAX,
    RUNS_MAX,
    SIZE_GIB_MAX,
    SIZE_GIB_MIN,
    VM_GIB_MAX,
    VM_GIB_MIN,
    BenchError,
    float_in,
    floats_in,
    int_in,
    log,
    note_stop,
    signals_deferred,
)

# --- command line ----------------------------------------------------------------------


GiB = 1 << 30
MiB = 1 << 20


def _counts(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        values = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list like 1,2,4,8") from None
    if any(not 1 <= v <= CHANNELS_MAX for v in values):
        raise argparse.ArgumentTypeError(f"'{text}': channel counts are 1..{CHANNELS_MAX}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--size-gib",
        type=float_in(SIZE_GIB_MIN, SIZE_GIB_MAX),
        default=4.0,
        help=f"bytes per operation in GiB (default 4; {SIZE_GIB_MIN:g} to {SIZE_GIB_MAX:g})",
    )
    p.add_argument(
        "--dir",
        default="/tmp",
        help="directory of the save files: the disk under test (default /tmp)",
    )
    p.add_argument(
        "--channels",
        type=_counts,
        default=[1, 2, 4, 8],
        help="multifd channel counts (default 1,2,4,8)",
    )
    p.add_argument(
        "--buffered-channels",
        type=_counts,
        default=None,
        metavar="CHANNELS",
        help="channel counts also measured without direct-io (default: all of "
        "--channels; 'none' for none)",
    )
    p.add_argument(
        "--qemu-channels",
        type=_counts,
        default=None,
        metavar="CHANNELS",
        help="channel counts of QEMU's saves and restores (default: --channels)",
    )
    p.add_argument(
        "--runs",
        type=int_in(1, RUNS_MAX),
        default=3,
        help="rounds; each figure is the median (default 3)",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="write bench.md, bench.json and bench.png there"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument(
        "--baseline",
        choices=("auto", "fio", "python", "both"),
        default="auto",
        help="disk baseline: fio if installed (auto), or the Python loop, or both",
    )
    p.add_argument("--qemu", default=DEFAULT_QEMU, help=f"QEMU binary (default {DEFAULT_QEMU})")
    p.add_argument("--no-qemu", action="store_true", help="leave QEMU out")
    p.add_argument(
        "--checksums-only",
        action="store_true",
        help="measure only the paired runs with checksums on and off (save) and verify "
        "on, off and before-write (restore)",
    )
    p.add_argument(
        "--concurrency",
        action="store_true",
        help="run only the concurrency section: --jobs concurrent memory-save jobs, then "
        "memory-restore jobs, each of its own backend and file, against the same jobs one "
        "after another in the same daemon and against as many QEMU processes saving at "
        "once (docs/jobs.md)",
    )
    p.add_argument(
        "--jobs", type=int_in(1, JOBS_MAX), default=8, help="--concurrency: jobs (default 8)"
    )
    p.add_argument(
        "--job-size-mib",
        type=int_in(1, JOB_MIB_MAX),
        default=512,
        help="--concurrency: MiB of memory per job (default 512)",
    )
    p.add_argument(
        "--job-channels",
        type=int_in(1, CHANNELS_MAX),
        default=2,
        help="--concurrency: multifd channels per job (default 2)",
    )
    p.add_argument(
        "--memory-dir",
        default="/dev/shm",
        metavar="DIR",
        help="where the suite's memory files live (default /dev/shm); e.g. a tmpfs "
        "mounted with huge=always puts them on transparent huge pages",
    )
    p.add_argument(
        "--fast-disk",
        action="store_true",
        help="run the suite on a disk much faster than this machine's: ext4 on a loop "
        "device backed by a /dev/shm file (built, then torn down; needs root; "
        "migd/bench/fastdisk.py); --dir is ignored",
    )
    p.add_argument(
        "--vm",
        action="store_true",
        help="run only the whole-VM section: downtime of `migd vm save` and `migd vm "
        "restore` against QEMU's own mapped-ram save and restore of the same VM "
        "(migd/bench/vm.py, docs/vm-image.md); --channels' largest count is used",
    )
    p.add_argument(
        "--vm-sizes-gib",
        type=floats_in(VM_GIB_MIN, VM_GIB_MAX),
        default=[1.0, 2.0],
        metavar="LIST",
        help="--vm: guest RAM sizes in GiB (default 1,2)",
    )
    p.add_argument(
        "--vm-fill",
        choices=("random", "none"),
        default="random",
        help="--vm: the guest's memory file before it starts: random data (default), or "
        "none (only what the guest touches is data; with --guest, a realistic guest)",
    )
    p.add_argument(
        "--vm-restore-into",
        choices=("new", "reused"),
        default="new",
        help="--vm: the new QEMU's memory file: a new, empty one (default), or the one the "
        "saved guest ran on, overwritten with other data first (a resume on the same host)",
    )
    p.add_argument(
        "--guest",
        default=None,
        metavar="DIR",
        help="--vm: boot this kernel and initrd (a make-guest.sh directory) instead of "
        "firmware only",
    )
    p.add_argument(
        "--keep-caches",
        action="store_true",
        help="do not drop the page cache between measurements (it is dropped by "
        "default when running as root)",
    )


def _check_directory(option: str, path: str, writable: bool = True) -> str | None:
    if not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such directory"
        return f"{option} {path!r}: {what}"
    if writable and not os.access(path, os.W_OK | os.X_OK):
        return f"{option} {path!r}: not writable"
    return None


def check_arguments(args: argparse.Namespace) -> str | None:
    """Fills in the defaults that depend on --channels; the usage error, if any.

    The numbers were checked as they were parsed (their `type=`); this checks what depends
    on more than one option, and the directories, before anything is created."""
    if not args.channels:
        return "--channels 'none': at least one channel count is needed"
    if args.buffered_channels is None:
        args.buffered_channels = list(args.channels)
    if args.qemu_channels is None:
        args.qemu_channels = list(args.channels)
    if not set(args.buffered_channels) <= set(args.channels):
        return "--buffered-channels must be a subset of --channels"
    directories = [("--memory-dir", args.memory_dir, True)]
    if not getattr(args, "fast_disk", False):  # --fast-disk ignores --dir
        directories.append(("--dir", args.dir, True))
    if getattr(args, "guest", None):
        directories.append(("--guest", args.guest, False))  # only read
    for option, path, writable in directories:
        error = _check_directory(option, path, writable)
        if error:
            return error
    return None


@hand_caught_signals_to
def _terminate(signum: int, _frame: FrameType | None) -> None:
    note_stop(signum)  # asked again between rounds, should this exception be dropped
    raise SystemExit(128 + signum)


@hand_caught_signals_to
def _keyboard_interrupt(_signum: int, _frame: FrameType | None) -> None:
    """Ctrl-C as Python's own handler has it, but a handler of the bench's: an in-process
    `migd vm` command (bench/vm.py) that caught one hands it on to such a handler when it
    ends (tools/client.Interrupt), not to Python's default one, which the CLI keeps."""
    note_stop(_signum)
    raise KeyboardInterrupt


def run_concurrency(args: argparse.Namespace) -> int:
    """`migd bench --concurrency`: migd.bench.concurrency with the bench's arguments."""
    import asyncio

    from . import concurrency

    argv = [
        "--jobs", str(args.jobs), "--size-mib", str(args.job_size_mib),
        "--channels", str(args.job_channels), "--dir", args.dir, "--rounds", str(args.runs),
        *(["--no-qemu"] if args.no_qemu else []),
    ]  # fmt: skip
    try:
        return asyncio.run(concurrency.main(argv))
    except KeyboardInterrupt:
        log("interrupted")
        return 130


def run_vm(args: argparse.Namespace) -> int:
    """`migd bench --vm`: migd.bench.vm with the bench's arguments."""
    import asyncio

    from . import vm

    argv = [
        "--sizes-gib", ",".join(map(repr, args.vm_sizes_gib)), "--runs", str(args.runs),
        "--channels", str(max(args.channels)), "--dir", args.dir, "--qemu", args.qemu,
        "--fill", args.vm_fill, "--restore-into", args.vm_restore_into,
        "--memory-dir", args.memory_dir,
        *(["--guest", args.guest] if args.guest else []),
    ]  # fmt: skip
    try:
        return asyncio.run(vm.main(argv))
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130


def run(args: argparse.Namespace) -> int:
    """Runs the suite for parsed arguments (`migd bench` or the script); the exit code."""
    # The memory files the bench makes hold "guest RAM": private, as migd wants a file
    # before it restores into it (one others may read is refused), whatever the umask.
    os.umask(0o077)
    error = check_arguments(args)  # before anything is created (a loop device, a file)
    if error:
        print(f"migd bench: error: {error}", file=sys.stderr)
        return 2
    # SIGTERM and SIGHUP unwind like Ctrl-C, for every section: their default action
    # killed `--vm` and `--concurrency` outright, leaving their migd daemon, its socket
    # directory and the guests' memory files (GiB in /dev/shm) behind.
    old = {s: signal.signal(s, _terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, _keyboard_interrupt)
    try:
        if getattr(args, "concurrency", False):
            return run_concurrency(args)
        if getattr(args, "vm", False):
            return run_vm(args)
        return run_suite(args)
    except SystemExit as exc:
        log(f"interrupted ({_signal_name(exc.code)})")
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _signal_name(code: object) -> str:
    """SIGTERM for _terminate's exit code 143."""
    if isinstance(code, int):
        with contextlib.suppress(ValueError):
            return signal.Signals(code - 128).name
    return f"exit {code}"


def run_suite(args: argparse.Namespace) -> int:
    """The main suite (optionally on --fast-disk); the exit code."""
    # Here, not at the top: `migd`'s parser takes add_arguments from this package, and
    # every client command (`migd vm restore` among them, whose start-up is downtime)
    # would load the suite first.
    from .fastdisk import FastDisk
    from .processes import Cleanup
    from .suite import Bench

    cleanup = Cleanup()
    bench: Bench | None = None
    fast: FastDisk | None = None
    code = 1
    try:
        if getattr(args, "fast_disk", False):
            # The bench wants 4 x --size-gib + 1 GiB free in --dir (Bench.check_space);
            # ext4's own metadata takes a few percent.
            fast = FastDisk(int((4 * args.size_gib * GiB + 1.25 * GiB) * 1.08))
            args.dir = str(fast.open())
        bench = Bench(args, cleanup)
        bench.run()
        code = 0
    except BenchError as exc:
        log(f"error: {exc}")
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        with signals_deferred():
            cleanup.close()
            if fast is not None:
                fast.close()  # after cleanup: its directories live on the fast disk
        if bench is not None and bench.measured():
            bench.finished = time.time()
            bench.loadavg_end = os.getloadavg()[0]
            if args.out:
                bench.write_out(Path(args.out))
            print(bench.as_json() if args.json else bench.markdown(), end="", flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="migd bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
