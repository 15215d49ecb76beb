"""`migd bench --vm`: the downtime of `migd vm save` and `migd vm restore` against QEMU's
own `migrate file:` save and restore of the same VM (mapped-ram, multifd with the same
channel count, direct-io, no bandwidth cap), for each guest size (docs/vm-image.md).

Each round, in an order that alternates between rounds, for migd and for QEMU:

* a VM (q35, TCG, one vCPU; firmware only, or the kernel and initrd of --guest DIR, then
  saved once its workload has run a round) runs on a /dev/shm memory-backend-file
  (share=on) filled with random data before it starts, so that nearly every page must
  be saved (--fill none: a new, empty file, so that only what the guest touched is data);
* save, timed from `stop` until the image is durable: for migd, `migd vm save --quit`'s
  own figure, and `migd vm save --live --quit`'s (its pass while the guest runs comes
  before the stop, and is reported beside it); for QEMU, `stop`, `migrate`, completion
  polled every 2 ms, then fsync of the file (QEMU does not sync it itself);
* the page cache is dropped (as root), and a new QEMU with a new, empty memory file
  starts with -incoming defer (--restore-into reused: migd's with the memory file the
  guest ran on, random data of another seed written over it first: a resume on the same
  host, whose pages are allocated already; QEMU's still with a new one: its mapped-ram
  load leaves the pages that are zero in the file as they were, so it restores correctly
  only into a zeroed file);
* restore, timed until the guest is ready to run (paused, so that its memory can then be
  compared with the saved one; `cont` is the same for both): for migd, from the spawn
  of `migd vm restore --paused` (its start-up and its checks of the image and of QEMU
  included, as a management application running it counts them) until QEMU reports its
  part loaded, polled every 2 ms on the bench's own QMP socket (until 2026-12-05 the
  command's own figure, which starts once it has loaded: 0.2-0.5 s less); for QEMU,
  `stop` (so that it does not start the guest itself), `migrate-incoming`, completion
  polled every 2 ms.

The restored memory file must equal the saved one, byte for byte, or the bench fails.
Ratios are migd / QEMU per round; the report gives medians and min-max.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# numpy is used in every round (fill.py) but loaded here, before any round: a stop
# signal whose handler raised while a round's first `import numpy` built an ImportError
# (numpy's optional _distributor_init_local) surfaced as "TypeError: expected a message
# argument" and exit 1, not as the bench's stop (test_bench_vm_interrupted_leaves_nothing).
import numpy  # noqa: F401
from qemu.qmp import QMPClient, Runstate

from ..limits import CHANNELS_MAX
from .common import (
    RUNS_MAX,
    VM_GIB_MAX,
    VM_GIB_MIN,
    BenchError,
    floats_in,
    int_in,
    log,
    raise_if_stopped,
    signals_deferred,
)
from .disk import drop_caches, python_disk
from .fill import fill_memory, same_contents
from .processes import connect_qmp, start_migd

GiB = 1 << 30
QEMU_POLL = 0.002


@dataclass
class Row:
    size: int
    migd_save: list[float] = field(default_factory=list)
    live_save: list[float] = field(default_factory=list)  # migd vm save --live
    live_pass: list[float] = field(default_factory=list)  # its pass while the guest ran
    qemu_save: list[float] = field(default_factory=list)
    migd_restore: list[float] = field(default_factory=list)
    live_restore: list[float] = field(default_factory=list)  # of --live's image
    qemu_restore: list[float] = field(default_factory=list)
    # migd vm restore --postcopy of migd's image: until the guest can run, until all in
    postcopy_ready: list[float] = field(default_factory=list)
    postcopy_all: list[float] = field(default_factory=list)
    disk_write: list[float] = field(default_factory=list)  # the same bytes, O_DIRECT
    disk_read: list[float] = field(default_factory=list)


class Vm:
    """One QEMU process with two QMP sockets: one for the bench, one for migd's CLI."""

    def __init__(self, work: Path, name: str, ram: Path, size: int, args: argparse.Namespace,
                 incoming: bool) -> None:  # fmt: skip
        self.sock, self.cli_sock = work / f"{name}.sock", work / f"{name}-cli.sock"
        mib = size >> 20
        argv = [
            args.qemu, "-accel", "tcg", "-cpu", "max", "-M", "q35", "-m", f"{mib}M",
            "-smp", "1", "-nodefaults", "-display", "none",
            "-object", f"memory-backend-file,id=ram0,size={mib}M,mem-path={ram},share=on",
            "-machine", "memory-backend=ram0",
            "-qmp", f"unix:{self.sock},server=on,wait=off",
            "-qmp", f"unix:{self.cli_sock},server=on,wait=off",
        ]  # fmt: skip
        if args.guest:
            guest = Path(args.guest)
            argv += [
                "-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.img"),
                "-append", "console=ttyS0 quiet panic=-1 workload.mib=64",
                "-device", "virtio-rng-pci", "-serial", f"file:{work / name}.serial",
            ]  # fmt: skip
        if incoming:
            argv += ["-incoming", "defer"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.qmp = QMPClient(name)

    async def connect(self) -> Vm:
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                assert self.proc.stderr is not None
                raise BenchError(f"QEMU exited: {self.proc.stderr.read().decode()[-500:]}")
            try:
                await self.qmp.connect(str(self.sock))
                return self
            except Exception:
                if time.monotonic() > deadline:
                    raise BenchError(f"QEMU's QMP socket {self.sock} did not answer") from None
                await asyncio.sleep(0.05)

    async def cmd(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(name, arguments)

    async def wait_migration(self) -> float:
        """The monotonic time at which QEMU was first seen to report its migration
        completed (polled every QEMU_POLL)."""
        while True:
            if await self._migration_status() == "completed":
                return time.monotonic()
            await asyncio.sleep(QEMU_POLL)

    async def wait_started(self) -> float:
        """The monotonic time at which QEMU was first seen out of `inmigrate` (a postcopy
        load that has handled RUN: the guest can run; polled every QEMU_POLL)."""
        while True:
            if (await self.cmd("query-status")).get("status") != "inmigrate":
                return time.monotonic()
            await self._migration_status()
            await asyncio.sleep(QEMU_POLL)

    async def _migration_status(self) -> str | None:
        """query-migrate's status; a failed or cancelled migration raises BenchError."""
        info = await self.cmd("query-migrate")
        status = info.get("status")
        if status in ("failed", "cancelled"):
            raise BenchError(f"QEMU migration {status}: {info.get('error-desc')}")
        return status

    async def mapped_ram(self, channels: int) -> None:
        caps = [{"capability": c, "state": True} for c in ("multifd", "mapped-ram")]
        await self.cmd("migrate-set-capabilities", {"capabilities": caps})
        params = {"multifd-channels": channels, "direct-io": True, "max-bandwidth": 0}
        await self.cmd("migrate-set-parameters", params)

    async def close(self) -> None:
        """QEMU quit (killed if it does not), a second signal only noted meanwhile: one
        raised in the quit's wait cut the teardown short and left QEMU running, its GiB
        memory file mapped (the bench stops at its next round, raise_if_stopped)."""
        with signals_deferred():
            await self._quit()

    async def _quit(self) -> None:
        asked = self.qmp.runstate == Runstate.RUNNING  # else QEMU is killed at once below
        if asked:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.cmd("quit"), 5)
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if asked:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def wait_for_guest(console: Path) -> None:
    """Until the guest's workload has run a round (`tick 1 ok` on its console)."""
    deadline = time.monotonic() + 300
    while b"tick 1 ok" not in (console.read_bytes() if console.exists() else b""):
        if time.monotonic() > deadline:
            raise BenchError(f"the guest did not tick within 300 s ({console})")
        await asyncio.sleep(0.2)  # the console is a file the guest writes


def cli_argv(sock: Path, vm: Vm, *args: str) -> list[str]:
    """`migd vm ARGS[0] ... ARGS[1:]` against this VM's CLI socket, with JSON output."""
    return [sys.executable, "-m", "migd", "vm", args[0], "--qmp", str(vm.cli_sock),
            "--socket", str(sock), "--json", "-q", *args[1:]]  # fmt: skip


def migd_cli(sock: Path, vm: Vm, *args: str) -> dict[str, Any]:
    result = subprocess.run(cli_argv(sock, vm, *args), capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    if result.returncode != 0:
        raise BenchError(f"migd vm {args[0]} failed: {result.stderr.strip()}")
    return dict(json.loads(result.stdout))


async def migd_restore(
    sock: Path, vm: Vm, image: Path, postcopy: bool = False
) -> tuple[dict[str, Any], float]:
    """`migd vm restore --paused IMAGE`'s JSON, and the seconds from its spawn until QEMU
    reports its part loaded (the guest ready to run): its start-up counts, as it does for
    a management application that runs the command during the downtime (the command's
    own figure starts once it has loaded: 0.2-0.5 s later here). With `postcopy`, until
    QEMU leaves `inmigrate` (the guest can run; its RAM still coming)."""
    extra = ("--postcopy",) if postcopy else ()
    argv = cli_argv(sock, vm, "restore", "--paused", *extra, str(image))
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    ended = asyncio.ensure_future(asyncio.wait_for(proc.communicate(), 600))
    loaded = asyncio.ensure_future(vm.wait_started() if postcopy else vm.wait_migration())
    try:
        await asyncio.wait({ended, loaded}, return_when=asyncio.FIRST_COMPLETED)
        stdout, stderr = await ended
        if proc.returncode != 0:
            raise BenchError(f"migd vm restore failed: {stderr.decode().strip()}")
        # Seen before the command ended, as a rule; else now (late: never early).
        ready = await loaded
    finally:
        for task in (ended, loaded):
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: the command's failure is the one told
        if proc.returncode is None:  # a signal or a timeout: the command goes too
            proc.kill()
            await proc.wait()
    return dict(json.loads(stdout)), ready - started


async def one_round(
    who: str, row: Row, work: Path, shm: Path, sock: Path, args: argparse.Namespace, seed: int
) -> None:
    saved, restored, image = shm / "saved-ram", shm / "restored-ram", work / f"{who}.img"
    for path in (saved, restored, image):
        path.unlink(missing_ok=True)
    if args.fill == "random":
        fill_memory(saved, row.size, "random", seed)
    # Made before the try and connected inside it: a signal during connect() (QEMU
    # starting) still ends this QEMU (before: it was left running, its memory file kept).
    vm = Vm(work, "a", saved, row.size, args, incoming=False)
    try:
        await vm.connect()
        if args.guest:
            await wait_for_guest(work / "a.serial")
        if who == "migd":
            row.migd_save.append(
                migd_cli(sock, vm, "save", "--quit", str(image))["seconds"]["downtime"]
            )
        elif who == "migd-live":
            seconds = migd_cli(sock, vm, "save", "--live", "--quit", str(image))["seconds"]
            log(f"  migd vm save --live: {seconds}")
            row.live_save.append(seconds["downtime"])
            row.live_pass.append(seconds["live-pass"])
        else:
            await vm.mapped_ram(args.channels)
            started = time.monotonic()
            await vm.cmd("stop")
            await vm.cmd("migrate", {"uri": f"file:{image}"})
            await vm.wait_migration()
            fd = os.open(image, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            row.qemu_save.append(time.monotonic() - started)
            log(f"  QEMU save: {row.qemu_save[-1]:.6f} s")
    finally:
        await vm.close()
    raise_if_stopped()  # a signal deferred while QEMU quit
    expected = saved
    # QEMU's mapped-ram load leaves the pages the file has as zero untouched: it needs a
    # zeroed memory file (a new one) to restore correctly, so it gets one in any case.
    if args.restore_into == "reused" and who != "qemu":
        # The file the guest ran on, its pages allocated, holding other data now.
        expected = shm / "expected-ram"
        shutil.copyfile(saved, expected)
        fill_memory(saved, row.size, "random", seed + 1000)
        restored = saved
    drop_caches(work, enabled=os.geteuid() == 0)
    # Made before the try and connected inside it: a signal during connect() (QEMU
    # starting) still ends this QEMU (before: it was left running, its memory file kept).
    vm = Vm(work, "b", restored, row.size, args, incoming=True)
    try:
        await vm.connect()
        if who.startswith("migd"):
            out, downtime = await migd_restore(sock, vm, image)
            log(f"  migd vm restore: {downtime:.6f} s from its spawn; its own: {out['seconds']}")
            (row.live_restore if who == "migd-live" else row.migd_restore).append(downtime)
        else:
            await vm.mapped_ram(args.channels)
            started = time.monotonic()
            await vm.cmd("stop")
            await vm.cmd("migrate-incoming", {"uri": f"file:{image}"})
            await vm.wait_migration()
            row.qemu_restore.append(time.monotonic() - started)
            log(f"  QEMU restore: {row.qemu_restore[-1]:.6f} s")  # beside migd's, per round
        if not same_contents(expected, restored, row.size):
            raise BenchError(f"{who}: the restored guest memory differs from the saved memory")
    finally:
        await vm.close()
    if who == "migd" and args.postcopy:
        await postcopy_round(row, work, shm, sock, args, image, expected)
    image.unlink()
    if expected != saved:
        expected.unlink()


async def postcopy_round(
    row: Row, work: Path, shm: Path, sock: Path, args: argparse.Namespace, image: Path,
    expected: Path,
) -> None:  # fmt: skip
    """migd's image again, by `migd vm restore --postcopy` into a new memory file: timed
    until the guest can run and until all of its RAM is in (the command's end)."""
    restored = shm / "postcopy-ram"
    restored.unlink(missing_ok=True)
    drop_caches(work, enabled=os.geteuid() == 0)
    vm = Vm(work, "c", restored, row.size, args, incoming=True)
    try:
        await vm.connect()
        started = time.monotonic()
        out, ready = await migd_restore(sock, vm, image, postcopy=True)
        row.postcopy_ready.append(ready)
        row.postcopy_all.append(time.monotonic() - started)
        log(f"  migd vm restore --postcopy: ready {ready:.6f} s from its spawn, all in "
            f"{row.postcopy_all[-1]:.6f} s; its own: {out['seconds']}")  # fmt: skip
        if not same_contents(expected, restored, row.size):
            raise BenchError("postcopy: the restored guest memory differs from the saved memory")
    finally:
        await vm.close()
        restored.unlink(missing_ok=True)


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"


def _ratio(a: list[float], b: list[float]) -> str:
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def report(rows: list[Row], args: argparse.Namespace) -> str:
    guest = f"kernel of {args.guest}" if args.guest else "firmware only"
    fill = "random RAM" if args.fill == "random" else "RAM as the guest left it"
    fill += f", memory files in {args.memory_dir}"
    fill += (
        ", restored into a new memory file"
        if args.restore_into == "new"
        else ", restored by migd into the memory file it ran on (other data written over "
        "it), by QEMU into a new one (the only one it restores correctly)"
    )
    lines = [
        f"## Whole-VM save and restore ({args.runs} rounds, {args.channels} channels, "
        f"direct-io, {guest}, {fill}, TCG, save files in {args.dir})",
        "",
        "| guest RAM | migd vm save | QEMU save | migd / QEMU (target <= 0.5) | disk write "
        "| migd / disk | migd vm restore | QEMU restore | migd / QEMU (target <= 0.8) "
        "| disk read | migd / disk |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.size / GiB:g} GiB | {_median_range(r.migd_save)} | {_median_range(r.qemu_save)} "
            f"| {_ratio(r.migd_save, r.qemu_save)} | {_median_range(r.disk_write)} "
            f"| {_ratio(r.migd_save, r.disk_write)} | {_median_range(r.migd_restore)} "
            f"| {_median_range(r.qemu_restore)} | {_ratio(r.migd_restore, r.qemu_restore)} "
            f"| {_median_range(r.disk_read)} | {_ratio(r.migd_restore, r.disk_read)} |"
        )
    lines += [
        "",
        "| guest RAM | migd vm save --live | QEMU save | migd --live / QEMU (target <= 0.5) "
        "| its live pass (guest running) | migd vm restore of the --live image "
        "| migd / QEMU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.size / GiB:g} GiB | {_median_range(r.live_save)} "
            f"| {_median_range(r.qemu_save)} | {_ratio(r.live_save, r.qemu_save)} "
            f"| {_median_range(r.live_pass)} | {_median_range(r.live_restore)} "
            f"| {_ratio(r.live_restore, r.qemu_restore)} |"
        )
    if args.postcopy:
        lines += [
            "",
            "| guest RAM | migd vm restore --postcopy: guest can run | QEMU restore "
            "| --postcopy / QEMU (target <= 0.8) | all RAM in | all in / QEMU |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r.size / GiB:g} GiB | {_median_range(r.postcopy_ready)} "
                f"| {_median_range(r.qemu_restore)} | {_ratio(r.postcopy_ready, r.qemu_restore)} "
                f"| {_median_range(r.postcopy_all)} | {_ratio(r.postcopy_all, r.qemu_restore)} |"
            )
    lines += [
        "",
        "--live: the RAM is saved while the guest runs (then read back for its checksums), "
        "the guest stopped, and only the 1 MiB units whose checksum changed saved again; "
        "its downtime counts from that stop, as the others'.",
        "",
        "Save: stop -> image durable (QEMU: completed, then fsync). Restore: command -> guest "
        "ready to run (migd: from the spawn of `migd vm restore`, its start-up and checks "
        "included; QEMU: from `stop` and `migrate-incoming` on a connected QMP socket). "
        "Disk: the bench's own O_DIRECT write and read of as many bytes (4 threads, 4 MiB "
        "blocks, then fdatasync), each round: the floor for moving every byte of the "
        "guest's RAM during its downtime. Medians of the rounds, min-max in brackets; "
        "ratios are taken round by round.",
    ]
    return "\n".join(lines)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes-gib", type=floats_in(VM_GIB_MIN, VM_GIB_MAX), default=[1.0, 2.0])
    parser.add_argument("--runs", type=int_in(1, RUNS_MAX), default=3)
    parser.add_argument("--channels", type=int_in(1, CHANNELS_MAX), default=4)
    parser.add_argument("--dir", default="/tmp", help="where the images go")
    parser.add_argument("--guest", default=None, help="a make-guest.sh directory")
    parser.add_argument(
        "--fill",
        choices=("random", "none"),
        default="random",
        help="the memory file before the VM starts: random data, or none (a new, empty "
        "file: only what the guest touches is data)",
    )
    parser.add_argument(
        "--restore-into",
        choices=("new", "reused"),
        default="new",
        help="the new QEMU's memory file: a new, empty one, or the one the saved guest "
        "ran on, overwritten with other data first",
    )
    parser.add_argument(
        "--memory-dir", default="/dev/shm", help="where the guests' memory files live"
    )
    parser.add_argument(
        "--postcopy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also restore migd's image with `migd vm restore --postcopy` each round",
    )
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    args = parser.parse_args(argv)
    # whole MiB (QEMU's -m); at least 16 MiB, as --sizes-gib's type checked
    sizes = [int(s * GiB) // (1 << 20) * (1 << 20) for s in args.sizes_gib]
    rows = [Row(size) for size in sizes]
    made: list[str] = []  # the directories, removed with signals deferred (below)
    daemon = None
    try:
        made.append(shm := tempfile.mkdtemp(prefix="migd-vm-", dir=args.memory_dir))
        made.append(work := tempfile.mkdtemp(prefix="migd-vm-", dir=args.dir))
        sock = Path(work) / "migd.sock"
        daemon = start_migd(sock, "--log-level", "warning")
        await (await connect_qmp(sock, daemon, "bench")).disconnect()  # it listens
        for round_ in range(args.runs):
            for row in rows:
                order = ("migd", "migd-live", "qemu")
                order = order if round_ % 2 == 0 else order[::-1]
                for who in order:
                    raise_if_stopped()
                    log(f"vm round {round_ + 1}/{args.runs}: {who}, {row.size / GiB:g} GiB")
                    await one_round(who, row, Path(work), Path(shm), sock, args, round_)
                write, read = python_disk(Path(work), row.size, lambda: drop_caches(
                    Path(work), enabled=os.geteuid() == 0))  # fmt: skip
                row.disk_write.append(write)
                row.disk_read.append(read)
        raise_if_stopped()  # a stop in the last round's step: not a finished bench
    finally:
        # A second signal here cut the teardown short: the daemon left running, the
        # memory files (GiB in --memory-dir) kept, as fastdisk's teardown once did.
        with signals_deferred():
            if daemon is not None:
                daemon.terminate()
                daemon.wait(30)
            for path in reversed(made):
                shutil.rmtree(path, ignore_errors=True)
    print(report(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
