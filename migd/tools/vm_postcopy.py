"""`migd vm restore --postcopy`: the guest runs before its RAM is back (docs/postcopy.md).

After the checks every restore makes (tools/vm.py `_restore`: the image whole, the QEMU
in `inmigrate`, its machine type and backends, its RAM files locked), QEMU gets one end
of a socket pair as its incoming migration (`getfd`, `migrate-incoming fd:NAME`) with
`postcopy-ram` on and `x-ignore-shared` off, and this process is its migration source
(postcopy.py): QEMU loads the device state, starts the guest (or leaves it paused, with
--paused), and takes the RAM as it comes and as the guest asks for it. The downtime ends
when the guest runs, not when its RAM is back; the command returns once QEMU reports
the migration completed.

A restore that fails before the guest started leaves it unstarted, as any failed
restore does. One that fails after (a page of the image that does not match its
checksum, QEMU gone, Ctrl-C) leaves a guest that waits for pages no one will send: QEMU
keeps it in `postcopy-paused`, and it must be quit. The command says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

from ..errors import FormatError, MigrationError
from . import postcopy_stream as ps
from . import vm_image
from .client import ClientError, Progress
from .postcopy import PostcopyError, PostcopySource, ram_blocks
from .qemu_peer import expect
from .verify import CorruptError, check_structure, open_readers
from .vm import QEMU_POLL, interrupted, qemu_execute, run_state

FD_NAME = "migd-postcopy"
THREAD_STOP_SECONDS = 10  # a stopped writer's read in flight (8 MiB) ends long before
# QEMU's settings for a postcopy load: QEMU's own RAM handling (x-ignore-shared off), the
# pages over a socket, not a mapped-ram file.
CAPS = {
    "x-ignore-shared": False,
    "mapped-ram": False,
    "multifd": False,
    "postcopy-ram": True,
    "events": True,
}


@dataclass
class PostcopyTimes:
    started: float = 0.0  # QEMU has the device state: the guest can run (RUN handled)
    running: float = 0.0  # the guest runs (or is paused, ready, with --paused)
    ram: float = 0.0  # QEMU reports the migration completed: all RAM is in
    requests: int = 0
    requested_pages: int = 0


def _device_state(fd: int, image: str, header: vm_image.ImageHeader) -> ps.DeviceState:
    part = header.device
    data = os.pread(fd, part.length, part.offset)
    # Read again for the stream: checked again, as the bytes sent must be those checked.
    if len(data) != part.length or hashlib.sha256(data).hexdigest() != part.sha256:
        raise ClientError(f"'{image}': the device state changed since it was checked")
    try:
        return ps.split_device_state(data)
    except FormatError as exc:
        raise ClientError(
            f"'{image}': the device state cannot be sent for postcopy: {exc.desc}"
        ) from None


def _block_names(
    state: ps.DeviceState, header: vm_image.ImageHeader, image: str
) -> dict[str, str]:
    """QEMU's RAMBlock name of each backend of the image (by backend id): the block list of
    the saved stream names a backend's RAM by its id (or a device path ending in it)."""
    names: dict[str, str] = {}
    for entry in header.backends:
        found = [
            b for b in state.blocks
            if (b.name == entry.id or b.name.endswith("/" + entry.id)) and b.length == entry.size
        ]  # fmt: skip
        if len(found) != 1:
            raise ClientError(
                f"'{image}': the device state's RAM blocks do not name backend '{entry.id}' "
                f"({entry.size} bytes) once: {[b.name for b in state.blocks]}"
            )
        names[entry.id] = found[0].name
    overlap = state.record_blocks & set(names.values())
    if overlap:
        raise ClientError(
            f"'{image}': the device state holds pages of the shared RAM blocks {sorted(overlap)}"
        )
    return names


# The socket's send buffer: 2 MiB, not Linux's default ~200 KiB. Fewer wake-ups of both
# ends: 1 GiB of RAM went in 1.5-3.0 s after the start against 2.7-3.6 s (alternated
# rounds, docs/postcopy.md), with less CPU in this process. Not larger: a page the guest
# asks for waits behind what is queued already (2 MiB: a few ms).
SEND_BUFFER = 2 << 20
_SO_SNDBUFFORCE = 32  # Linux: root may exceed net.core.wmem_max


def _enlarge_send_buffer(sock: socket.socket) -> None:
    for option in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):  # SO_SNDBUF: capped by wmem_max
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SEND_BUFFER)
            return
        except OSError:
            continue


def _check_page_sizes(ram_fds: dict[str, int]) -> None:
    """Postcopy here places 4 KiB pages; hugetlbfs RAM would need whole huge pages."""
    for backend, fd in ram_fds.items():
        if os.fstatvfs(fd).f_bsize != os.sysconf("SC_PAGE_SIZE"):
            raise ClientError(
                f"memory backend '{backend}' is on huge pages: --postcopy restores RAM on "
                "4 KiB pages only; restore without it"
            )


