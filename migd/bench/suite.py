"""The measurements: rounds of saves and restores by migd and QEMU, the disk baseline,
the paired zero-page saves."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from .common import FIO_CONFIGS, PAGE, PY_BLOCK, PY_THREADS, QEMU_MIN, BenchError, GiB, MiB, log
from .disk import (
    drop_caches,
    file_cached,
    fio_disk,
    fio_read_file,
    meminfo,
    python_disk,
    python_read_file,
)
from .fill import fill_memory, fill_pattern, same_contents, saved_checksums
from .machine import machine_facts, qemu_version
from .processes import QMP, Cleanup, Migd, configure, timed_migration
from .report import BenchReport
from .results import Row, human

# The paired checksum rows (Bench.paired_checksums): key suffix and label by operation and
# setting; a save's migd argument 'checksums', a restore's 'verify'.
SUM_KEYS = {
    ("save", "on"): "-sums",
    ("save", "off"): "-nosum",
    ("restore", "on"): "-verify",
    ("restore", "off"): "-noverify",
    ("restore", "before-write"): "-verify-before-write",
}
SUM_LABELS = {
    ("save", "on"): "checksums on (paired)",
    ("save", "off"): "checksums off (paired)",
    ("restore", "on"): "verify on (paired)",
    ("restore", "off"): "verify off (paired)",
    ("restore", "before-write"): "verify before-write (paired)",
}

# The paired polling rows (Bench.paired_polling): timed while query-migrate is polled
# every 10 ms, as every other row is, or waiting for the MIGRATION event alone.
POLL_KEYS = {True: "-polled", False: "-event"}
POLL_LABELS = {
    True: "query-migrate every 10 ms (paired)",
    False: "waiting for the MIGRATION event (paired)",
}

# The paired staging rows (Bench.paired_staging): saves and restores through the
# channels' staging buffers (the default) or straight from and into the mapping (a daemon
# with MIGD_STAGING=0).
PATH_KEYS = {"staged": "-staged", "mapped": "-mapped"}
PATH_LABELS = {
    ("save", "staged"): "through staging buffers (paired)",
    ("save", "mapped"): "from the mapping (paired)",
    ("restore", "staged"): "through staging buffers (paired)",
    ("restore", "mapped"): "into the mapping (paired)",
}

# --- the benchmark ---------------------------------------------------------------------


class Bench(BenchReport):
    """The measurements, round by round, as the docstring of migd.bench describes them."""

    def __init__(self, args: argparse.Namespace, cleanup: Cleanup) -> None:
        self.args = args
        self.cleanup = cleanup
        self.started = time.time()
        self.finished: float | None = None
        self.loadavg_end: float | None = None
        self.complete = False
        self.size = int(args.size_gib * GiB) // (4 * MiB) * (4 * MiB)
        if self.size < 64 * MiB:
            raise BenchError("--size-gib must be at least 1/16 (64 MiB)")
        self.channels: list[int] = args.channels
        # the channel count of the single-count rows: 4 (performance.md's best) when asked
        self.ref = 4 if 4 in self.channels else max(self.channels)
        self.buffered: list[int] = args.buffered_channels
        self.runs: int = args.runs
        self.root = os.geteuid() == 0
        # Dropping the page cache also drops the filesystem's metadata, which every save then
        # reads back while it allocates: a fixed cost that weighs most on short saves.
        self.drop_enabled = self.root and not args.keep_caches
        self.rows: dict[str, Row] = {}
        self.qemu = None if args.no_qemu else qemu_version(args.qemu)
        self.use_qemu = self.qemu is not None and self.qemu >= QEMU_MIN
        self.qemu_channels: list[int] = args.qemu_channels if self.use_qemu else []
        self.has_fio = shutil.which("fio") is not None
        self.has_fincore = shutil.which("fincore") is not None
        mode = args.baseline
        if mode == "fio" and not self.has_fio:
            raise BenchError("--baseline fio: fio is not installed")
        self.disk_tools = {
            "auto": ["fio"] if self.has_fio else ["python"],
            "fio": ["fio"],
            "python": ["python"],
            "both": (["fio"] if self.has_fio else []) + ["python"],
        }[mode]
        self.machine = machine_facts(Path(args.dir), self.qemu_str() if self.qemu else None)
        self.work = cleanup.mkdtemp(args.dir)  # save files and disk-baseline files
        self.shm = cleanup.mkdtemp(args.memory_dir)  # memory files
        self.run_dir = cleanup.mkdtemp("/tmp")  # sockets (short paths) and logs
        self.src = self.shm / "src.ram"
        self.dst = self.shm / "dst.ram"
        self.zero_src = self.shm / "zero.ram"
        # every restore, migd's and QEMU's, and the plain read they are held against read
        # this one file (a save of migd's): files of the same size can sit on parts of the
        # disk that read at different speeds
        self.restore_src = self.work / "restore-source.img"
        self.op_count = 0

    # -- helpers ---------------------------------------------------------------------------

    def drop(self) -> None:
        drop_caches(self.work, self.drop_enabled)

    def row(self, key: str, label: str, **kw: Any) -> Row:
        return self.rows.setdefault(key, Row(key, label, self.size, **kw))

    def migration_row(
        self,
        tool: str,
        op: str,
        channels: int,
        direct_io: bool = True,
        empty: bool = False,
        detect: bool = True,
        memory: str = "random",
        checksums: str | None = None,
        staging: str | None = None,
        polled: bool | None = None,
    ) -> Row:
        key = (
            f"{tool}-{op}-{channels}"
            + ("" if direct_io else "-buffered")
            + ("-empty" if empty else "")
            + ("" if detect else "-nodetect")
            + ("" if memory == "random" else f"-{memory}")
            + ("" if checksums is None else SUM_KEYS[op, checksums])
            + ("" if staging is None else PATH_KEYS[staging])
            + ("" if polled is None else POLL_KEYS[polled])
        )
        name = "migd" if tool == "migd" else f"QEMU {self.qemu_str()}"
        what = [f"{name} {op}", f"{channels} ch", "direct-io" if direct_io else "buffered"]
        if empty:
            what.append("into an empty memory file")
        if not detect:
            what.append("zero detection off")
        what += {
            "random": [],
            "zero75": ["75% zero pages in 2 MiB clusters"],
            "zero30": ["30% zero pages scattered"],
            "holes75": ["75% zero pages as 2 MiB file holes"],
            "adjacent": ["random RAM, paired with each save below"],
        }[memory]
        if checksums is not None:
            what.append(SUM_LABELS[op, checksums])
        if staging is not None:
            what.append(PATH_LABELS[op, staging])
        if polled is not None:
            what.append(POLL_LABELS[polled])
        return self.row(
            key,
            ", ".join(what),
            op=op,
            tool=tool,
            channels=channels,
            direct_io=direct_io,
            empty_dst=empty,
            detect=detect,
            memory=memory,
            checksums=checksums,
            polled=polled,
            staging=staging,
        )

    def check_space(self) -> None:
        shm_free = shutil.disk_usage(self.shm).free
        if shm_free < 2 * self.size + 256 * MiB:
            raise BenchError(
                f"{self.shm.parent} has {shm_free / GiB:.1f} GiB free; need 2 x the size"
            )
        disk_free = shutil.disk_usage(self.work).free
        if disk_free < 4 * self.size + GiB:
            raise BenchError(f"{self.args.dir} has {disk_free / GiB:.1f} GiB free; need 4 x")
        probe = self.work / "odirect-probe"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise BenchError(f"{self.args.dir} refuses O_DIRECT: {exc.strerror}") from None
        finally:
            probe.unlink(missing_ok=True)

    def cache_left(self, path: Path, cached_before: int) -> float | None:
        """The page cache `path` holds after an operation, % of the bytes moved."""
        if self.has_fincore:
            return 100 * file_cached(path) / self.size
        if path.is_relative_to(self.shm):
            return None  # shmem is 'Cached' itself: /proc/meminfo cannot tell
        return 100 * max(0, meminfo("Cached") - cached_before) / self.size

    @contextlib.contextmanager
    def qemu_session(
        self, mem: Path, incoming: bool
    ) -> Iterator[tuple[QMP, subprocess.Popen[bytes]]]:
        self.op_count += 1
        sock = self.run_dir / f"qemu{self.op_count}.sock"
        log_path = self.run_dir / f"qemu{self.op_count}.log"
        argv = [
            self.args.qemu,
            "-M",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-object",
            # align=2M: QEMU maps a file backend at 4 KiB alignment otherwise, where a
            # huge-page tmpfs (--memory-dir) cannot map its pages huge: migd's mmap is
            # placed at 2 MiB by the kernel, and QEMU must have the same chance.
            f"memory-backend-file,id=ram0,size={self.size},mem-path={mem},share=on,align=2M",
            "-machine",
            "memory-backend=ram0",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ]
        if incoming:
            argv += ["-incoming", "defer"]
        proc = self.cleanup.spawn(argv, log_path)
        qmp = QMP(sock, proc, log_path)
        try:
            yield qmp, proc
        finally:
            with contextlib.suppress(Exception):
                qmp.execute("quit")
            qmp.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            self.cleanup.stop(proc)

    # -- measurements ----------------------------------------------------------------------

    def disk(self, run: int) -> None:
        if "fio" in self.disk_tools:
            for name, what, options in FIO_CONFIGS:
                log(f"round {run + 1}: disk, {what}")
                w, r = fio_disk(self.work, self.size, name, options, self.drop)
                self.row(
                    f"disk-write-{name}", f"disk O_DIRECT write, {what}", op="write", tool="fio"
                ).times.append(w)
                self.row(
                    f"disk-read-{name}", f"disk O_DIRECT read, {what}", op="read", tool="fio"
                ).times.append(r)
        if "python" in self.disk_tools:
            log(f"round {run + 1}: disk, Python {PY_THREADS} threads")
            w, r = python_disk(self.work, self.size, self.drop)
            label = f"Python {PY_THREADS} threads x 4 MiB"
            self.row(
                "disk-write-py", f"disk O_DIRECT write, {label}", op="write", tool="python"
            ).times.append(w)
            self.row(
                "disk-read-py", f"disk O_DIRECT read, {label}", op="read", tool="python"
            ).times.append(r)

    def file_read(self, run: int) -> None:
        """The restores' disk baseline: a plain O_DIRECT sequential read of the file they
        read, measured among them (shuffled with them) so that it shares their disk weather."""
        tool = "fio" if self.has_fio and "fio" in self.disk_tools else "python"
        what = (
            "fio psync, 1 job, 1 MiB"
            if tool == "fio"
            else f"Python, 1 thread x {PY_BLOCK // MiB} MiB"
        )
        log(f"round {run + 1}: disk, read of the restore file, {what}")
        read = fio_read_file if tool == "fio" else python_read_file
        seconds = read(self.restore_src, self.size, self.drop)
        self.row(
            "disk-read-file",
            f"disk O_DIRECT read of the file the restores read, {what}",
            op="read-file",
            tool=tool,
        ).times.append(seconds)

    def migd_save(
        self, migd: Migd, row: Row, mem: Path, run: int, keep: Path | None = None
    ) -> None:
        """One timed save of `mem` through a freshly mapped backend, into a new file."""
        self.op_count += 1
        path = self.work / f"migd-save-{self.op_count}.img"
        log(f"round {run + 1}: {row.label}")
        migd.attach(mem, self.size)
        assert row.channels is not None
        configure(
            migd.qmp,
            row.channels,
            row.direct_io,
            **{
                "max-bandwidth": 0,
                "zero-page-detection": "multifd" if row.detect else "none",
            },
        )
        self.drop()
        before = meminfo("Cached")
        arguments: dict[str, Any] = {"uri": f"file:{path}"}
        if row.checksums is not None:
            arguments["checksums"] = row.checksums == "on"
        timed = timed_migration(
            migd.qmp, "migrate", arguments, migd.proc.pid, poll=row.polled is not False
        )
        cache = self.cache_left(path, before)
        if cache is not None:
            row.cache_pct.append(cache)
        pages = self.size // PAGE
        row.written_pct.append(100 * timed.info.get("ram", {}).get("normal", pages) / pages)
        row.add(timed)
        row.note_checksums(saved_checksums(path))
        if keep is not None:
            path.replace(keep)
        else:
            path.unlink()

    def qemu_save(self, row: Row, run: int, migd: Migd) -> None:
        """One timed save by a new QEMU; `migd` lets go of the memory file first."""
        migd.detach()
        self.op_count += 1
        path = self.work / f"qemu-save-{self.op_count}.img"
        log(f"round {run + 1}: {row.label}")
        assert row.channels is not None
        with self.qemu_session(self.src, incoming=False) as (qmp, proc):
            configure(qmp, row.channels, row.direct_io, **{"max-bandwidth": 0})
            self.drop()
            before = meminfo("Cached")
            timed = timed_migration(qmp, "migrate", {"uri": f"file:{path}"}, proc.pid, False)
        row.add(timed)
        cache = self.cache_left(path, before)
        if cache is not None:
            row.cache_pct.append(cache)
        path.unlink()

    def prepare_dst(self, empty: bool, value: int) -> None:
        """Pre-fill the destination with other data, or leave it an empty (sparse) file.

        Its pages are freed first either way, so that every restore meets pages made the
        same way, by the fill: on a huge-page tmpfs (--memory-dir) the fill's writes make
        huge pages, but a fill over the 4 KiB pages a restore into the empty file faulted
        in kept those, and the restore that followed ran at a third of its speed
        (docs/bench/fast-disk: run3-thp's first restore row)."""
        with open(self.dst, "a+b") as f:
            os.ftruncate(f.fileno(), 0)  # frees every page, mapped or not
            os.ftruncate(f.fileno(), self.size)
        if not empty:
            fill_pattern(self.dst, self.size, value)

    def restore(self, row: Row, run: int, migd: Migd | None, other: Migd | None = None) -> None:
        """One timed restore into dst: by `migd`, or by a new QEMU when it is None (and
        then `other`, a migd that maps dst, lets go of it first)."""
        log(f"round {run + 1}: {row.label}")
        if other is not None:
            other.detach()
        self.prepare_dst(row.empty_dst, 0x11 * (1 + (run + self.op_count) % 15))
        assert row.channels is not None
        source = self.restore_src
        if migd is not None:
            migd.attach(self.dst, self.size)
            configure(migd.qmp, row.channels, row.direct_io)
            self.drop()
            before = meminfo("Cached")
            arguments: dict[str, Any] = {"uri": f"file:{source}"}
            if row.checksums is not None:
                arguments["verify"] = row.checksums
            timed = timed_migration(
                migd.qmp, "migrate-incoming", arguments, migd.proc.pid,
                poll=row.polled is not False,
            )  # fmt: skip
        else:
            with self.qemu_session(self.dst, incoming=True) as (qmp, proc):
                configure(qmp, row.channels, row.direct_io)
                self.drop()
                before = meminfo("Cached")
                timed = timed_migration(
                    qmp, "migrate-incoming", {"uri": f"file:{source}"}, proc.pid, False
                )
        row.add(timed)
        cache = self.cache_left(source, before)
        if cache is not None:
            row.cache_pct.append(cache)
        ok = same_contents(self.src, self.dst, self.size)
        row.verified = ok and row.verified is not False
        if not ok and migd is not None:
            raise BenchError(f"{row.label}: restored memory differs from the source")

    def round(self, run: int, saver: Migd, loader: Migd) -> None:
        """Every figure once: saves, then the restores that read their files.

        Within each group the order is shuffled afresh every round (the first round keeps
        the table's order), so that no figure always follows the same neighbour: a
        buffered save, for one, leaves the host writing back for a while after it ends.
        The disk's own passes are one of the saves' group, so that the saves' 100% line
        shares their disk weather as the restores' read of their file does (a fast disk
        here swings by tens of percent within a minute), and report.py takes the save
        ratio round by round.
        """
        mig = self.migration_row
        saves: list[Callable[[], None]] = [partial(self.disk, run)]
        for ch in self.channels:
            keep = self.restore_src if ch == self.ref else None
            saves.append(
                partial(self.migd_save, saver, mig("migd", "save", ch), self.src, run, keep=keep)
            )
        for ch in self.buffered:
            saves.append(
                partial(
                    self.migd_save, saver, mig("migd", "save", ch, direct_io=False), self.src, run
                )
            )
        for ch in self.qemu_channels:
            saves.append(partial(self.qemu_save, mig("qemu", "save", ch), run, saver))
        if self.qemu_channels:
            saves.append(
                partial(self.qemu_save, mig("qemu", "save", self.ref, direct_io=False), run, saver)
            )
        restores: list[Callable[[], None]] = [partial(self.file_read, run)]
        for ch in self.channels:
            restores.append(partial(self.restore, mig("migd", "restore", ch), run, loader))
        for ch in self.buffered:
            restores.append(
                partial(self.restore, mig("migd", "restore", ch, direct_io=False), run, loader)
            )
        restores.append(
            partial(self.restore, mig("migd", "restore", self.ref, empty=True), run, loader)
        )
        for ch in self.qemu_channels:
            restores.append(partial(self.restore, mig("qemu", "restore", ch), run, None, loader))
        if self.qemu_channels:
            for row in (
                mig("qemu", "restore", self.ref, direct_io=False),
                mig("qemu", "restore", self.ref, empty=True),
            ):
                restores.append(partial(self.restore, row, run, None, loader))
        order = random.Random(run)
        for group in (saves, restores):
            if run:
                order.shuffle(group)
            for op in group:
                op()
        saver.detach()
        loader.detach()

    def paired_saves(self, migd: Migd) -> None:
        """Zero-page saves and detection off, each next to a random-RAM save (alternately
        before and after it): their time ratios shrug off disk drift."""
        ref = self.migration_row("migd", "save", self.ref, memory="adjacent")
        for kind in ("nodetect", "zero75", "zero30", "holes75"):
            if kind == "nodetect":
                row = self.migration_row("migd", "save", self.ref, detect=False)
                mem = self.src
            else:
                row = self.migration_row("migd", "save", self.ref, memory=kind)
                mem = self.zero_src
                log(f"filling the memory file: {row.label.split(', ')[-1]}")
                fill_memory(mem, self.size, kind, seed=7)
            for run in range(self.runs):
                pair = [(ref, self.src), (row, mem)]
                for r, m in pair[:: 1 if run % 2 == 0 else -1]:
                    self.migd_save(migd, r, m, run)
        migd.detach()
        self.zero_src.unlink(missing_ok=True)

    def paired_checksums(self, saver: Migd, loader: Migd) -> None:
        """Saves with checksums on and off, restores of one file with verify on, off and
        before-write, at the reference channel count: every setting twice a round, in
        mirrored order (on, off, off, on; the next round off, on, on, off), so that a
        steady drift of the disk hits every setting alike and each round gives its own
        ratio (report.py's checksum_costs)."""
        ch = self.ref
        saves = [self.migration_row("migd", "save", ch, checksums=s) for s in ("on", "off")]
        restores = [
            self.migration_row("migd", "restore", ch, checksums=v)
            for v in ("on", "off", "before-write")
        ]
        for run in range(self.runs):
            turn = run % len(saves)
            order = saves[turn:] + saves[:turn]
            for row in order + order[::-1]:
                # the restores read a save of migd's with checksums: the rounds' own, or
                # with --checksums-only the first checksummed save of this phase
                keep = None
                if row.checksums == "on" and not self.restore_src.exists():
                    keep = self.restore_src
                self.migd_save(saver, row, self.src, run, keep=keep)
            turn = run % len(restores)
            order = restores[turn:] + restores[:turn]
            for row in order + order[::-1]:
                self.restore(row, run, loader)
        saver.detach()
        loader.detach()

    def paired_polling(self, saver: Migd, loader: Migd) -> None:
        """Saves and restores (into used memory, of the rounds' reference save's file) at
        the reference channel count, timed while query-migrate is polled every 10 ms, as
        every other row is, and waiting for the MIGRATION event alone, as libvirt waits
        with `events` on, in mirrored order as paired_checksums: what the polling costs
        the migration on this machine (report.py's polling_ratios). The other rows poll,
        for their query-migrate latencies."""
        ch = self.ref
        for op in ("save", "restore"):
            rows = [self.migration_row("migd", op, ch, polled=p) for p in (True, False)]
            for run in range(self.runs):
                order = rows[run % 2 :] + rows[: run % 2]
                for row in order + order[::-1]:
                    if op == "save":
                        self.migd_save(saver, row, self.src, run)
                    else:
                        self.restore(row, run, loader)
        saver.detach()
        loader.detach()

    def paired_staging(self, saver: Migd, loader: Migd, mapped: Migd) -> None:
        """Saves, restores into used memory and restores into an empty memory file through
        the channels' staging buffers (`saver`, `loader`: the default) and straight from
        and into the mapping (`mapped`, a daemon with MIGD_STAGING=0), at the reference
        channel count with direct-io, in mirrored order as paired_checksums: their time
        ratios round by round (report.py's staging_ratios), and each one's CPU per GiB.
        The restores read the file of the rounds' reference save."""
        for op, empty, daemon in (
            ("save", False, saver),
            ("restore", False, loader),
            ("restore", True, loader),
        ):
            rows = {
                path: self.migration_row("migd", op, self.ref, empty=empty, staging=path)
                for path in ("staged", "mapped")
            }
            daemons = {"staged": daemon, "mapped": mapped}
            for run in range(self.runs):
                order = ["staged", "mapped"][:: 1 if run % 2 == 0 else -1]
                for path in order + order[::-1]:
                    # one mapping of the memory at a time: the other daemon lets go of it
                    daemons["mapped" if path == "staged" else "staged"].detach()
                    if op == "save":
                        self.migd_save(daemons[path], rows[path], self.src, run)
                    else:
                        self.restore(rows[path], run, daemons[path])
            daemon.detach()
            mapped.detach()

    def run(self) -> None:
        self.check_space()
        log(f"filling {human(self.size)} of random memory in {self.src}")
        fill_memory(self.src, self.size, "random", seed=1)
        saver = Migd(self, "migd-save")
        loader = Migd(self, "migd-restore")
        try:
            if self.args.checksums_only:
                self.paired_checksums(saver, loader)
                self.complete = True
                return
            for run in range(self.runs):
                self.round(run, saver, loader)
            mapped = Migd(self, "migd-mapped", env={"MIGD_STAGING": "0"})
            try:
                self.paired_staging(saver, loader, mapped)
            finally:
                mapped.close()
            self.paired_checksums(saver, loader)
            self.paired_polling(saver, loader)
            for path in (self.dst, self.restore_src):
                path.unlink(missing_ok=True)  # room in /dev/shm for the zero-page memory
            self.paired_saves(saver)
        finally:
            saver.close()
            loader.close()
        self.complete = True
