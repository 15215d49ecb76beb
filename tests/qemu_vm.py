"""A small driver for a real qemu-system-x86_64 process, for interoperability tests.

`QemuVM` starts QEMU with a QMP UNIX socket in a short directory, connects a
`qemu.qmp.QMPClient` (bounded retries), runs commands, polls `query-migrate` with a
timeout, and quits and reaps the process; `close()` always kills what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

QEMU_BINARY = "qemu-system-x86_64"
MIN_QEMU = (9, 1)  # first release with the mapped-ram capability
SKIP_REASON = "QEMU >= 9.1 not installed (run ../shared/tools/install-qemu.sh)"
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})


@functools.cache
def qemu_version(binary: str = QEMU_BINARY) -> tuple[int, int] | None:
    """(major, minor) of the installed QEMU, or None when it is missing or unusable."""
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"version (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else None


def qemu_available() -> bool:
    version = qemu_version()
    return version is not None and version >= MIN_QEMU


requires_qemu = pytest.mark.skipif(not qemu_available(), reason=SKIP_REASON)


class QemuVM:
    """One QEMU process and its QMP connection. Use as an async context manager."""

    def __init__(
        self,
        args: Sequence[str],
        sock_dir: Path,
        *,
        name: str = "qemu",
        binary: str = QEMU_BINARY,
    ) -> None:
        self.args = list(args)
        self.sock_path = Path(sock_dir) / f"{name}.sock"
        self.log_path = Path(sock_dir) / f"{name}.log"
        self.binary = binary
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: Any = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, connect_timeout: float = 15.0) -> QemuVM:
        from qemu.qmp import QMPClient

        if len(str(self.sock_path)) > 100:
            raise ValueError(f"QMP socket path too long for AF_UNIX: {self.sock_path}")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, *self.args, "-qmp", f"unix:{self.sock_path},server=on,wait=off"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + connect_timeout
        last_exc: BaseException | None = None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.proc.returncode}: {self.log()}")
            if self.sock_path.exists():
                client = QMPClient(self.name)
                try:
                    await asyncio.wait_for(client.connect(str(self.sock_path)), 5)
                except (TimeoutError, OSError, Exception) as exc:
                    last_exc = exc
                    with contextlib.suppress(Exception):
                        await client.disconnect()
                else:
                    self.qmp = client
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"could not connect to QEMU's QMP socket within {connect_timeout}s "
                    f"({last_exc!r}): {self.log()}"
                )
            await asyncio.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""

    async def cmd(
        self, name: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> Any:
        """Execute one QMP command; raises qemu.qmp.ExecuteError on an error reply."""
        assert self.qmp is not None, "QEMU is not connected"
        return await asyncio.wait_for(self.qmp.execute(name, arguments), timeout)

    async def set_mapped_ram(self, *, channels: int | None = None, direct_io: bool = True) -> None:
        """multifd + mapped-ram + events, direct-io, unlimited bandwidth."""
        caps = [{"capability": c, "state": True} for c in ("multifd", "mapped-ram", "events")]
        await self.cmd("migrate-set-capabilities", {"capabilities": caps})
        params: dict[str, Any] = {"direct-io": direct_io, "max-bandwidth": 0}
        if channels is not None:
            params["multifd-channels"] = channels
        await self.cmd("migrate-set-parameters", params)

    async def wait_migration(self, timeout: float = 30.0, poll: float = 0.02) -> dict[str, Any]:
        """Poll query-migrate until a final status; return the last MigrationInfo."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.cmd("query-migrate")
            if info.get("status") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"QEMU migration still {info.get('status')} after {timeout}s")
            await asyncio.sleep(poll)

    async def quit(self, timeout: float = 10.0) -> int | None:
        """Ask QEMU to quit, then reap it (killing it if it does not exit in time)."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 5)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 5)
            self.qmp = None
        if self.proc is None:
            return None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the process if it still runs and reap it. Idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    async def close(self) -> None:
        """Teardown: quit politely, and kill no matter what."""
        try:
            await self.quit()
        finally:
            self.kill()
            with contextlib.suppress(OSError):
                self.sock_path.unlink()

    async def __aenter__(self) -> QemuVM:
        try:
            return await self.start()
        except BaseException:
            self.kill()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