def _source(
    sock: socket.socket,
    fd: int,
    image: str,
    header: vm_image.ImageHeader,
    state: ps.DeviceState,
    names: dict[str, str],
) -> tuple[PostcopySource, list[int]]:
    size = os.fstat(fd).st_size
    try:
        parsed, bitmaps, table = check_structure(fd, image, header.ram.offset, size)
    except CorruptError as exc:
        raise ClientError(str(exc)) from None
    layouts = {b.name: i for i, b in enumerate(parsed.blocks)}
    order = [layouts[e.block] for e in header.backends]
    digests = None if table is None else [table.digests[i] for i in order]
    blocks = ram_blocks(
        [names[e.id] for e in header.backends],
        [parsed.blocks[i] for i in order],
        [bitmaps[i] for i in order],
        digests,
    )
    readers, _direct = open_readers(fd, image, 1)
    stream = ps.PostcopyStream(state, blocks[0].name)
    return PostcopySource(sock, stream, blocks, readers[0], image), readers


async def _migration_status(qemu: Any) -> dict[str, Any]:
    return dict(expect(await qemu_execute(qemu, "query-migrate"), dict, "reply to query-migrate"))


def _failed_text(info: dict[str, Any]) -> str:
    return f"QEMU's migration {info.get('status')}: {info.get('error-desc', 'no reason given')}"


async def restore_postcopy(
    qemu: Any,
    fd: int,
    image: str,
    header: vm_image.ImageHeader,
    ram_fds: dict[str, int],
    paused: bool,
    quiet: bool,
    err: TextIO,
) -> PostcopyTimes:
    """Stream the image into QEMU; returns when all of the RAM is in. QEMU's settings are
    the caller's to set (CAPS) and put back."""
    _check_page_sizes(ram_fds)
    state = _device_state(fd, image, header)
    names = _block_names(state, header, image)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    _enlarge_send_buffer(ours)
    source, readers = _source(ours, fd, image, header, state, names)
    times = PostcopyTimes()
    errors: list[BaseException] = []
    done = threading.Event()

    def run(work: Any) -> None:
        try:
            work()
        except BaseException as exc:  # the waiting coroutine raises it
            errors.append(exc)
            source.cancel.set()
            with contextlib.suppress(OSError):
                ours.shutdown(socket.SHUT_RDWR)  # unblocks the other thread
        finally:
            if work == source.send:
                done.set()

    started = named = False
    threads: list[threading.Thread] = []
    try:
        qemu.send_fd_scm(theirs.fileno())
        await qemu_execute(qemu, "getfd", {"fdname": FD_NAME})
        named = True
        theirs.close()
        uri = f"fd:{FD_NAME}"
        await qemu_execute(qemu, "migrate-incoming", {"uri": uri, "exit-on-error": False})
        named = False  # QEMU took the fd
        threads += [
            threading.Thread(target=run, args=(source.read_return_path,), daemon=True),
            threading.Thread(target=run, args=(source.send,), daemon=True),
        ]
        for thread in threads:
            thread.start()
        # The guest can run once QEMU has handled RUN (its state leaves `inmigrate`).
        while True:
            if errors:
                raise errors[0]
            if interrupted():
                raise ClientError("interrupted (Ctrl-C or SIGTERM) before the guest started")
            info = await _migration_status(qemu)
            if info.get("status") in ("failed", "cancelled"):
                raise ClientError(_failed_text(info))
            if await run_state(qemu) != "inmigrate":
                break
            await asyncio.sleep(QEMU_POLL)
        started = True
        times.started = time.monotonic()
        if not paused:
            await qemu_execute(qemu, "cont", interruptible=False)
        times.running = time.monotonic()
        progress = Progress("restore (postcopy)", err, quiet=quiet)
        try:
            while True:
                total = source.counters.bytes_total
                remaining = total - source.counters.bytes_sent
                ram = {"total": total, "remaining": remaining}
                progress.update({"status": "active", "ram": ram})
                if errors:
                    raise errors[0]
                if interrupted():
                    raise ClientError("interrupted (Ctrl-C or SIGTERM)")
                if done.is_set():
                    info = await _migration_status(qemu)
                    if info.get("status") == "completed":
                        break
                    if info.get("status") in ("failed", "cancelled"):
                        raise ClientError(_failed_text(info))
                await asyncio.sleep(QEMU_POLL if done.is_set() else 0.1)
        finally:
            progress.close()
        times.ram = time.monotonic()
        times.requests = source.counters.requests
        times.requested_pages = source.counters.requested_pages
        return times
    except Exception as exc:  # whatever it was, the guest's fate is told
        if isinstance(exc, MigrationError):
            text = exc.desc
        elif isinstance(exc, (ClientError, PostcopyError, OSError)):
            text = str(exc)
        else:
            text = f"internal error: {type(exc).__name__}: {exc}"
        if started:
            raise ClientError(
                f"the postcopy restore of '{image}' failed after the guest started: {text}; "
                "the guest waits for RAM that will not come (QEMU keeps it in postcopy-paused): "
                "quit this QEMU"
            ) from None
        raise ClientError(
            f"the postcopy restore of '{image}' failed before the guest started: {text}; "
            "the VM was not started"
        ) from None
    finally:
        source.cancel.set()
        with contextlib.suppress(OSError):
            ours.shutdown(socket.SHUT_RDWR)
        # The writer reads through `readers`: they are closed only once it has stopped
        # (the shutdown ends its send), never under it (a number reused by another open).
        for thread in threads:
            thread.join(THREAD_STOP_SECONDS)
        ours.close()
        theirs.close()
        if not any(thread.is_alive() for thread in threads):
            for reader in readers:
                os.close(reader)
        if named:
            with contextlib.suppress(ClientError):
                await qemu_execute(qemu, "closefd", {"fdname": FD_NAME}, cleanup=True)

