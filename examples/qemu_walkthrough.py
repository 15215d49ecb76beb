"""A QEMU VM's RAM saved and restored with migd and QEMU 10: the flows that work, end to end.

The guest is a q35 PC whose RAM is a shared memory-backend-file on /dev/shm:

    qemu-system-x86_64 -M q35 -m 256M -machine memory-backend=ram0
        -object memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/...,share=on
        -nodefaults -display none -S -qmp unix:...

With `-machine memory-backend=ram0` QEMU names the RAM block "ram0", so a migd backend
on the same file with `ramblock-name: ram0` reads and writes exactly that block. Steps:

1. the guest runs briefly (its firmware writes to RAM) and is stopped;
2. QEMU saves the whole VM (mapped-ram, multifd, direct-io); migd restores only the
   RAM block from QEMU's file into a fresh file (`skip-unmatched-blocks`): a copy of the
   guest's RAM, to inspect or keep as a snapshot;
3. a new q35 QEMU restores QEMU's own file: the full-VM path QEMU already has;
4. split save: QEMU writes only the device state (`x-ignore-shared`: it skips the shared
   RAM), migd writes the RAM from the shared file, at disk speed;
5. split restore: migd restores the RAM into a fresh file, a new q35 QEMU on that file
   loads the device state, and the VM runs again;
6. the limit: a q35 QEMU refuses migd's file as a VM image (machine "none", no devices);
7. a QEMU without devices (`-M none`) loads migd's file directly.

Every step checks the bytes of the RAM against the stopped guest's. Why only these
flows, in short (details at each step and in examples/README.md): migd writes RAM only,
so its files are machine "none" streams without device state; QEMU refuses to migrate
a VM twice; and `x-ignore-shared` with `mapped-ram` fails in QEMU 10.0, so QEMU's
device-state file is a plain stream.

Run: python examples/qemu_walkthrough.py [--ram-mib 256] [--dir /tmp]   (QEMU >= 9.1)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from qemu.qmp import ConnectError, QMPClient

from migd.bench.processes import connect_qmp, start_migd

QEMU = "qemu-system-x86_64"
MiB = 1 << 20
PAGE = 4096
TIMEOUT = 60.0
# The capabilities and parameters of a mapped-ram save, the same for QEMU and migd (both
# speak QMP with QEMU's names). max-bandwidth 0: QEMU's default cap would slow it down.
MAPPED_RAM = {"multifd": True, "mapped-ram": True}
MAPPED_RAM_PARAMS = {"multifd-channels": 2, "direct-io": True, "max-bandwidth": 0}
# QEMU's device-state-only save: shared file-backed RAM (ram0) is left out of the stream.
# Not with mapped-ram: QEMU 10.0 fails that combination ("Unable to write to file: Bad
# address"), so this file is QEMU's plain sequential stream; it is small either way.
DEVICES_ONLY = {"multifd": False, "mapped-ram": False, "x-ignore-shared": True}
DEVICES_ONLY_PARAMS = {"direct-io": False, "max-bandwidth": 0}


def step(number: int, text: str) -> None:
    print(f"\n[{number}] {text}", flush=True)


def say(text: str) -> None:
    print(f"    {text}", flush=True)


# -- files ---------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * MiB):
            h.update(block)
    return h.hexdigest()


def fresh_ram(path: Path, size: int) -> Path:
    """A sparse all-zero file: QEMU's incoming side expects fresh RAM to be zero."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def check_ram(path: Path, want: str, what: str) -> None:
    if sha256(path) != want:
        raise RuntimeError(f"{what}: {path} differs from the guest's RAM")
    say(f"OK: {what} is byte for byte the stopped guest's RAM")


