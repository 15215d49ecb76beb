"""A small real Linux guest for end-to-end tests (../shared/tools/make-guest.sh).

The guest's console (a serial file) prints `guest: boot ...` once per boot, then
`tick N ok ...` every round while it re-checks a tmpfs file and a rewritten region, and
`tick N CORRUPT ...` if its memory changed under it. `guest_dir()` builds it once per
machine (make-guest.sh is idempotent) or skips the test saying why; `accelerator()` uses
KVM only if a probe boot gets as far as the guest's first line, else TCG.
"""

from __future__ import annotations

import asyncio
import functools
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

MAKE_GUEST = Path(__file__).resolve().parents[2] / "shared" / "tools" / "make-guest.sh"
GUEST_DIR = Path("/var/tmp/migd-test-guest")
KVM_PROBE_SECONDS = 20.0
TICK = re.compile(rb"^tick (\d+) (ok|CORRUPT)", re.M)


@functools.cache
def _built() -> Path | str:
    if not MAKE_GUEST.is_file():
        return f"{MAKE_GUEST} not found"
    try:
        result = subprocess.run(
            ["sh", str(MAKE_GUEST), str(GUEST_DIR)], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"make-guest.sh failed: {exc}"
    if result.returncode != 0:
        return f"make-guest.sh failed: {result.stderr.strip()[-500:]}"
    return GUEST_DIR


def guest_dir() -> Path:
    """The guest's directory (vmlinuz, initrd.img); skips the test if it cannot be built."""
    built = _built()
    if isinstance(built, str):
        pytest.skip(f"no test guest: {built}")
    return built


def qemu_args(
    ram: Path, size_mib: int, serial: Path, accel: str, mib: int = 64, incoming: bool = False
) -> list[str]:
    d = guest_dir()
    cpu = "host" if accel == "kvm" else "max"
    return [
        "-accel", accel, "-cpu", cpu, "-M", "q35", "-m", f"{size_mib}M", "-smp", "1",
        "-nodefaults", "-display", "none",
        "-object", f"memory-backend-file,id=ram0,size={size_mib}M,mem-path={ram},share=on",
        "-machine", "memory-backend=ram0", "-device", "virtio-rng-pci",
        "-kernel", str(d / "vmlinuz"), "-initrd", str(d / "initrd.img"),
        "-append", f"console=ttyS0 quiet panic=-1 workload.mib={mib}",
        "-serial", f"file:{serial}",
        *(["-incoming", "defer"] if incoming else []),
    ]  # fmt: skip


@functools.cache
def accelerator() -> str:
    """'kvm' if this machine's KVM boots the guest (some nested hypervisors abort or loop
    in its early boot), else 'tcg'."""
    if not Path("/dev/kvm").exists():
        return "tcg"
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        serial = Path(tmp) / "serial"
        proc = subprocess.Popen(
            ["qemu-system-x86_64", *qemu_args(Path(tmp) / "ram", 256, serial, "kvm", mib=8)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + KVM_PROBE_SECONDS
            while time.monotonic() < deadline and proc.poll() is None:
                if serial.exists() and b"guest: boot" in serial.read_bytes():
                    return "kvm"
                time.sleep(0.2)  # polling a file the guest writes; no event to wait on
            return "tcg"
        finally:
            proc.kill()
            proc.wait()


def ticks(serial: Path) -> list[tuple[int, str]]:
    """(counter, 'ok' | 'CORRUPT') of every tick line so far."""
    try:
        data = serial.read_bytes()
    except FileNotFoundError:
        return []
    return [(int(m[1]), m[2].decode()) for m in TICK.finditer(data)]


async def wait_for_tick(
    serial: Path, above: int, timeout: float, proc: subprocess.Popen[bytes]
) -> int:
    """Wait until the console shows a tick counter above `above`; that counter."""
    deadline = time.monotonic() + timeout
    while True:
        seen = ticks(serial)
        bad = [n for n, state in seen if state != "ok"]
        assert not bad, f"guest memory corrupt at tick {bad[0]}: {serial.read_text()}"
        if seen and seen[-1][0] > above:
            return seen[-1][0]
        assert proc.poll() is None, f"QEMU exited: {serial.read_text(errors='replace')}"
        assert time.monotonic() < deadline, (
            f"no tick above {above} within {timeout} s: {serial.read_text(errors='replace')}"
        )
        await asyncio.sleep(0.2)  # polling the console file the guest writes
