"""Suspend a running QEMU guest to one image and resume it in a new QEMU process, the way
a management application would, and print the downtime of each step.

1. boot a guest: q35, its RAM a shared file in /dev/shm (the layout migd needs), TCG
   unless KVM can run it; with --guest DIR, the kernel and initrd of
   ../shared/tools/make-guest.sh DIR (whose console prints `tick N ok` while its memory
   checks pass), else firmware only;
2. `migd vm save --quit IMAGE`: the guest stops, QEMU writes its device state, migd the
   RAM, the header last, and QEMU quits (with --live: migd copies the RAM while the
   guest runs, and after the stop only what changed);
3. the RAM file is overwritten with garbage (a new host, a reused file...);
4. a new QEMU with the same configuration and -incoming defer;
5. `migd vm restore IMAGE`: checked, restored, running again (with --postcopy: the
   guest runs once QEMU has its device state, and its RAM follows, the pages it
   touches first; docs/postcopy.md);
6. with --guest, the guest's console must go on ticking with no CORRUPT and no reboot.

Run:  python examples/vm_suspend_resume.py [--guest DIR] [--size-mib 512] [--socket S]
                                         [--live] [--postcopy]
(without --socket it starts a migd of its own). Needs QEMU >= 9.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

TIMEOUT = 180.0  # seconds for a TCG guest to boot and tick


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def qemu_command(
    work: Path, name: str, ram: Path, mib: int, guest: Path | None, accel: str, incoming: bool
) -> list[str]:
    argv = [
        "qemu-system-x86_64", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
        "-M", "q35", "-m", f"{mib}M", "-smp", "1", "-nodefaults", "-display", "none",
        "-object", f"memory-backend-file,id=ram0,size={mib}M,mem-path={ram},share=on",
        "-machine", "memory-backend=ram0",
        "-qmp", f"unix:{work / name}.sock,server=on,wait=off",
        "-serial", f"file:{work / name}.console",
    ]  # fmt: skip
    if guest is not None:
        argv += [
            "-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.img"),
            "-append", "console=ttyS0 quiet panic=-1 workload.mib=64",
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def kvm_works(work: Path, guest: Path | None) -> bool:
    """Some hosts have /dev/kvm but cannot run a guest (nested hypervisors: QEMU aborts,
    or the kernel loops in early boot). Boot it with KVM for a while and see."""
    if not os.path.exists("/dev/kvm"):
        return False
    probe = work / "probe"
    proc = subprocess.Popen(
        qemu_command(work, "probe", work / "probe-ram", 256, guest, "kvm", False),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + (20 if guest is not None else 3)
        while time.monotonic() < deadline and proc.poll() is None:
            console = probe.with_suffix(".console")
            if guest is not None and console.exists() and b"guest: boot" in console.read_bytes():
                return True
            time.sleep(0.2)  # the console is a file the guest writes
        return guest is None and proc.poll() is None  # firmware: alive is enough
    finally:
        proc.kill()
        proc.wait()


async def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"QEMU did not start (exit {proc.poll()})")
        await asyncio.sleep(0.05)


def ticks(console: Path) -> list[tuple[int, str]]:
    text = console.read_bytes() if console.exists() else b""
    return [(int(m[1]), m[2].decode()) for m in re.finditer(rb"^tick (\d+) (\w+)", text, re.M)]


async def wait_tick(console: Path, above: int) -> int:
    deadline = time.monotonic() + TIMEOUT
    while True:
        seen = ticks(console)
        if any(state != "ok" for _, state in seen):
            raise SystemExit(f"guest memory CORRUPT: {console.read_text(errors='replace')}")
        if seen and seen[-1][0] > above:
            return seen[-1][0]
        if time.monotonic() > deadline:
            raise SystemExit(f"no tick above {above} within {TIMEOUT} s")
        await asyncio.sleep(0.2)  # the console is a file the guest writes


def migd_vm(socket: Path, qmp: Path, *args: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "migd", "vm", args[0], "--qmp", str(qmp), "--socket",
         str(socket), "--json", "-q", *args[1:]],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"migd vm {args[0]} failed: {result.stderr.strip()}")
    return dict(json.loads(result.stdout))


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--guest", type=Path, default=None, help="a make-guest.sh directory")
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--socket", type=Path, default=None, help="a running migd's socket")
    p.add_argument("--live", action="store_true", help="save the RAM while the guest runs")
    p.add_argument("--postcopy", action="store_true", help="run the guest before its RAM is back")
    args = p.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("qemu-system-x86_64 not found (../shared/tools/install-qemu.sh)")
    with (
        tempfile.TemporaryDirectory(prefix="migd-vm-", dir="/tmp") as tmp,
        tempfile.TemporaryDirectory(prefix="migd-vm-", dir="/dev/shm") as shm,
    ):
        work, ram, image = Path(tmp), Path(shm) / "guest-ram", Path(tmp) / "guest.img"
        accel = "kvm" if kvm_works(work, args.guest) else "tcg"
        daemon = None
        socket = args.socket
        if socket is None:
            socket = work / "migd.sock"
            daemon = subprocess.Popen([sys.executable, "-m", "migd", "serve", "--socket",
                                       str(socket), "--log-level", "warning"])  # fmt: skip
        try:
            step(f"boot a {args.size_mib} MiB guest ({accel}, "
                 f"{'kernel ' + str(args.guest) if args.guest else 'firmware only'})")  # fmt: skip
            first = subprocess.Popen(
                qemu_command(work, "first", ram, args.size_mib, args.guest, accel, False)
            )
            await wait_socket(work / "first.sock", first)
            last = 0
            if args.guest is not None:
                last = await wait_tick(work / "first.console", 1)
                print(f"    guest ticking: tick {last} ok")

            flags = ["--live", "--quit"] if args.live else ["--quit"]
            step(f"migd vm save {' '.join(flags)} {image}")
            saved = migd_vm(socket, work / "first.sock", "save", *flags, str(image))
            first.wait(30)
            seconds = saved["seconds"]
            assert isinstance(seconds, dict)
            if "live-pass" in seconds:
                print(f"    live pass {seconds['live-pass']:.3f} s while the guest ran")
            print(f"    downtime {seconds['downtime']:.3f} s (stop -> image durable): device "
                  f"state {seconds['device-state']:.3f} s, RAM {seconds['ram']:.3f} s")  # fmt: skip
            last = max(last, *(n for n, _ in ticks(work / "first.console")), 0)

            step("overwrite the RAM file with garbage, start a new QEMU with -incoming defer")
            with open(ram, "r+b") as f:
                f.write(os.urandom(args.size_mib << 20))
            second = subprocess.Popen(
                qemu_command(work, "second", ram, args.size_mib, args.guest, accel, True)
            )
            await wait_socket(work / "second.sock", second)

            restore = ["restore", "--postcopy"] if args.postcopy else ["restore"]
            step(f"migd vm {' '.join(restore)} {image}")
            restored = migd_vm(socket, work / "second.sock", *restore, str(image))
            seconds = restored["seconds"]
            assert isinstance(seconds, dict)
            # The guest is down while the command starts too: its start-up counts.
            startup = seconds.get("startup", 0.0)
            if args.postcopy:
                print(f"    downtime {startup + seconds['downtime']:.3f} s (command -> running): "
                      f"start-up {startup:.3f} s, checks {seconds['checks']:.3f} s, device "
                      f"state {seconds['device-state']:.3f} s; its RAM all in "
                      f"{seconds['ram-after-start']:.3f} s later")  # fmt: skip
            else:
                print(f"    downtime {startup + seconds['downtime']:.3f} s (command -> running): "
                      f"start-up {startup:.3f} s, checks {seconds['checks']:.3f} s, RAM "
                      f"{seconds['ram']:.3f} s, device state "
                      f"{seconds['device-state']:.3f} s")  # fmt: skip

            client = QMPClient("example")
            await client.connect(str(work / "second.sock"))
            status = (await client.execute("query-status"))["status"]
            print(f"    the new QEMU is {status}")
            if args.guest is not None:
                now = await wait_tick(work / "second.console", last + 1)
                console = (work / "second.console").read_text(errors="replace")
                if "guest: boot" in console:
                    raise SystemExit("the guest rebooted instead of resuming")
                print(f"    guest ticking on: tick {now} ok (was {last}), no CORRUPT, no reboot")
            await client.execute("quit")
            with contextlib.suppress(EOFError, OSError):  # QEMU closes the socket as it quits
                await client.disconnect()
            second.wait(30)
        finally:
            if daemon is not None:
                daemon.terminate()
                daemon.wait(30)
    step("done")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