def describe(path: Path) -> None:
    """`migd inspect` (no daemon needed): machine type and RAM blocks of a save file."""
    out = subprocess.run(
        [sys.executable, "-m", "migd", "inspect", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines()[1:]:
        if line.strip() and not line.lstrip().startswith(("capabilities", "stream", "file")):
            say(f"  {line}")


def file_size(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size / MiB:.1f} MiB ({st.st_blocks * 512 / MiB:.1f} MiB allocated)"


# -- QMP: QEMU and migd are driven the same way --------------------------------------------


async def connect(socket_path: Path, proc: subprocess.Popen[bytes], name: str) -> QMPClient:
    """Connect (and negotiate) once the process listens; fail early if it died."""
    try:
        return await connect_qmp(socket_path, proc, name)
    except (OSError, ConnectError):
        raise RuntimeError(f"{name} did not come up (exit code {proc.poll()})") from None


async def migration(
    client: QMPClient,
    command: str,
    arguments: dict[str, Any],
    caps: dict[str, bool],
    params: dict[str, Any],
    *,
    must_complete: bool = True,
) -> dict[str, Any]:
    """Set capabilities and parameters, run migrate / migrate-incoming, poll to the end."""
    capabilities = [{"capability": name, "state": on} for name, on in caps.items()]
    await client.execute("migrate-set-capabilities", {"capabilities": capabilities})
    await client.execute("migrate-set-parameters", params)
    await client.execute(command, arguments)
    deadline = time.monotonic() + TIMEOUT
    while (info := await client.execute("query-migrate")).get("status") not in (
        "completed",
        "failed",
        "cancelled",
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{command} still {info.get('status')} after {TIMEOUT} s")
        await asyncio.sleep(0.02)
    if must_complete and info["status"] != "completed":
        raise RuntimeError(f"{command}: {info['status']}: {info.get('error-desc')}")
    return info


async def mapped_ram(
    client: QMPClient, command: str, uri: str, *, must_complete: bool = True, **extra: Any
) -> dict[str, Any]:
    """A mapped-ram save or restore (multifd, direct-io): the format migd and QEMU share."""
    arguments = {"uri": uri, **{k.replace("_", "-"): v for k, v in extra.items()}}
    return await migration(
        client, command, arguments, MAPPED_RAM, MAPPED_RAM_PARAMS, must_complete=must_complete
    )


async def device_state(client: QMPClient, command: str, uri: str) -> dict[str, Any]:
    """QEMU's save or load of everything but the shared RAM (x-ignore-shared)."""
    return await migration(client, command, {"uri": uri}, DEVICES_ONLY, DEVICES_ONLY_PARAMS)


class Qemu:
    """One QEMU process with its QMP connection; the context manager always reaps it."""

    def __init__(self, name: str, workdir: Path, args: list[str]) -> None:
        self.name, self.args = name, args
        self.socket_path = workdir / f"{name}.qmp"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp = QMPClient(name)

    async def __aenter__(self) -> Qemu:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [QEMU, *self.args, "-qmp", f"unix:{self.socket_path},server=on,wait=off"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self.qmp = await connect(self.socket_path, self.proc, self.name)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        return self

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(command, arguments)

    async def status(self) -> str:
        return str((await self.execute("query-status"))["status"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace").strip()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp.execute("quit"), 5)
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def vm_args(machine: str, ram: Path, size: int, *extra: str) -> list[str]:
    """A stopped machine whose only guest RAM is the shared file `ram` (block "ram0")."""
    backend = f"memory-backend-file,id=ram0,size={size},mem-path={ram},share=on"
    return [
        *("-M", machine, "-m", f"{size // MiB}M", "-machine", "memory-backend=ram0"),
        *("-object", backend, "-nodefaults", "-display", "none", "-S", *extra),
    ]


# -- the walkthrough -----------------------------------------------------------------------


async def walkthrough(shm: Path, work: Path, size: int, migd: QMPClient) -> None:
    async def migd_backend(path: Path) -> None:
        # The id is migd's own; ramblock-name is what must match QEMU's block name.
        await migd.execute(
            "object-add",
            {
                "qom-type": "memory-backend-file",
                "id": "guest",
                "size": size,
                "mem-path": str(path),
                "share": True,
                "ramblock-name": "ram0",
            },
        )

    step(1, f"a q35 guest with {size // MiB} MiB of RAM in {shm / 'vm1-ram'}")
    guest = shm / "vm1-ram"
    rng = np.random.default_rng(1)
    before = rng.integers(0, 256, size, dtype=np.uint8)
    before[size // 4 : size // 2] = 0  # some free memory: zero pages are skipped
    guest.write_bytes(before.tobytes())
    vm1 = Qemu("vm1", work, vm_args("q35", guest, size))
    async with vm1:
        # Let the firmware run a moment: it writes to RAM, CPUs and devices get real state.
        await vm1.execute("cont")
        await asyncio.sleep(0.3)
        await vm1.execute("stop")
        after = np.fromfile(guest, dtype=np.uint8)
        changed = int((after != before).reshape(-1, PAGE).any(axis=1).sum())
        say(f"the guest ran and is stopped ({await vm1.status()}); its firmware changed")
        say(f"{changed} pages of {guest}: the shared file IS the guest's RAM")
        want = sha256(guest)  # the stopped guest's RAM: every later step must give this

        step(2, "QEMU saves the whole VM; migd restores only its RAM block from QEMU's file")
        full = work / "qemu-full.sav"
        await mapped_ram(vm1.qmp, "migrate", f"file:{full}")
        say(f"QEMU wrote {full}: {file_size(full)}")
        describe(full)
    # vm1 is done: QEMU 10 refuses a second migration of a VM it already migrated ("Can't
    # migrate the vm that was paused due to previous migration"), so step 4 uses vm2.

    snapshot = shm / "ram-snapshot"
    await migd_backend(snapshot)  # migd creates the file and sizes it
    info = await mapped_ram(migd, "migrate-incoming", f"file:{full}", skip_unmatched_blocks=True)
    await migd.execute("object-del", {"id": "guest"})
    say(f"migd restored ram0 into {snapshot}; skipped {info['x-skipped-blocks']}")
    check_ram(snapshot, want, "migd's copy of the RAM from QEMU's save")

    step(3, "a new q35 QEMU restores QEMU's own file (the full-VM path)")
    vm2_ram = fresh_ram(shm / "vm2-ram", size)
    vm2 = Qemu("vm2", work, vm_args("q35", vm2_ram, size, "-incoming", "defer"))
    async with vm2:
        await mapped_ram(vm2.qmp, "migrate-incoming", f"file:{full}")
        say(f"vm2 loaded {full.name}: {await vm2.status()}")
        check_ram(vm2_ram, want, "vm2's RAM")

        step(4, "split save of vm2: QEMU writes the device state, migd writes the RAM")
        # The VM stays stopped from here on: RAM and device state must be of one moment.
        devices = work / "devices.sav"
        await device_state(vm2.qmp, "migrate", f"file:{devices}")
        say(f"QEMU wrote the device state and its small ROM blocks: {file_size(devices)}")
        ram_file = work / "migd-ram.sav"
        await migd_backend(vm2_ram)  # the very file QEMU maps: no copy, no QEMU involvement
        await mapped_ram(migd, "migrate", f"file:{ram_file}")
        await migd.execute("object-del", {"id": "guest"})
        say(f"migd wrote the RAM with multifd + direct-io: {file_size(ram_file)}")
        describe(ram_file)
    vm2_ram.unlink()
    say("vm2 quit and its RAM file is deleted: the VM now exists only in the two files")

    step(5, "split restore: migd restores the RAM, then a new q35 QEMU loads the devices")
    # RAM first: loading device state may read guest memory (virtio rings, for example).
    vm3_ram = shm / "vm3-ram"
    await migd_backend(vm3_ram)
    await mapped_ram(migd, "migrate-incoming", f"file:{ram_file}")
    await migd.execute("object-del", {"id": "guest"})
    check_ram(vm3_ram, want, f"migd's restore into {vm3_ram.name}")
    vm3 = Qemu("vm3", work, vm_args("q35", vm3_ram, size, "-incoming", "defer"))
    async with vm3:
        # x-ignore-shared on this side too: ram0 is taken as it is in the shared file.
        await device_state(vm3.qmp, "migrate-incoming", f"file:{devices}")
        say(f"vm3 loaded the device state: {await vm3.status()}")
        check_ram(vm3_ram, want, "vm3's RAM after loading the device state")
        await vm3.execute("cont")
        say(f"vm3 continues: {await vm3.status()}")

    step(6, "the limit: a q35 QEMU cannot load migd's file as a VM image")
    vm4_ram = fresh_ram(shm / "vm4-ram", size)
    vm4 = Qemu("vm4", work, vm_args("q35", vm4_ram, size, "-incoming", "defer"))
    async with vm4:
        # exit-on-error false: QEMU reports the failure instead of exiting (QEMU >= 9.1).
        uri = f"file:{ram_file}"
        info = await mapped_ram(
            vm4.qmp, "migrate-incoming", uri, exit_on_error=False, must_complete=False
        )
        await asyncio.sleep(0.1)  # let QEMU's stderr reach the log
        reason = re.findall(r"Machine type received .*", vm4.log())
        say(f"vm4: {info['status']}: {info.get('error-desc')}")
        say(f"QEMU's log: {reason[0] if reason else vm4.log()}")
        if info["status"] == "completed":
            raise RuntimeError("a q35 QEMU accepted a RAM-only file: this QEMU differs")
    say("expected: migd's file is a machine 'none' stream with RAM and no device state")

    step(7, "a QEMU without devices (-M none) loads migd's file directly")
    vm5_ram = fresh_ram(shm / "vm5-ram", size)
    vm5 = Qemu("vm5", work, vm_args("none", vm5_ram, size, "-incoming", "defer"))
    async with vm5:
        await mapped_ram(vm5.qmp, "migrate-incoming", f"file:{ram_file}")
        say(f"vm5 (-M none) loaded {ram_file.name}: {await vm5.status()}")
        check_ram(vm5_ram, want, "vm5's RAM")


def qemu_version() -> tuple[int, int] | None:
    if shutil.which(QEMU) is None:
        return None
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"version (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else None


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram-mib", type=int, default=256, help="guest RAM (default 256)")
    parser.add_argument("--dir", default="/tmp", help="where save files go (default /tmp)")
    args = parser.parse_args()
    version = qemu_version()
    if version is None or version < (9, 1):
        print(f"needs {QEMU} >= 9.1 (mapped-ram); found {version}")
        return 2
    print(f"QEMU {version[0]}.{version[1]}, guest RAM {args.ram_mib} MiB")
    with (
        tempfile.TemporaryDirectory(prefix="migd-walk-", dir="/dev/shm") as shm,
        tempfile.TemporaryDirectory(prefix="migd-walk-", dir=args.dir) as work,
    ):
        socket_path = Path(work) / "migd.sock"
        daemon = start_migd(socket_path, "--log-level", "warning")
        try:
            migd = await connect(socket_path, daemon, "migd")
            try:
                await walkthrough(Path(shm), Path(work), args.ram_mib * MiB, migd)
            finally:
                await migd.disconnect()
        except RuntimeError as exc:
            print(f"\nFAILED: {exc}")
            return 1
        finally:
            daemon.terminate()
            daemon.wait(10)
    print("\nall steps passed")
    return 0


if __name__ == "__main__":
    # Memory files hold guest RAM: created private (0600), as migd wants them before it
    # restores into them (a file others may read is refused).
    os.umask(0o077)
    sys.exit(asyncio.run(main()))
