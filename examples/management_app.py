"""A management application driving migd the way libvirt drives QEMU: every file is an fd.

The app (not migd) owns all files: it creates the VM's memory as a memfd, opens the save
file itself, writes its own 4 KiB header at the start (a magic and JSON metadata, like
libvirt's save-image header) and hands migd only file descriptors (`add-fd` with
SCM_RIGHTS), so migd needs no access to any path:

1. memory: a memfd filled with data, passed with add-fd and added as a memory backend
   with `mem-path: /dev/fdset/N`;
2. save: the save file passed twice into one fd set, opened O_WRONLY and, separately,
   O_WRONLY|O_DIRECT (with multifd + direct-io migd, like QEMU, needs a buffered fd for
   the stream and an O_DIRECT twin for the page channels), then
   `migrate file:/dev/fdset/N,offset=4096`, following MIGRATION events to completion;
3. restore: a new memfd backend and a second fd set of O_RDONLY twins, then
   `migrate-incoming`; the app checks the bytes and that its header survived.

Run against a running migd:      python examples/management_app.py /run/migd/migd.sock
or with a migd of its own:       python examples/management_app.py --spawn [--size-mib 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient

MiB = 1 << 20
CLUSTER = 2 * MiB
HEADER_SIZE = 4096  # the app's header; migd's stream starts right after it (offset=4096)
MAGIC = b"MigdExampleSave\0"  # 16 bytes, as libvirt's "LibvirtQemudSave"
BACKEND_ID = "vm-ram"
FINAL = ("completed", "failed", "cancelled")
TIMEOUT = 120.0


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


# -- the app's own save-file header --------------------------------------------------------


def encode_header(metadata: dict[str, Any]) -> bytes:
    """MAGIC, be32 version, be32 JSON length, JSON, zero padding to HEADER_SIZE."""
    blob = json.dumps(metadata, sort_keys=True).encode()
    head = MAGIC + struct.pack(">II", 1, len(blob)) + blob
    if len(head) > HEADER_SIZE:
        raise ValueError("metadata does not fit in the header")
    return head.ljust(HEADER_SIZE, b"\0")


def decode_header(raw: bytes) -> dict[str, Any]:
    if len(raw) < HEADER_SIZE or not raw.startswith(MAGIC):
        raise ValueError("not one of our save files (bad magic)")
    version, length = struct.unpack_from(">II", raw, len(MAGIC))
    if version != 1:
        raise ValueError(f"unsupported header version {version}")
    start = len(MAGIC) + 8
    return json.loads(raw[start : start + length])


# -- memory --------------------------------------------------------------------------------


def guest_memory(size: int, seed: int = 2026) -> bytes:
    """Random pages with every fourth 2 MiB cluster zero (migd skips zero pages)."""
    data = bytearray(random.Random(seed).randbytes(size))
    for at in range(0, size, 4 * CLUSTER):
        data[at : at + CLUSTER] = bytes(min(CLUSTER, size - at))
    return bytes(data)


def memfd_with(name: str, data: bytes) -> int:
    """A memfd of len(data) bytes holding data (as a VMM's guest RAM would be)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, len(data))
    with mmap.mmap(fd, len(data)) as view:
        view[:] = data
    return fd


def memfd_bytes(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
        return bytes(view)


# -- QMP helpers ---------------------------------------------------------------------------


async def add_fd(client: QMPClient, fd: int, fdset_id: int | None, opaque: str) -> int:
    """Pass fd with SCM_RIGHTS, then add-fd consumes it; returns the fd set's id.

    migd keeps its own copy of the fd, so the caller may close fd right after.
    """
    arguments: dict[str, Any] = {"opaque": opaque}
    if fdset_id is not None:
        arguments["fdset-id"] = fdset_id
    client.send_fd_scm(fd)  # one space byte carrying the fd, just before the command
    reply = await client.execute("add-fd", arguments)
    print(f"    add-fd {opaque:<28} -> fdset {reply['fdset-id']}, migd's fd {reply['fd']}")
    return int(reply["fdset-id"])


async def add_file_twins(client: QMPClient, path: Path, access: int, what: str) -> tuple[int, bool]:
    """Open path twice (a buffered fd and an O_DIRECT twin) into one new fd set.

    The twin must be a separate open(), not a dup(): a dup shares the open file
    description and with it the O_DIRECT flag. Returns (fdset id, direct-io usable);
    a filesystem that refuses O_DIRECT gets the buffered fd alone.
    """
    names = {os.O_WRONLY: "O_WRONLY", os.O_RDONLY: "O_RDONLY"}
    fd = os.open(path, access)
    try:
        fdset_id = await add_fd(client, fd, None, f"{what} {names[access]}")
    finally:
        os.close(fd)
    try:
        direct = os.open(path, access | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        print(f"    {path.parent} refuses O_DIRECT: one buffered fd, direct-io off")
        return fdset_id, False
    try:
        await add_fd(client, direct, fdset_id, f"{what} {names[access]}|O_DIRECT")
    finally:
        os.close(direct)
    return fdset_id, True


async def add_memfd_backend(client: QMPClient, memfd: int, size: int) -> None:
    """object-add a memory-backend-file on the memfd, through a short-lived fd set."""
    fdset_id = await add_fd(client, memfd, None, f"{BACKEND_ID} memfd O_RDWR")
    try:
        await client.execute(
            "object-add",
            {
                "qom-type": "memory-backend-file",
                "id": BACKEND_ID,
                "size": size,
                "mem-path": f"/dev/fdset/{fdset_id}",
                "share": True,
            },
        )
        print(f"    object-add {BACKEND_ID}: {size // MiB} MiB on /dev/fdset/{fdset_id}")
    finally:
        # The backend keeps its own reference to the memory: the set is no longer needed.
        await client.execute("remove-fd", {"fdset-id": fdset_id})


async def run_migration(client: QMPClient, command: str, uri: str) -> dict[str, Any]:
    """Start migrate/migrate-incoming and follow MIGRATION events to a final status."""
    # Listen before starting the job, so that no event can slip past.
    with client.listener("MIGRATION") as listener:
        await client.execute(command, {"uri": uri})
        print(f"    {command} {uri}")
        async with asyncio.timeout(TIMEOUT):
            async for event in listener:
                status = event["data"]["status"]
                print(f"    event MIGRATION: {status}")
                if status in FINAL:
                    break
    info = await client.execute("query-migrate")
    if info["status"] != "completed":
        raise RuntimeError(f"{command} {info['status']}: {info.get('error-desc')}")
    return info


# -- migd ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def connect(socket_path: str | None, spawn: bool) -> AsyncIterator[QMPClient]:
    """A negotiated QMPClient: to socket_path, or to a migd started for this run."""
    daemon: subprocess.Popen[bytes] | None = None
    workdir: str | None = None
    if spawn:
        workdir = tempfile.mkdtemp(prefix="migd-app-", dir="/tmp")  # short: AF_UNIX limit
        socket_path = os.path.join(workdir, "qmp.sock")
        command = [sys.executable, "-m", "migd", "serve", "--socket", socket_path]
        daemon = subprocess.Popen([*command, "--log-level", "warning"])
        step(f"started migd (pid {daemon.pid}) on {socket_path}")
    assert socket_path is not None
    client = QMPClient("management-app")
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                await client.connect(socket_path)
                break
            except (OSError, ConnectError):
                # a daemon we started needs a moment to listen; anything else is final
                if daemon is None or daemon.poll() is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        yield client
    finally:
        await client.disconnect()
        if daemon is not None:
            daemon.terminate()
            print(f"==> stopped migd: exit code {daemon.wait(10)}")
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


# -- the scenario --------------------------------------------------------------------------


async def scenario(client: QMPClient, save_path: Path, size: int) -> bool:
    version = await client.execute("query-version")
    step(f"connected to {version['package']}")
    if await client.execute("query-memdev"):
        # migd saves every backend it has: this demo wants a daemon with none of its own.
        print("this migd already has memory backends; run with --spawn or an idle migd")
        return False

    step(f"creating the VM's memory: a {size // MiB} MiB memfd filled by the app")
    data = guest_memory(size)
    memfd = memfd_with("vm-ram", data)
    restored_fd = -1
    our_sets: list[int] = []  # fd sets to remove should anything fail
    try:
        await add_memfd_backend(client, memfd, size)

        step(f"writing the app's own {HEADER_SIZE}-byte header into {save_path}")
        metadata = {
            "vm": "example-vm",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stream-offset": HEADER_SIZE,
            "memory": [{"id": BACKEND_ID, "size": size}],
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        header = encode_header(metadata)
        fd = os.open(save_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.pwrite(fd, header, 0)
        finally:
            os.close(fd)
        print(f"    magic {MAGIC!r}, metadata {json.dumps(metadata)[:72]}...")

        step("passing the save file twice into one fd set (O_WRONLY + O_WRONLY|O_DIRECT)")
        save_set, direct = await add_file_twins(client, save_path, os.O_WRONLY, "save file")
        our_sets.append(save_set)

        step(f"multifd + mapped-ram + events, direct-io={direct}")
        caps = [{"capability": c, "state": True} for c in ("multifd", "mapped-ram", "events")]
        await client.execute("migrate-set-capabilities", {"capabilities": caps})
        await client.execute("migrate-set-parameters", {"multifd-channels": 2, "direct-io": direct})

        step("saving")
        started = time.monotonic()
        info = await run_migration(
            client, "migrate", f"file:/dev/fdset/{save_set},offset={HEADER_SIZE}"
        )
        ram = info["ram"]
        print(
            f"    saved {ram['total'] // MiB} MiB in {time.monotonic() - started:.2f} s; "
            f"{ram['duplicate']} zero pages skipped"
        )
        await client.execute("remove-fd", {"fdset-id": our_sets.pop()})
        left = await client.execute("query-fdsets")
        print(f"    remove-fd fdset {save_set}; fd sets left: {left}")
        await client.execute("object-del", {"id": BACKEND_ID})
        os.close(memfd)
        memfd = -1
        print(f"    object-del {BACKEND_ID}; the VM's memory is gone")

        step("reading the header back: the save must not have touched it")
        with open(save_path, "rb") as f:
            head = f.read(HEADER_SIZE + 4)
        if head[:HEADER_SIZE] != header:
            print("    MISMATCH: migd changed the app's header")
            return False
        found = decode_header(head)
        print(f"    header intact; the migration stream starts with {head[HEADER_SIZE:]!r}")
        print(f"    file is {save_path.stat().st_size // MiB} MiB apparent size")

        size = found["memory"][0]["size"]  # the restore trusts only the file's header
        step(f"restoring into a new memfd backend of {size // MiB} MiB (filled with 0xEE)")
        # Junk first: the check below then proves every page, zero ones too, was restored.
        restored_fd = memfd_with("vm-ram-restored", b"\xee" * size)
        await add_memfd_backend(client, restored_fd, size)
        load_set, direct = await add_file_twins(client, save_path, os.O_RDONLY, "save file")
        our_sets.append(load_set)
        await client.execute("migrate-set-parameters", {"direct-io": direct})
        uri = f"file:/dev/fdset/{load_set},offset={found['stream-offset']}"
        await run_migration(client, "migrate-incoming", uri)
        await client.execute("remove-fd", {"fdset-id": our_sets.pop()})
        print(f"    remove-fd fdset {load_set}")

        step("verifying")
        restored = memfd_bytes(restored_fd)
        same = restored == data and hashlib.sha256(restored).hexdigest() == found["sha256"]
        print(
            "    restored memory is identical to the saved memory (sha256 as in the header)"
            if same
            else "    MISMATCH: restored memory differs"
        )
        with open(save_path, "rb") as f:
            header_kept = f.read(HEADER_SIZE) == header
        print(f"    header still intact after the restore: {header_kept}")
        await client.execute("object-del", {"id": BACKEND_ID})
        return same and header_kept
    except BaseException:
        # Best effort, so that a failed run leaves no job, fd set or backend in migd.
        with contextlib.suppress(Exception):
            await client.execute("migrate_cancel")
            await asyncio.sleep(0.5)  # a cancelled job lets go of its backends
        for fdset_id in our_sets:
            with contextlib.suppress(Exception):
                await client.execute("remove-fd", {"fdset-id": fdset_id})
        with contextlib.suppress(Exception):
            await client.execute("object-del", {"id": BACKEND_ID})
        raise
    finally:
        for fd in (memfd, restored_fd):
            if fd >= 0:
                os.close(fd)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket", nargs="?", help="migd's QMP socket (or use --spawn)")
    parser.add_argument("--spawn", action="store_true", help="start a migd of our own")
    parser.add_argument("--size-mib", type=int, default=64, help="memory size (default 64)")
    parser.add_argument("--dir", default="/tmp", help="where the save file goes (default /tmp)")
    args = parser.parse_args()
    if (args.socket is None) == (not args.spawn):
        parser.error("give either a socket path or --spawn")
    with tempfile.TemporaryDirectory(prefix="migd-app-", dir=args.dir) as work:
        save_path = Path(work) / "vm.sav"
        try:
            async with connect(args.socket, args.spawn) as client:
                ok = await scenario(client, save_path, args.size_mib * MiB)
        except (ExecuteError, RuntimeError, OSError, ValueError) as exc:
            print(f"FAILED: {exc}")
            return 1
    print("done" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
