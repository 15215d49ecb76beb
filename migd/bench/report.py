"""A run's rows as the report: tables, ratios against docs/performance.md, JSON, plot."""

from __future__ import annotations

import argparse
import functools
import json
import operator
import os
import shlex
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import DEFAULT_QEMU, PAGE, SUM_REPEATS, GiB, MiB, log
from .results import Ratio, Row, human, percentile_ms


def paired_rounds(a: Row | None, b: Row | None) -> list[float]:
    """a's throughput over b's in each round of paired runs (SUM_REPEATS samples each per
    round, in mirrored order): b's time over a's, each summed over the round; only the
    rounds both completed."""
    if a is None or b is None or a.nbytes != b.nbytes:
        return []
    rounds = min(len(a.times), len(b.times)) // SUM_REPEATS
    out = []
    for r in range(rounds):
        part = slice(r * SUM_REPEATS, (r + 1) * SUM_REPEATS)
        out.append(sum(b.times[part]) / sum(a.times[part]))
    return out


class BenchReport:
    """The report half of Bench: best figures, ratios, Markdown, JSON and the plot.

    A mixin: Bench (suite.py) measures, and sets the attributes declared here.
    """

    args: argparse.Namespace
    rows: dict[str, Row]
    size: int
    runs: int
    channels: list[int]
    ref: int
    buffered: list[int]
    qemu: tuple[int, int] | None
    use_qemu: bool
    qemu_channels: list[int]
    disk_tools: list[str]
    has_fincore: bool
    root: bool
    drop_enabled: bool
    machine: dict[str, Any]
    started: float
    finished: float | None
    loadavg_end: float | None
    complete: bool

    def end_load(self) -> float:
        """The load average when the run finished: the Markdown and the JSON, written one
        after the other, must tell the same."""
        return self.loadavg_end if self.loadavg_end is not None else os.getloadavg()[0]

    def qemu_str(self) -> str:
        return ".".join(map(str, self.qemu)) if self.qemu else "?"

    def drop_note(self) -> str:
        if self.drop_enabled:
            return "yes"
        return "no (--keep-caches)" if self.root else "no (not root)"

    def measured(self) -> dict[str, Row]:
        """The rows with at least one run (an interrupted run leaves empty ones)."""
        return {k: r for k, r in self.rows.items() if r.times}

    def best_disk(self, rw: str) -> Row | None:
        pool = self.disk_pool(rw)  # fio is the reference when it ran
        return max(pool, key=lambda r: r.gibs) if pool else None

    def disk_pool(self, rw: str) -> list[Row]:
        """The disk's own passes for rw ("write" or "read"): fio's when it ran, else every
        tool's."""
        rows = [r for r in self.measured().values() if r.op == rw]
        return [r for r in rows if r.tool == "fio"] or rows

    def share_of_disk_per_round(self, row: Row | None, rw: str) -> float | None:
        """row's throughput over the best of the disk's passes in the same round (they ran
        among the saves: Bench.round), the median of the rounds; the rounds that every
        pass and the row completed."""
        pool = self.disk_pool(rw)
        if row is None or not pool or any(r.nbytes != row.nbytes for r in pool):
            return None
        rounds = min(len(r.times) for r in [row, *pool])
        if not rounds:
            return None
        return statistics.median(
            min(r.times[i] for r in pool) / row.times[i] for i in range(rounds)
        )

    def restore_disk(self) -> Row | None:
        """What restores are held against: the plain read of the file they read, measured
        among them each round (Bench.file_read); the best read of fio's files otherwise."""
        return self.measured().get("disk-read-file") or self.best_disk("read")

    def best(self, tool: str, op: str, **match: Any) -> Row | None:
        rows = [
            r
            for r in self.measured().values()
            if r.tool == tool
            and r.op == op
            and r.memory == "random"
            and not r.empty_dst
            and r.detect
            and not r.paired
            and all(getattr(r, k) == v for k, v in match.items())
        ]
        return max(rows, key=lambda r: r.gibs) if rows else None

    def qemu_match(self, row: Row) -> Row | None:
        """QEMU's figure for the same operation, channels, direct-io and destination."""
        if row.tool != "migd" or row.memory != "random" or row.paired:
            return None
        key = (
            f"qemu-{row.op}-{row.channels}"
            + ("" if row.direct_io else "-buffered")
            + ("-empty" if row.empty_dst else "")
        )
        return self.measured().get(key)

    def paired_ratio(self, what: str, a_key: str, b_key: str, target: float | None) -> Ratio:
        """Throughput of row a_key over row b_key, paired rows at the reference channel
        count: per round (each side's SUM_REPEATS times of the round summed, so that the
        mirrored order cancels a steady drift), the median of the rounds with their
        min-max; held against `target` (None: for reference)."""
        rows = self.measured()
        per_round = paired_rounds(rows.get(a_key), rows.get(b_key))
        value = statistics.median(per_round) if per_round else None
        return Ratio(
            f"{what} ({self.ref} ch, paired, {len(per_round)} "
            f"round{'s' * (len(per_round) != 1)})",
            value,
            f">= {target:.2f}" if target else "(for reference)",
            None if value is None or target is None else value >= target,
            span=(min(per_round), max(per_round)) if len(per_round) > 1 else None,
        )

    def checksum_costs(self) -> list[Ratio]:
        """Throughput with checksums over without, from the paired rows."""
        ch = self.ref
        return [
            self.paired_ratio(
                f"{op} throughput, {what}", f"migd-{op}-{ch}{on}", f"migd-{op}-{ch}{off}", target
            )
            for op, on, off, what, target in (
                ("save", "-sums", "-nosum", "checksums on / off", 0.95),
                ("restore", "-verify", "-noverify", "verify on / off", 0.95),
                ("restore", "-verify-before-write", "-noverify", "verify before-write / off",
                 None),
            )
        ]  # fmt: skip

    def polling_ratios(self) -> list[Ratio]:
        """Saves and restores waiting for the MIGRATION event over the same polled every
        10 ms (paired rows), for reference: what the bench's own polling costs the rows
        it times."""
        ch = self.ref
        return [
            self.paired_ratio(
                f"{op} throughput, waiting for the event / polling query-migrate every 10 ms",
                f"migd-{op}-{ch}-event",
                f"migd-{op}-{ch}-polled",
                None,
            )
            for op in ("save", "restore")
        ]

    def staging_ratios(self) -> list[Ratio]:
        """Saves and restores through staging buffers over the same straight from or into
        the mapping (paired rows). Issue 19's rule for the virtio disk: nothing slower."""
        ch = self.ref
        return [
            self.paired_ratio(
                f"{op} throughput, staging buffers / {other}",
                f"migd-{op}-{ch}{empty}-staged",
                f"migd-{op}-{ch}{empty}-mapped",
                0.95,
            )
            for op, empty, other in (
                ("save", "", "from the mapping"),
                ("restore", "", "into the mapping"),
                ("restore", "-empty", "into the mapping, empty memory file"),
            )
        ]

    def ratios(self) -> list[Ratio]:
        rows = self.measured()
        save, restore = (
            self.best("migd", "save", direct_io=True),
            self.best("migd", "restore", direct_io=True),
        )
        qsave, qrestore = (
            self.best("qemu", "save", direct_io=True),
            self.best("qemu", "restore", direct_io=True),
        )
        zero_ref = rows.get(f"migd-save-{self.ref}-adjacent")  # paired with each below

        def speed(a: Row | None, b: Row | None) -> float | None:
            return a.gibs / b.gibs if a and b else None

        def paired(a: Row | None, b: Row | None) -> float | None:
            """a's speed over b's, round by round (both ran in each round, among the same
            neighbours), the median of the rounds: the disk's speed swings by tens of
            percent over minutes here, which a ratio of two medians would take in."""
            if not a or not b:
                return None
            if len(a.times) != len(b.times) or a.nbytes != b.nbytes:
                return speed(a, b)
            return statistics.median(tb / ta for ta, tb in zip(a.times, b.times, strict=True))

        def time_ratio(key: str) -> float | None:
            row = rows.get(key)
            return row.seconds / zero_ref.seconds if row and zero_ref else None

        out: list[Ratio] = []

        def add(
            name: str,
            value: float | None,
            target: str,
            good: Callable[[float], bool | None],
            unit: str = "x",
        ) -> None:
            out.append(Ratio(name, value, target, None if value is None else good(value), unit))

        def ch(row: Row | None) -> str:
            return f"{row.channels} ch" if row else "-"

        add(
            f"best migd save ({ch(save)}) / best disk write of the same round (per round)",
            self.share_of_disk_per_round(save, "write"),
            ">= 0.90",
            lambda v: v >= 0.9,
        )
        add(
            f"best migd save ({ch(save)}) / best disk write (medians)",
            speed(save, self.best_disk("write")),
            "(for reference)",
            lambda v: None,
        )
        add(
            f"best migd save ({ch(save)}) / best QEMU save ({ch(qsave)})",
            speed(save, qsave),
            "> 1",
            lambda v: v > 1,
        )
        file_read = rows.get("disk-read-file")
        if file_read:
            add(
                f"best migd restore ({ch(restore)}) / O_DIRECT read of the same file (per round)",
                paired(restore, file_read),
                ">= 0.85",
                lambda v: v >= 0.85,
            )
        add(
            f"best migd restore ({ch(restore)}) / best disk read (fio's own files)",
            speed(restore, self.best_disk("read")),
            ">= 0.85" if not file_read else "(for reference)",
            (lambda v: v >= 0.85) if not file_read else (lambda v: None),
        )
        add(
            f"best migd restore ({ch(restore)}) / best QEMU restore ({ch(qrestore)}), "
            "same file, per round",
            paired(restore, qrestore),
            ">= 2",
            lambda v: v >= 2,
        )
        add(
            f"restore / QEMU restore, both into an empty memory file ({self.ref} ch, per round)",
            paired(
                rows.get(f"migd-restore-{self.ref}-empty"),
                rows.get(f"qemu-restore-{self.ref}-empty"),
            ),
            ">= 2",
            lambda v: v >= 2,
        )
        for key, what, target in (
            ("zero75", "zero75", 0.4),
            ("holes75", "zero75 as holes", 0.4),
            ("zero30", "zero30", 1.0),
        ):
            add(
                f"{what} / random save time ({self.ref} ch, paired runs)",
                time_ratio(f"migd-save-{self.ref}-{key}"),
                f"<= {target:.2f}",
                functools.partial(operator.ge, target),  # target >= v
            )
        nodetect = time_ratio(f"migd-save-{self.ref}-nodetect")
        cost = 100 * (1 / nodetect - 1) if nodetect else None
        add(
            f"zero detection cost on random RAM ({self.ref} ch, paired runs)",
            cost,
            "< 10 %",
            lambda v: v < 10,
            "%",
        )
        cache = [
            p
            for r in rows.values()
            if r.tool == "migd" and r.op == "save" and r.direct_io
            for p in r.cache_pct
        ]
        add(
            "page cache left by a migd direct-io save (worst)",
            max(cache) if cache else None,
            "< 1 %",
            lambda v: v < 1,
            "%",
        )
        lat = [x for r in rows.values() if r.tool == "migd" and r.op == "save" for x in r.latencies]
        add(
            "query-migrate p99 during migd saves",
            percentile_ms(lat, 0.99),
            "< 20 ms",
            lambda v: v < 20,
            " ms",
        )
        out += [r for r in self.checksum_costs() if r.value is not None]
        out += [r for r in self.staging_ratios() if r.value is not None]
        out += [r for r in self.polling_ratios() if r.value is not None]
        peak = max((r.peak_anon for r in rows.values()), default=0)
        bitmaps = self.size // PAGE // 8
        add(
            "migd private memory (RssAnon) peak",
            peak / MiB if peak else None,
            f"< {100 + bitmaps / MiB:.1f} MiB",
            lambda v: v < 100 + bitmaps / MiB,
            " MiB",
        )
        return out

    def command(self) -> str:
        """The command line that repeats this run, every option spelled out."""
        a = self.args
        argv = [
            "migd",
            "bench",
            "--size-gib",
            f"{a.size_gib:g}",
            "--dir",
            a.dir,
            "--channels",
            ",".join(map(str, a.channels)),
            "--runs",
            str(a.runs),
            "--buffered-channels",
            ",".join(map(str, a.buffered_channels)) or "none",
        ]
        if a.no_qemu:
            argv.append("--no-qemu")
        else:
            argv += ["--qemu-channels", ",".join(map(str, a.qemu_channels)) or "none"]
            if a.qemu != DEFAULT_QEMU:
                argv += ["--qemu", a.qemu]
        if a.checksums_only:
            argv.append("--checksums-only")
        if a.baseline != "auto":
            argv += ["--baseline", a.baseline]
        if a.out:
            argv += ["--out", a.out]
        if a.json:
            argv.append("--json")
        return shlex.join(argv)

    def facts(self) -> list[str]:
        m = self.machine
        disk = m["dir_disk"]
        dev = m["dir_device"] or "?"
        if disk:
            dev += f" ({', '.join(f'{k} {v}' for k, v in disk.items())})"
        elapsed = (self.finished or time.time()) - self.started
        qemu = (
            f"QEMU {self.qemu_str()}"
            if self.use_qemu
            else "QEMU: skipped (--no-qemu)"
            if self.args.no_qemu
            else f"QEMU: {'not found' if not self.qemu else self.qemu_str() + ' (< 9.1)'}"
        )
        buffered = (
            "all channel counts"
            if self.buffered == self.channels
            else f"{', '.join(map(str, self.buffered)) or 'no'} channels only"
        )
        return [
            f"- command: `{self.command()}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(self.started))}, "
            f"took {elapsed / 60:.1f} min{'' if self.complete else ' (**interrupted**)'}",
            f"- machine: {m['cpus']} x {m['cpu']}, {m['memory_gib']:g} GiB RAM, kernel "
            f"{m['kernel']}"
            + (f", {m['virtualization']}" if m["virtualization"] else "")
            + f"; load average {m['loadavg_start']:.2f} at the start, "
            f"{self.end_load():.2f} at the end",
            f"- disk: save files in {m['dir']} on {dev}, {m['dir_fs'] or '?'}; memory files "
            f"in {self.args.memory_dir}",
            f"- software: migd {m['migd']}, Python {m['python']}, {qemu}, {m['fio'] or 'no fio'}",
            f"- {self.size / GiB:g} GiB per operation, {self.runs} round{'s' * (self.runs > 1)}"
            f" (median, min-max); page cache dropped before each measurement: "
            f"{self.drop_note()}; page cache measured with "
            f"{'fincore' if self.has_fincore else '/proc/meminfo Cached'}; disk baseline: "
            f"{' + '.join(self.disk_tools)}; direct-io off measured for {buffered}",
            "- migd runs with its defaults: saves record checksums, restores verify them as "
            "they land; only the rows marked (paired) set 'checksums' or 'verify'",
        ]

    def summary(self) -> list[str]:
        """Throughput by channel count: the table for the README."""
        rows = self.measured()
        w, r = self.best_disk("write"), self.restore_disk()
        qemu = bool(self.qemu_channels)

        def cell(key: str, disk: Row | None) -> str:
            row = rows.get(key)
            if row is None:
                return "| |" if qemu else "|"
            text = f"{row.gibs:.2f} ({row.gibs / disk.gibs:.0%})" if disk else f"{row.gibs:.2f}"
            if not qemu:
                return f"{text} |"
            q = self.qemu_match(row)
            return f"{text} | {f'{row.gibs / q.gibs:.2f}x' if q else ''} |"

        vs = " | vs QEMU" if qemu else ""
        head = (
            f"| ch | save, direct-io{vs} | save, buffered{vs} | restore, direct-io{vs} "
            f"| restore, buffered{vs} |"
        )
        lines = [head, "|---:" + "|---:" * (8 if qemu else 4) + "|"]
        for ch in self.channels:
            lines.append(
                f"| {ch} | "
                + " ".join(
                    cell(k, d)
                    for k, d in (
                        (f"migd-save-{ch}", w),
                        (f"migd-save-{ch}-buffered", w),
                        (f"migd-restore-{ch}", r),
                        (f"migd-restore-{ch}-buffered", r),
                    )
                )
            )
        for label, key, disk in (("QEMU save", "save", w), ("QEMU restore", "restore", r)):
            best = self.best("qemu", key, direct_io=True)
            if best:
                lines.append(
                    f"\nBest {label}: {best.gibs:.2f} GiB/s ({best.channels} ch, "
                    f"direct-io)" + (f", {best.gibs / disk.gibs:.0%} of the disk." if disk else ".")
                )
        return lines

    def markdown(self) -> str:
        w, r = self.best_disk("write"), self.restore_disk()
        lines = [
            "# migd bench",
            "",
            *self.facts(),
            "",
        ]
        if not self.args.checksums_only:  # else no row of this table was measured
            lines += [
                "## Throughput by channel count",
                "",
                "GiB/s of RAM, median of the rounds; in brackets the share of the disk: saves "
                f"against its best O_DIRECT write ({w.label if w else '-'}: "
                f"{w.gibs if w else 0:.2f} GiB/s), restores against {r.label if r else '-'} "
                f"({r.gibs if r else 0:.2f} GiB/s); vs QEMU: against QEMU with the same "
                "channels and direct-io setting, restoring the same file.",
                "",
                *self.summary(),
                "",
            ]
        lines += [
            "## Every figure",
            "",
            "| what | GiB/s | min-max | s | vs disk | vs QEMU | pages written | page cache "
            "left | CPU | CPU s/GiB user+sys | qm p99 / max ms (answers) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        rows = self.measured()
        for row in rows.values():
            disk = {"save": w, "restore": r}.get(row.op)
            qemu = self.qemu_match(row)
            vs_disk = f"{row.gibs / disk.gibs:.2f}" if disk else ""
            vs_qemu = f"{row.gibs / qemu.gibs:.2f}" if qemu else ""
            written = f"{statistics.median(row.written_pct):.0f} %" if row.written_pct else ""
            cache = f"{max(row.cache_pct):.3g} %" if row.cache_pct else ""
            cpu = "" if row.cpu_pct is None else f"{row.cpu_pct:.0f} %"
            per_gib = row.cpu_per_gib()
            cpu_gib = "" if per_gib is None else f"{per_gib[0]:.2f}+{per_gib[1]:.2f}"
            p99, top = row.p99_ms(), row.max_ms()
            qm = (
                ""
                if p99 is None or top is None
                else (f"{p99:.1f} / {top:.0f} ({len(row.latencies)})")
            )
            label = (
                row.label + {True: " (verified)", False: " (**MISMATCH**)", None: ""}[row.verified]
            )
            lines.append(
                f"| {label} | {row.gibs:.2f} | {row.span()} | {row.seconds:.2f} | {vs_disk} "
                f"| {vs_qemu} | {written} | {cache} | {cpu} | {cpu_gib} | {qm} |"
            )
        lat = [
            x for r_ in rows.values() if r_.tool == "migd" and r_.op == "save" for x in r_.latencies
        ]
        lines += [
            "",
            "vs disk: against the disk figures named above; zero-page rows count GiB/s of RAM. "
            "Page cache left: the file's cached pages after the operation (worst round), "
            "% of the bytes moved. CPU: the CPU time of the migd or QEMU process over the "
            "operation's time (from the command to its `completed` event), % of one core "
            "(median; this machine has "
            f"{os.cpu_count()}); CPU s/GiB: its user and system CPU seconds per GiB moved "
            f"(medians). qm: query-migrate round trips during the operation, polled "
            "every 10 ms, and how many answers came (all rounds). (verified): the restored "
            "memory was compared with the source, byte for byte, after every round.",
        ]
        if lat:
            lines.append(
                f"query-migrate during all migd saves: {len(lat)} answers, median "
                f"{percentile_ms(lat, 0.5):.2f} ms, p99 {percentile_ms(lat, 0.99):.2f} ms, "
                f"max {1000 * max(lat):.2f} ms."
            )
        lines += self.checksum_section()
        lines += [
            "",
            "## Against docs/performance.md",
            "",
            "| ratio | value | target | met |",
            "|---|---:|---:|:---:|",
        ]
        for ratio in self.ratios():
            met = {True: "yes", False: "**no**", None: ""}[ratio.ok]
            lines.append(f"| {ratio.name} | {ratio.shown()} | {ratio.target} | {met} |")
        return "\n".join(lines) + "\n"

    def checksum_section(self) -> list[str]:
        """The paired checksum runs: GiB/s with and without, and the per-round ratio."""
        costs = self.checksum_costs()
        if all(c.value is None for c in costs):
            return []
        rows = self.measured()
        ch = self.ref
        lines = [
            "",
            "## Cost of checksums (paired runs)",
            "",
            f"{ch} channels, direct-io. Each round runs every setting twice in mirrored "
            "order (save: on, off, off, on, the next round off, on, on, off; restore "
            "likewise with verify on, off and before-write), each restore reading the same "
            "checksummed file. Ratio: throughput with over without, taken round by round "
            "from each setting's summed times, then the median of the rounds (min-max); "
            "0.95 means checksums cost 5% of the throughput.",
            "",
            "| operation | with: GiB/s | without: GiB/s | with / without (min-max) | target "
            "| met |",
            "|---|---:|---:|---:|---:|:---:|",
        ]
        keys = (
            ("save, checksums on / off", "save", "-sums", "-nosum"),
            ("restore, verify on / off", "restore", "-verify", "-noverify"),
            ("restore, verify before-write / off", "restore", "-verify-before-write", "-noverify"),
        )
        for (what, op, on, off), cost in zip(keys, costs, strict=True):
            a, b = rows.get(f"migd-{op}-{ch}{on}"), rows.get(f"migd-{op}-{ch}{off}")
            if a is None or b is None:
                continue
            met = {True: "yes", False: "**no**", None: ""}[cost.ok]
            lines.append(
                f"| {what} | {a.gibs:.2f} | {b.gibs:.2f} | {cost.shown()} | {cost.target} | {met} |"
            )
        return lines

    def as_json(self) -> str:
        w, r = self.best_disk("write"), self.best_disk("read")
        file_read = self.measured().get("disk-read-file")
        return (
            json.dumps(
                {
                    "command": self.command(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
                    "seconds": (self.finished or time.time()) - self.started,
                    "loadavg_end": self.end_load(),
                    "complete": self.complete,
                    "machine": self.machine,
                    "size_bytes": self.size,
                    "runs": self.runs,
                    "dir": self.args.dir,
                    "channels": self.channels,
                    "buffered_channels": self.buffered,
                    "qemu_channels": self.qemu_channels,
                    "ref_channels": self.ref,
                    "qemu": self.qemu_str() if self.use_qemu else None,
                    "disk_tools": self.disk_tools,
                    "dropped_caches": self.drop_enabled,
                    "disk_write_key": w.key if w else None,
                    "disk_read_key": r.key if r else None,
                    "restore_read_key": file_read.key if file_read else None,
                    "rows": [row.as_dict() for row in self.measured().values()],
                    "ratios": [
                        {
                            "name": x.name,
                            "value": x.value,
                            "target": x.target,
                            "met": x.ok,
                            "min": x.span[0] if x.span else None,
                            "max": x.span[1] if x.span else None,
                        }
                        for x in self.ratios()
                    ],
                },
                indent=2,
            )
            + "\n"
        )

    def plot(self, path: Path) -> str | None:
        """Write the PNG; returns why not when matplotlib is missing."""
        if self.args.checksums_only:
            return "--checksums-only: no throughput by channel count, no PNG written"
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return "matplotlib is not installed (pip install 'migd[bench]'): no PNG written"
        rows = self.measured()
        fig, axes = plt.subplots(1, 2, figsize=(12, 6.5), sharey=True)
        top = 0.0
        for ax, op, rw in zip(axes, ("save", "restore"), ("write", "read"), strict=True):
            for tool, direct, style, name in (
                ("migd", True, "o-", "migd, direct-io"),
                ("migd", False, "o--", "migd, buffered"),
                ("qemu", True, "s", f"QEMU {self.qemu_str()}, direct-io"),
                ("qemu", False, "D", f"QEMU {self.qemu_str()}, buffered"),
            ):
                pts = sorted(
                    (r.channels, r)
                    for r in rows.values()
                    if r.channels is not None
                    and r.tool == tool
                    and r.op == op
                    and r.direct_io == direct
                    and r.memory == "random"
                    and not r.empty_dst
                    and r.detect
                    and not r.paired
                )
                if not pts:
                    continue
                shift = {
                    ("migd", True): 1.0,
                    ("migd", False): 1.0,
                    ("qemu", True): 1.05,
                    ("qemu", False): 0.95,
                }[tool, direct]
                xs = [c * shift for c, _ in pts]  # side by side, not on top of each other
                ys = [r.gibs for _, r in pts]
                err = [
                    [r.gibs - r.gibs_range[0] for _, r in pts],
                    [r.gibs_range[1] - r.gibs for _, r in pts],
                ]
                top = max(top, *(r.gibs_range[1] for _, r in pts))
                ax.errorbar(
                    xs,
                    ys,
                    yerr=err,
                    fmt=style,
                    capsize=3,
                    label=name,
                    markersize=7 if tool == "qemu" else 5,
                )
            for tool, marker in (("migd", "^"), ("qemu", "v")):
                row = rows.get(f"{tool}-{op}-{self.ref}-empty")
                if row and row.channels is not None:
                    name = "migd" if tool == "migd" else "QEMU"
                    shift = 0.9 if tool == "migd" else 1.1
                    ax.plot(
                        [row.channels * shift],
                        [row.gibs],
                        marker,
                        markersize=8,
                        label=f"{name}, direct-io, into empty memory",
                    )
                    top = max(top, row.gibs)
            disk = self.best_disk(rw) if rw == "write" else self.restore_disk()
            if disk:
                ax.axhline(
                    disk.gibs,
                    color="black",
                    linestyle=":",
                    label=f"disk {rw}"
                    + (" of the same file" if disk.op == "read-file" else "")
                    + f": {disk.label.split(', ', 1)[1]}",
                )
                lo, hi = disk.gibs_range
                ax.axhspan(lo, hi, color="grey", alpha=0.15)
                top = max(top, hi)
            ax.set_title(f"{op} of {human(self.size)} of random RAM")
            ax.set_xscale("log", base=2)
            ax.set_xticks(self.channels, [str(c) for c in self.channels])
            ax.minorticks_off()
            ax.set_xlabel("multifd channels")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
        axes[0].set_ylabel("GiB/s (median, bars: min-max)")
        axes[0].set_ylim(0, top * 1.1 or 1)
        m = self.machine
        fig.suptitle(
            f"migd bench, {time.strftime('%Y-%m-%d', time.localtime(self.started))}: "
            f"{m['cpus']} CPUs, {m['dir_fs'] or '?'} on {m['dir_device'] or '?'} "
            f"({m['dir_disk'].get('driver', '?')}), median of {self.runs} "
            f"round{'s' * (self.runs > 1)}",
            fontsize=11,
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return None

    def write_out(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "bench.md").write_text(self.markdown())
        (directory / "bench.json").write_text(self.as_json())
        png = directory / "bench.png"
        why = self.plot(png)
        if why:
            log(why)
            png.unlink(missing_ok=True)  # not a stale picture next to new tables
        log(f"wrote {directory}/bench.md, bench.json" + ("" if why else ", bench.png"))
