"""What the report says of the machine: CPU, memory, kernel, disk, filesystem, QEMU."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from .common import GiB
from .disk import meminfo

# --- the machine -----------------------------------------------------------------------


def qemu_version(binary: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


def command_output(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def block_device(source: str) -> dict[str, str]:
    """The driver (virtio_blk, nvme...), scheduler and rotational flag of /dev/NAME."""
    name = Path(source).name
    sys_dev = Path("/sys/class/block") / name
    if not sys_dev.exists():
        return {}
    if (sys_dev / "partition").exists():  # a partition: the queue belongs to the disk
        sys_dev = sys_dev.resolve().parent
    facts: dict[str, str] = {}
    with contextlib.suppress(OSError):
        facts["driver"] = (sys_dev / "device" / "driver").resolve().name
    with contextlib.suppress(OSError):
        sched = (sys_dev / "queue" / "scheduler").read_text()
        m = re.search(r"\[(\S+)\]", sched)
        facts["scheduler"] = m.group(1) if m else sched.strip()
    with contextlib.suppress(OSError):
        rot = (sys_dev / "queue" / "rotational").read_text().strip()
        facts["rotational"] = {"0": "no", "1": "yes"}.get(rot, rot)
    return facts


def machine_facts(directory: Path, qemu: str | None) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mount = command_output(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", str(directory)])
    source, _, fstype = mount.partition(" ")
    fio = command_output(["fio", "--version"]) if shutil.which("fio") else ""
    return {
        "cpu": cpu or platform.processor() or "?",
        "cpus": os.cpu_count(),
        "memory_gib": round(meminfo("MemTotal") / GiB, 1),
        "kernel": platform.release(),
        "virtualization": command_output(["systemd-detect-virt"]) or None,
        "python": platform.python_version(),
        "migd": __version__,
        "qemu": qemu,
        "fio": fio or None,
        "dir": str(directory),
        "dir_device": source.strip() or None,
        "dir_fs": fstype.strip() or None,
        "dir_disk": block_device(source.strip()) if source.startswith("/dev/") else {},
        "loadavg_start": os.getloadavg()[0],
    }
