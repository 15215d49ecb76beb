"""One figure's measurements (Row), ratios against the targets, and number formatting."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .common import GiB, MiB
from .processes import Timed

# --- results ---------------------------------------------------------------------------


@dataclass
class Row:
    """One figure: its samples (one per round) and what it is, for tables and the plot."""

    key: str
    label: str
    nbytes: int
    op: str  # "save", "restore", "write" or "read" (the disk)
    tool: str  # "migd", "qemu", "fio" or "python"
    channels: int | None = None
    direct_io: bool = True
    memory: str = "random"  # random, adjacent (random, paired), zero75, zero30, holes75
    empty_dst: bool = False  # a restore into a never-touched memory file
    detect: bool = True  # zero-page detection (saves)
    # migd's checksums, set only in the paired checksum rows (the others run migd's
    # defaults: saves record checksums, restores verify them): a save's "on" or "off", a
    # restore's verify mode "on", "off" or "before-write"
    checksums: str | None = None
    # set only in the paired polling rows (Bench.paired_polling): True, query-migrate
    # every 10 ms as in every other row; False, waiting for the MIGRATION event alone
    polled: bool | None = None
    # set only in the paired staging rows (Bench.paired_staging): "staged", through
    # staging buffers, or "mapped", from or into the mapping (a daemon with MIGD_STAGING=0)
    staging: str | None = None
    times: list[float] = field(default_factory=list)
    cache_pct: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    written_pct: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    cpu_user: list[float] = field(default_factory=list)
    cpu_sys: list[float] = field(default_factory=list)
    peak_anon: int = 0
    verified: bool | None = None
    sum_states: list[str] = field(default_factory=list)  # see note_checksums

    def note_checksums(self, state: str) -> None:
        """A restore's x-checksums state, or what a save's file carries (fill.py)."""
        if state not in self.sum_states:
            self.sum_states.append(state)

    def add(self, timed: Timed) -> None:
        self.times.append(timed.seconds)
        state = timed.info.get("x-checksums", {}).get("state")
        if state is not None:
            self.note_checksums(state)
        self.cpu.append(timed.cpu)
        self.cpu_user.append(timed.cpu_user)
        self.cpu_sys.append(timed.cpu_sys)
        self.latencies += timed.latencies
        self.peak_anon = max(self.peak_anon, timed.peak_anon)

    @property
    def cpu_pct(self) -> float | None:
        """The server's CPU time per second of the operation, % of one core (median)."""
        return 100 * statistics.median(self.cpu) / self.seconds if self.cpu else None

    def cpu_per_gib(self) -> tuple[float, float] | None:
        """The server's (user, system) CPU seconds per GiB moved (medians of the rounds)."""
        if not self.cpu_user:
            return None
        gib = self.nbytes / GiB
        return statistics.median(self.cpu_user) / gib, statistics.median(self.cpu_sys) / gib

    @property
    def paired(self) -> bool:
        """One of the paired rows (checksums, staging, polling), which run after the
        rounds, two samples a round: never a headline figure nor QEMU's match."""
        return self.checksums is not None or self.staging is not None or self.polled is not None

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def gibs(self) -> float:
        return self.nbytes / GiB / self.seconds

    @property
    def gibs_range(self) -> tuple[float, float]:
        return self.nbytes / GiB / max(self.times), self.nbytes / GiB / min(self.times)

    def span(self) -> str:
        if len(self.times) < 2:
            return ""
        lo, hi = self.gibs_range
        return f"{lo:.2f}-{hi:.2f}"

    def p99_ms(self) -> float | None:
        return percentile_ms(self.latencies, 0.99)

    def max_ms(self) -> float | None:
        return 1000 * max(self.latencies) if self.latencies else None

    def as_dict(self) -> dict[str, Any]:
        lo, hi = self.gibs_range
        return {
            "key": self.key,
            "label": self.label,
            "op": self.op,
            "tool": self.tool,
            "channels": self.channels,
            "direct_io": self.direct_io,
            "memory": self.memory,
            "empty_dst": self.empty_dst,
            "zero_detection": self.detect,
            "checksums": self.checksums,
            "polled": self.polled,
            "staging": self.staging,
            "checksum_states": self.sum_states or None,
            "bytes": self.nbytes,
            "seconds": self.times,
            "median_seconds": self.seconds,
            "gib_per_s": self.gibs,
            "gib_per_s_min": lo,
            "gib_per_s_max": hi,
            "page_cache_pct": self.cache_pct or None,
            "written_pct": self.written_pct or None,
            "query_migrate_p99_ms": self.p99_ms(),
            "query_migrate_max_ms": self.max_ms(),
            "query_migrate_answers": len(self.latencies) or None,
            "cpu_seconds": self.cpu or None,
            "cpu_pct_of_core": self.cpu_pct,
            "cpu_user_seconds": self.cpu_user or None,
            "cpu_system_seconds": self.cpu_sys or None,
            "peak_rss_anon": self.peak_anon or None,
            "verified": self.verified,
        }


def human(nbytes: int) -> str:
    return f"{nbytes / GiB:g} GiB" if nbytes >= GiB else f"{nbytes / MiB:g} MiB"


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return 1000 * s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class Ratio:
    name: str
    value: float | None
    target: str
    ok: bool | None
    unit: str = "x"
    span: tuple[float, float] | None = None  # min and max of per-round values

    def shown(self) -> str:
        if self.value is None:
            return "n/a"
        if self.unit == "%":
            return f"{self.value:.{3 if abs(self.value) < 1 else 1}f} %"
        text = f"{self.value:.2f}{self.unit}"
        return text + (f" ({self.span[0]:.2f}-{self.span[1]:.2f})" if self.span else "")
