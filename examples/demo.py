"""migd's main job in one run: start a daemon, save a memory region to disk, restore it.

Run with `make demo` (1 GiB) or `python examples/demo.py --size-mib 64`. The memory is a
/dev/shm file filled with random data and 2 MiB clusters of zeros, saved with multifd
and direct-io to a file under /tmp, restored into a second region that held other data,
and compared. Everything lives in temporary directories removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from qemu.qmp import QMPClient

from migd.bench.processes import connect_qmp, start_migd

MiB = 1 << 20


def make_memory(path: Path, size: int) -> str:
    """Random bytes with a quarter of the 2 MiB clusters zero, as free guest memory is."""
    rng = np.random.default_rng(2026)
    with open(path, "wb") as f:
        for at in range(0, size, 64 * MiB):
            chunk = rng.integers(0, 256, min(64 * MiB, size - at), dtype=np.uint8)
            for c in range(0, chunk.size, 2 * MiB):
                if rng.random() < 0.25:
                    chunk[c : c + 2 * MiB] = 0
            f.write(chunk.tobytes())
    return digest(path)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * MiB):
            h.update(block)
    return h.hexdigest()


def cached_bytes(path: Path) -> int | None:
    """How much of `path` sits in the page cache (fincore), if fincore is installed."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
    )
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None


async def run_job(client: QMPClient, command: str, uri: str) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    await client.execute(command, {"uri": uri})
    last_print = 0.0
    while True:
        info = await client.execute("query-migrate")
        if info["status"] in ("completed", "failed", "cancelled"):
            print()
            return info, time.monotonic() - started
        ram = info.get("ram", {})
        if ram and time.monotonic() - last_print > 0.25:
            last_print = time.monotonic()
            done = ram["total"] - ram["remaining"]
            print(
                f"\r  {command}: {100 * done / max(1, ram['total']):5.1f}%  "
                f"{ram['mbps'] / 8 / 1000:6.2f} GB/s",
                end="",
                flush=True,
            )
        await asyncio.sleep(0.05)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--dir", default="/tmp", help="where the save file goes")
    args = parser.parse_args()
    size = args.size_mib * MiB
    with (
        tempfile.TemporaryDirectory(prefix="migd-demo-", dir="/dev/shm") as shm,
        tempfile.TemporaryDirectory(prefix="migd-demo-", dir=args.dir) as work,
    ):
        src, dst = Path(shm) / "vm-ram", Path(shm) / "new-vm-ram"
        save_file = Path(work) / "vm.sav"
        sock = os.path.join(work, "qmp.sock")
        print(f"making {args.size_mib} MiB of memory in {src} (random, 25% zero clusters)")
        want = make_memory(src, size)
        dst.write_bytes(b"\xab" * size)  # the restore target holds other data first

        daemon = start_migd(sock, "--log-level", "warning")
        client = await connect_qmp(sock, daemon, "demo")
        try:
            print(f"connected: {(await client.execute('query-version'))['package']} on {sock}")
            caps = [{"capability": c, "state": True} for c in ("multifd", "mapped-ram", "events")]
            await client.execute("migrate-set-capabilities", {"capabilities": caps})
            await client.execute(
                "migrate-set-parameters",
                {"multifd-channels": min(4, os.cpu_count() or 1), "direct-io": True},
            )
            await client.execute(
                "object-add",
                {
                    "qom-type": "memory-backend-file",
                    "id": "ram0",
                    "size": size,
                    "mem-path": str(src),
                },
            )
            info, seconds = await run_job(client, "migrate", f"file:{save_file}")
            if info["status"] != "completed":
                print(f"save failed: {info.get('error-desc')}")
                return 1
            st = os.stat(save_file)
            cached = cached_bytes(save_file)
            print(
                f"saved {size / MiB:.0f} MiB to {save_file} in {seconds:.2f} s: "
                f"{size / seconds / (1 << 30):.2f} GiB/s; {info['ram']['duplicate']} zero "
                f"pages skipped; file {st.st_size / MiB:.0f} MiB apparent, "
                f"{st.st_blocks * 512 / MiB:.0f} MiB allocated"
            )
            if cached is not None:
                print(
                    f"page cache holds {cached / MiB:.1f} MiB of the save file "
                    f"({100 * cached / size:.2f}% of the bytes saved): direct-io bypassed it"
                )

            await client.execute("object-del", {"id": "ram0"})
            await client.execute(
                "object-add",
                {
                    "qom-type": "memory-backend-file",
                    "id": "ram0",
                    "size": size,
                    "mem-path": str(dst),
                },
            )
            info, seconds = await run_job(client, "migrate-incoming", f"file:{save_file}")
            if info["status"] != "completed":
                print(f"restore failed: {info.get('error-desc')}")
                return 1
            print(f"restored into {dst} in {seconds:.2f} s: {size / seconds / (1 << 30):.2f} GiB/s")
            same = digest(dst) == want
            print(
                "restored memory is identical to the saved memory"
                if same
                else "MISMATCH: restored memory differs"
            )
            return 0 if same else 1
        finally:
            await client.disconnect()
            daemon.terminate()
            daemon.wait(10)


if __name__ == "__main__":
    # Memory files hold guest RAM: created private (0600), as migd wants them before it
    # restores into them (a file others may read is refused).
    os.umask(0o077)
    sys.exit(asyncio.run(main()))
