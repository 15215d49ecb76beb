"""`migd vm save` and `migd vm restore`: a whole QEMU guest as one image file.

QEMU keeps what only it knows (CPU and device state, small RAM blocks such as ROMs):
it writes that as its own migration stream with x-ignore-shared on, which leaves out RAM
in shared files. migd writes that RAM, the bulk, with its mapped-ram save (multifd,
O_DIRECT, checksums). The image header ties both together (migd/tools/vm_image.py,
docs/vm-image.md).

Both commands talk to two QMP servers: the VM's QEMU (`--qmp`) and migd (`--socket`).
Neither opens the image by its name: QEMU gets it as an fd (add-fd: it needs no access
to the path, as under libvirt), and so does migd (an fd set of the image opened through
the CLI's own fd, plain and O_DIRECT, as QEMU's direct-io wants). The file checked is then
the file read or written, even if its name is replaced in between.

Order of a save: everything is checked while the guest still runs (its backends can be
reached, migd accepts them); then the guest stops (never is the RAM of a running guest
saved), QEMU writes its part, migd its part, and the header is written last and synced
into a temporary file that is then renamed over IMAGE: a failed save leaves IMAGE as it
was, and a guest that ran before a failed save runs again.

Order of a restore: the image is checked as a whole (header, the device state's digest,
the RAM part's identity, blocks and checksum table) and against the QEMU it talks to
(machine type, backend ids and sizes) before anything is written; then migd restores the
RAM into QEMU's backend files, QEMU loads its part, and the guest continues.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import os
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .. import __version__
from ..procstat import read_stat
from ..state import paths
from . import vm_image
from .client import (
    ClientError,
    Interrupt,
    Progress,
    UsageError,
    connect,
    disconnect,
    execute,
    human_bytes,
    job_as_migration,
    probe_direct_io,
)
from .inspect import InspectError, SaveInfo, inspect_file, open_regular
from .qemu_peer import Peer, backend_id, expect, member, open_guest_ram

# States a guest may be saved from: it is stopped first if running. Others (inmigrate,
# shutdown, guest-panicked, internal-error, ...) hold no guest worth resuming.
SAVABLE_STATES = frozenset({"running", "paused", "postmigrate", "prelaunch", "suspended"})
QEMU_POLL = 0.002  # seconds between query-migrate polls of QEMU's short device-state part
# Seconds QEMU has to answer one command (--qemu-timeout): a QEMU that stops answering, or
# a socket whose server never greets, must not hold the guest stopped forever.
QEMU_TIMEOUT = 60.0
# Seconds QEMU's own part (device state out or in) may take: a few MiB, well under a second
# here; a QEMU stuck in `active` must end in an error, not a client waiting for ever.
QEMU_MIGRATION_TIMEOUT = 600.0
CLEANUP_TIMEOUT = 5.0  # for the commands that undo a failed save (cont, settings)
# query-migrate statuses that leave an incoming QEMU free to load: none yet. QEMU takes one
# migrate-incoming per process, whatever became of it: after a load that failed (a
# restore tried before) or a listener of `-incoming URI` its next is refused ("The
# incoming migration has already been started").
_QEMU_NOT_LOADING = (None, "none")
# QEMU's device state (its x-ignore-shared stream: CPU and device state, ROMs, video RAM)
# is a few MiB; anything near this is not a device state worth copying during the downtime.
MAX_DEVICE_STATE = 1 << 30
QEMU_STREAM_MAGIC = b"QEVM"  # QEMU_VM_FILE_MAGIC: the first bytes of every QEMU stream
_QEMU_ENDED = ("completed", "failed", "cancelled")  # QEMU's final migration states
JOB_POLL = 0.1  # progress polls of migd's job; its end comes as an event, at once


@dataclass
class GuestBackend:
    """One of the guest's memory backends, as QEMU describes it."""

    id: str
    size: int
    qom_type: str
    share: bool
    mem_path: str | None  # memory-backend-file only

    def problem(self) -> str | None:
        """Why migd cannot save or restore this backend, or None."""
        if self.qom_type == "memory-backend-memfd":
            return (
                f"memory backend '{self.id}' is a memfd: QEMU migrates memfd RAM in its own "
                "stream even with x-ignore-shared (it skips only RAM in named shared files), "
                "so it cannot be left to migd; use memory-backend-file with share=on on "
                "/dev/shm or hugetlbfs instead"
            )
        if self.qom_type != "memory-backend-file":
            return (
                f"memory backend '{self.id}' ({self.qom_type}) is private anonymous memory "
                "of the QEMU process, which migd cannot reach; give the guest "
                "-object memory-backend-file,share=on,mem-path=... and -machine memory-backend=..."
            )
        if not self.share:
            return (
                f"memory backend '{self.id}' has share=off: the guest's writes stay in "
                f"QEMU's private copy, not in {self.mem_path}; use share=on"
            )
        if not self.mem_path or not os.path.isfile(self.mem_path):
            return (
                f"memory backend '{self.id}': its file {self.mem_path!r} is not a regular "
                "file migd can reach from here"
            )
        return None


@dataclass
class VmOptions:
    image: str
    qmp: str  # the VM's QMP socket
    socket: str  # migd's
    channels: int | None = None
    direct_io: bool | None = None  # None: probe the image's filesystem
    quiet: bool = False
    after: str = "pause"  # save: pause | resume | quit
    live: bool = False  # save: copy the RAM while the guest runs, then only what changed
    paused: bool = False  # restore: leave the guest paused
    accept_partial: bool = False  # restore: into RAM files an earlier restore left partial
    postcopy: bool = False  # restore: the guest runs before its RAM is back (vm_postcopy.py)
    qemu_timeout: float = QEMU_TIMEOUT  # seconds for each QEMU command to answer
    json: bool = False  # print the summary as JSON
    timings: dict[str, float] = field(default_factory=dict)


# --- QEMU ------------------------------------------------------------------------------------


@dataclass
class _Limits:
    """How long QEMU may take to answer, and the Ctrl-C / SIGTERM that ends any wait."""

    timeout: float = QEMU_TIMEOUT
    interrupt: asyncio.Event | None = None


_LIMITS: contextvars.ContextVar[_Limits] = contextvars.ContextVar("migd_vm_limits")
# QEMU connections that left a command unanswered past its timeout.
_SILENT: weakref.WeakSet[Any] = weakref.WeakSet()


@contextlib.contextmanager
def _interruptible(timeout: float) -> Any:
    """SIGINT/SIGTERM caught (client.Interrupt) for the whole block, and every QEMU
    command and wait in it ended by them, or by `timeout` seconds without an answer."""
    with Interrupt() as interrupt:
        token = _LIMITS.set(_Limits(timeout, interrupt.event))
        try:
            yield interrupt
        finally:
            _LIMITS.reset(token)


def interrupted() -> bool:
    limits = _LIMITS.get(None)
    return limits is not None and limits.interrupt is not None and limits.interrupt.is_set()


async def connect_qemu(path: str, timeout: float = QEMU_TIMEOUT) -> Any:
    failure = f"cannot connect to QEMU's QMP socket {path}"
    try:
        return await asyncio.wait_for(
            connect(path, name="migd-vm", failure=failure, check_server=False), timeout
        )
    except TimeoutError:
        raise UsageError(
            f"{failure}: no QMP greeting within {timeout:g} s (a QMP socket serves one client "
            "at a time: is another connected?)"
        ) from None


async def qemu_execute(
    qemu: Any,
    command: str,
    arguments: Mapping[str, Any] | None = None,
    *,
    cleanup: bool = False,
    interruptible: bool = True,
) -> Any:
    """One QEMU command. It ends in ClientError if QEMU does not answer in time
    (--qemu-timeout) or, unless `cleanup` (undoing a failed save must still happen, with a
    short limit), on Ctrl-C or SIGTERM."""
    limits = _LIMITS.get(_Limits())
    timeout = min(limits.timeout, CLEANUP_TIMEOUT) if cleanup else limits.timeout
    interrupt = None if cleanup or not interruptible else limits.interrupt
    if interrupt is not None and interrupt.is_set():
        raise ClientError(f"QEMU: {command}: not sent, interrupted (Ctrl-C or SIGTERM)")
    if qemu in _SILENT:
        # One command went unanswered: the next would wait as long for nothing.
        raise ClientError(f"QEMU: {command}: not sent, QEMU has stopped answering")
    call = asyncio.ensure_future(execute(qemu, command, arguments))
    waits: set[asyncio.Future[Any]] = {call}
    if interrupt is not None:
        waits.add(asyncio.ensure_future(interrupt.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in waits:
            if not future.done():
                future.cancel()
    if call.done() and not call.cancelled():
        try:
            return call.result()
        except ClientError as exc:
            raise ClientError(
                f"QEMU: {exc}".replace("lost the connection to migd", "lost QEMU").replace(
                    "migd closed it", "QEMU closed it"
                )
            ) from None
    if interrupt is not None and interrupt.is_set():
        raise ClientError(f"QEMU: {command}: interrupted (Ctrl-C or SIGTERM)")
    _SILENT.add(qemu)
    raise ClientError(f"QEMU did not answer '{command}' within {timeout:g} s")


async def guest_backends(qemu: Any) -> list[GuestBackend]:
    out = []
    memdevs = expect(await qemu_execute(qemu, "query-memdev"), list, "reply to query-memdev")
    for memdev in memdevs:
        id = backend_id(member(memdev, "id", str, "query-memdev"))
        size = member(memdev, "size", int, "query-memdev")
        share = member(memdev, "share", bool, "query-memdev")
        if size <= 0:
            raise ClientError(f"QEMU says memory backend '{id}' has {size} bytes")
        path = f"/objects/{id}"
        qom_type = expect(
            await qemu_execute(qemu, "qom-get", {"path": path, "property": "type"}),
            str,
            f"type of {path} (qom-get)",
        )
        mem_path = None
        if qom_type == "memory-backend-file":
            mem_path = expect(
                await qemu_execute(qemu, "qom-get", {"path": path, "property": "mem-path"}),
                str,
                f"mem-path of {path} (qom-get)",
            )
        out.append(GuestBackend(id, size, qom_type, share, mem_path))
    if not out:
        raise ClientError("QEMU has no memory backends (query-memdev is empty)")
    if len({b.id for b in out}) != len(out):
        raise ClientError("QEMU's query-memdev lists a memory backend twice")
    return out


async def qemu_identity(qemu: Any) -> tuple[str, str]:
    """(QEMU's version, the machine type) as the image header records them."""
    v = member(await qemu_execute(qemu, "query-version"), "qemu", dict, "query-version")
    parts = [member(v, key, int, "query-version") for key in ("major", "minor", "micro")]
    machine = expect(
        await qemu_execute(qemu, "qom-get", {"path": "/machine", "property": "type"}),
        str,
        "machine type (qom-get /machine type)",
    )
    return ".".join(map(str, parts)), machine


async def run_state(qemu: Any) -> str:
    return member(await qemu_execute(qemu, "query-status"), "status", str, "query-status")


def lock_vm(
    backends: Sequence[GuestBackend], ram_fds: Mapping[str, int], locks: list[int]
) -> None:
    """One `migd vm save` or `vm restore` of a VM at a time, whatever QMP socket each
    uses: two saves interleaved QEMU's migration settings (each puts back what it found,
    the other's x-ignore-shared included). The lock is an OFD lock on one byte
    (paths.VM_BYTE) of each of the VM's RAM files, the files that make it that VM, taken
    through an open file of this process alone (the fds migd gets share theirs), appended
    to `locks`: closing them, or this process's death (SIGKILL too), releases it."""
    for b in sorted(backends, key=lambda b: b.id):
        fd = paths.reopen(ram_fds[b.id], os.O_RDWR)
        locks.append(fd)
        if paths.ofd_lock(fd, fcntl.F_WRLCK, paths.VM_BYTE) is False:
            holders = ", ".join(map(str, _lock_holders(fd))) or "unknown"
            raise ClientError(
                f"another migd vm save or vm restore of this VM is running (pid {holders}): "
                f"it holds the lock on the RAM file of backend '{b.id}' ({b.mem_path}); "
                "nothing was changed, try again once it has ended"
            )


def _lock_holders(fd: int) -> list[int]:
    """The processes holding paths.VM_BYTE of fd's file, from /proc/PID/fdinfo (an OFD
    lock has no pid of its own: /proc/locks and F_OFD_GETLK say -1). Best effort."""
    st = os.fstat(fd)
    file = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} {paths.VM_BYTE} "
    holders = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for name in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{name}") as info:
                    if any(line.startswith("lock:") and file in line for line in info):
                        holders.add(int(pid))
    return sorted(holders)


def open_backend_files(qemu: Any, backends: Sequence[GuestBackend]) -> dict[str, int]:
    """Each backend's RAM file, opened read-write once the QEMU at the other end of the
    socket is seen to map it (tools/qemu_peer.py); {backend id: fd}."""
    peer = Peer(qemu)
    fds: dict[str, int] = {}
    try:
        for b in backends:
            assert b.mem_path is not None  # GuestBackend.problem() refused the others
            fds[b.id] = open_guest_ram(peer, b.mem_path, b.id)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        peer.close()
    return fds


class QemuMigration:
    """QEMU's migration settings for its part (x-ignore-shared on, mapped-ram and multifd
    off, no bandwidth cap), put back as they were afterwards: a VM that goes on running
    must not keep x-ignore-shared for its next live migration."""

    CAPS = {"x-ignore-shared": True, "mapped-ram": False, "multifd": False}
    # A restore also turns QEMU's MIGRATION events on: a migrate-incoming another client
    # of this QEMU starts during the restore then shows in its watch (_watch).
    INCOMING_CAPS = {**CAPS, "events": True}

    def __init__(self, qemu: Any) -> None:
        self.qemu = qemu
        self.wanted: dict[str, bool] = self.CAPS
        self.saved_caps: dict[str, bool] = {}
        self.saved_bandwidth: int | None = None
        self.fdset: int | None = None

    async def set_up(self, incoming: bool, wanted: Mapping[str, bool] | None = None) -> None:
        """`wanted`: other capabilities than a split restore's (a postcopy restore's)."""
        command = "query-migrate-capabilities"
        caps = expect(await qemu_execute(self.qemu, command), list, f"reply to {command}")
        self.wanted = dict(wanted) if wanted else self.INCOMING_CAPS if incoming else self.CAPS
        self.saved_caps = {}
        for cap in caps:
            name = member(cap, "capability", str, command)
            if name in self.wanted:
                self.saved_caps[name] = member(cap, "state", bool, command)
        changes = [
            {"capability": name, "state": state}
            for name, state in self.wanted.items()
            if self.saved_caps.get(name, False) != state
        ]
        if changes:
            await qemu_execute(self.qemu, "migrate-set-capabilities", {"capabilities": changes})
        if not incoming:
            command = "query-migrate-parameters"
            params = expect(await qemu_execute(self.qemu, command), dict, f"reply to {command}")
            if "max-bandwidth" in params:
                self.saved_bandwidth = member(params, "max-bandwidth", int, command)
            await qemu_execute(self.qemu, "migrate-set-parameters", {"max-bandwidth": 0})

    def pass_fd(self, fd: int) -> None:
        self.qemu.send_fd_scm(fd)

    async def add_fd(self, fd: int, opaque: str) -> str:
        """The image as /dev/fdset/N for a file: URI (QEMU dups the fd it is sent)."""
        self.pass_fd(fd)
        reply = await qemu_execute(self.qemu, "add-fd", {"opaque": opaque})
        self.fdset = member(reply, "fdset-id", int, "add-fd")
        return f"/dev/fdset/{self.fdset}"

    async def restore(self) -> None:
        """Put QEMU's settings back and drop the fd; best effort (the VM may be gone)."""
        # Each on its own: a refused remove-fd must not leave x-ignore-shared on.
        if self.fdset is not None:
            fdset, self.fdset = self.fdset, None
            with contextlib.suppress(ClientError):
                await qemu_execute(self.qemu, "remove-fd", {"fdset-id": fdset}, cleanup=True)
        back = [
            {"capability": name, "state": state}
            for name, state in self.saved_caps.items()
            if state != self.wanted[name]
        ]
        if back:
            with contextlib.suppress(ClientError):
                await qemu_execute(
                    self.qemu, "migrate-set-capabilities", {"capabilities": back}, cleanup=True
                )
        if self.saved_bandwidth is not None:
            with contextlib.suppress(ClientError):
                await qemu_execute(
                    self.qemu,
                    "migrate-set-parameters",
                    {"max-bandwidth": self.saved_bandwidth},
                    cleanup=True,
                )
        # Put back once: a save does so as soon as QEMU's part is written, and its
        # cleanup must not set them again.
        self.saved_caps, self.saved_bandwidth = {}, None


async def wait_qemu_migration(
    qemu: Any, what: str, limit: float = QEMU_MIGRATION_TIMEOUT
) -> dict[str, Any]:
    """Until QEMU's migration ends; ClientError if it fails, takes over `limit` seconds or
    is interrupted (then QEMU is asked to cancel it)."""
    deadline = time.monotonic() + limit
    while True:
        if interrupted():
            await _cancel_qemu_migration(qemu)
            raise ClientError(f"QEMU's {what} interrupted (Ctrl-C or SIGTERM): cancelled")
        try:
            info = expect(await qemu_execute(qemu, "query-migrate"), dict, "reply to query-migrate")
        except ClientError:
            # A Ctrl-C ends this query too: it must still reach migrate_cancel above (it
            # did not, and QEMU's migration ran on under a guest said to run again).
            if interrupted() and qemu not in _SILENT:
                continue
            raise
        status = info.get("status")
        if status == "completed":
            return dict(info)
        if status in ("failed", "cancelled"):
            reason = info.get("error-desc", "no reason given")
            raise ClientError(f"QEMU {what} {status}: {reason}")
        if time.monotonic() > deadline:
            await _cancel_qemu_migration(qemu)
            raise ClientError(
                f"QEMU's {what} did not end within {limit:g} s (status {status!r}): cancelled"
            )
        await asyncio.sleep(QEMU_POLL)


async def _cancel_qemu_migration(qemu: Any) -> None:
    """migrate_cancel, then wait (CLEANUP_TIMEOUT at most) until the migration has
    ended: while it is `cancelling` QEMU refuses the settings put back after it, and one
    left running stops the guest when it completes, after a `cont`. Best effort."""
    deadline = time.monotonic() + CLEANUP_TIMEOUT
    with contextlib.suppress(ClientError):
        await qemu_execute(qemu, "migrate_cancel", cleanup=True)
        while time.monotonic() < deadline:
            info = await qemu_execute(qemu, "query-migrate", cleanup=True)
            if not isinstance(info, dict) or info.get("status") in _QEMU_ENDED:
                return
            await asyncio.sleep(QEMU_POLL)


# --- migd ------------------------------------------------------------------------------------


async def add_migd_backends(
    migd: Any,
    backends: Sequence[tuple[str, str, int, int]],
    fdsets: list[int],
    accept_partial: bool = False,
) -> list[str]:
    """object-add each (migd id, block name, size, fd of the RAM file): the fd goes to
    migd as an fd set (its id appended to `fdsets`, for drop_migd_fdset), and the backend
    maps /dev/fdset/N, so that migd maps the very file checked here (qemu_peer.py), never
    a name again. The ids added."""
    added = []
    try:
        for id, block, size, fd in backends:
            migd.send_fd_scm(fd)
            reply = await execute(migd, "add-fd", {"opaque": f"migd vm: RAM of {block}"})
            fdset = int(reply["fdset-id"])
            fdsets.append(fdset)
            await execute(
                migd,
                "object-add",
                {
                    "qom-type": "memory-backend-file",
                    "id": id,
                    "size": size,
                    "mem-path": f"/dev/fdset/{fdset}",
                    "share": True,
                    "ramblock-name": block,
                    **({"x-accept-partial": True} if accept_partial else {}),
                },
            )
            added.append(id)
    except BaseException:
        await del_migd_backends(migd, added)
        raise
    return added


async def del_migd_backends(migd: Any, ids: Sequence[str]) -> None:
    for id in ids:
        with contextlib.suppress(ClientError):
            await execute(migd, "object-del", {"id": id})


async def pass_image_to_migd(
    migd: Any, fd: int, accesses: Sequence[int], direct_io: bool, opaque: str
) -> int:
    """The image open as `fd` as a migd fd set: reopened through /proc/self/fd (the same
    file whatever its name is now) once per access mode (O_WRONLY for a save, O_RDWR for
    a live save's passes, O_RDONLY for a restore), and again with O_DIRECT for the
    channels when direct_io. Returns the set's id."""
    variants = [0, os.O_DIRECT] if direct_io else [0]
    fdset_id: int | None = None
    for access in accesses:
        for extra in variants:
            twin = os.open(f"/proc/self/fd/{fd}", access | extra | os.O_CLOEXEC)
            try:
                migd.send_fd_scm(twin)
                arguments: dict[str, Any] = {"opaque": opaque}
                if fdset_id is not None:
                    arguments["fdset-id"] = fdset_id
                reply = await execute(migd, "add-fd", arguments)
                fdset_id = int(reply["fdset-id"])
            finally:
                os.close(twin)
    assert fdset_id is not None
    return fdset_id


async def drop_migd_fdset(migd: Any, fdset_id: int | None) -> None:
    if fdset_id is not None:
        with contextlib.suppress(ClientError):
            await execute(migd, "remove-fd", {"fdset-id": fdset_id})


async def run_migd_job(
    migd: Any,
    interrupt: Interrupt,
    command: str,
    arguments: dict[str, Any],
    progress: Progress,
) -> dict[str, Any]:
    """Start a memory-save / memory-restore job and wait for it: its end is taken from
    the JOB_STATUS_CHANGE event (no poll period added to the guest's downtime), progress
    from query-jobs. Dismissed at the end; a failed job raises ClientError."""
    from qemu.qmp import EventListener

    job_id = arguments["job-id"]

    def ours(event: Any) -> bool:
        data = event.get("data", {})
        return bool(data.get("id") == job_id and data.get("status") == "concluded")

    listener = EventListener("JOB_STATUS_CHANGE", event_filter=ours)
    migd.register_listener(listener)
    try:
        await execute(migd, command, arguments)
        cancelled = False
        while True:
            job = next(
                (j for j in await execute(migd, "query-jobs") if j.get("id") == job_id), None
            )
            if job is None:
                raise ClientError(f"migd job '{job_id}' is gone (dismissed by another client?)")
            progress.update(job_as_migration(job))
            if job.get("status") == "concluded":
                break
            if interrupt.event.is_set() and not cancelled:
                cancelled = True
                progress.close()
                # Refused when the job ended meanwhile: its end is what counts then.
                with contextlib.suppress(ClientError):
                    await execute(migd, "job-cancel", {"id": job_id})
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(listener.get())]
            if not cancelled:
                waits.append(asyncio.ensure_future(interrupt.event.wait()))
            _, pending = await asyncio.wait(waits, timeout=JOB_POLL, return_when="FIRST_COMPLETED")
            for task in pending:
                task.cancel()
    finally:
        migd.remove_listener(listener)
        # Whatever ended the wait: a concluded job left listed would stay for ever.
        with contextlib.suppress(ClientError):
            await execute(migd, "job-dismiss", {"id": job_id})
    if job.get("error") is not None:
        raise ClientError(f"migd {command} failed: {job['error']}")
    if cancelled:
        raise ClientError(f"migd {command} interrupted")
    return dict(job)


async def ram_job(
    migd: Any, interrupt: Interrupt, opts: VmOptions, direction: str, job_id: str,
    backends: list[str], uri: str, direct_io: bool, err: TextIO,
    extra: Mapping[str, Any] | None = None,
) -> None:  # fmt: skip
    """The RAM part: a memory-save / memory-restore job of the guest's backends, with a
    progress bar; `extra`: more arguments (a live save's x-live, x-update)."""
    progress = Progress(direction, err, quiet=opts.quiet)
    try:
        await run_migd_job(
            migd,
            interrupt,
            f"memory-{direction}",
            {
                "job-id": job_id,
                "backends": backends,
                "uri": uri,
                "multifd-channels": opts.channels or min(4, os.cpu_count() or 1),
                "direct-io": direct_io,
                **(extra or {}),
            },
            progress,
        )
    finally:
        progress.close()


# --- save ------------------------------------------------------------------------------------


def _temporary_image(image: str) -> tuple[str, int]:
    """A new file beside IMAGE (same filesystem, so the final rename is atomic)."""
    directory, name = os.path.split(image)
    if not os.path.isdir(directory or "."):
        raise UsageError(f"cannot write {image}: directory {directory} does not exist")
    if os.path.isdir(image):
        raise UsageError(f"cannot write {image}: it is a directory")
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.migd-vm-tmp")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ClientError(f"cannot create {tmp}: {exc.strerror}") from None
    return tmp, fd


def _check_backends(backends: Sequence[GuestBackend]) -> None:
    problems = [p for b in backends if (p := b.problem()) is not None]
    if problems:
        raise ClientError("cannot save this VM's RAM with migd:\n  " + "\n  ".join(problems))


def _check_not_ram(
    backends: Sequence[GuestBackend], ram_fds: Mapping[str, int], image: str
) -> None:
    with contextlib.suppress(OSError):
        target = os.stat(image)
        for b in backends:
            st = os.fstat(ram_fds[b.id])
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                raise ClientError(
                    f"{image} is the memory file of backend '{b.id}': the image would "
                    "replace the guest's RAM"
                )


def _device_state_buffer() -> int:
    """The memfd QEMU writes its part into. Its own failure says so: an OSError without
    a file name here was reported as a write of the image that failed."""
    try:
        return os.memfd_create("migd-vm-device-state", os.MFD_CLOEXEC)
    except OSError as exc:
        raise ClientError(
            f"cannot create the memory file that takes QEMU's device state: {exc.strerror}"
        ) from None


def _check_still_named(path: str, fd: int) -> None:
    """The temporary name must still be the file written through `fd` before it is
    renamed over IMAGE: a file put in its place would become the image."""
    st, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
    if (st.st_dev, st.st_ino) != (named.st_dev, named.st_ino):
        raise ClientError(f"{path} was replaced during the save: the image is not renamed")


def _remove_if_ours(path: str, fd: int) -> bool:
    """Remove the temporary file of a failed save, but only if `path` still names the
    file open as `fd`: whatever was put in its place is not ours to delete. True if it
    was removed."""
    try:
        _check_still_named(path, fd)
        os.unlink(path)
    except (OSError, ClientError):
        return False
    return True


def _temporary_failure(tmp: str, exc: OSError, left: str) -> str:
    """What failed (the temporary file, not IMAGE) and what is left of the save."""
    what = f"{tmp} (the image being written)"
    if exc.filename is not None and exc.filename != tmp:  # not a write of the image
        what = str(exc.filename)
    return f"{what}: {exc.strerror or exc}: {left}"


def _drop_temporary(image: str, tmp: str, fd: int) -> str:
    """After a failed write of the temporary file: remove it if it is still ours, and
    say what is left (IMAGE kept or never created; the temporary file gone or not)."""
    return _what_is_left(image, tmp, _remove_if_ours(tmp, fd))


def _what_is_left(image: str, tmp: str, removed: bool) -> str:
    if os.path.lexists(image):
        kept = f"the old image {image} is kept, untouched"
    else:
        kept = f"{image} was not created"
    left = "the temporary file was removed" if removed else f"{tmp} could not be removed"
    return f"{kept}; {left}"


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """All of `data` at `offset`, or OSError. A full filesystem cuts a write short rather
    than failing it when some of it fits: a header longer than a page (many backends,
    long paths) lost its digest, and the image that then replaced IMAGE was unusable
    while the save said "completed". The next write past the room raises ENOSPC."""
    done = 0
    while done < len(data):
        written = os.pwrite(fd, memoryview(data)[done:], offset + done)
        if written <= 0:  # not seen from a regular file; never loop for ever
            raise OSError(errno.EIO, f"nothing written at {offset + done}")
        done += written


def _copy_device_state(source: int, image_fd: int) -> vm_image.DevicePart:
    """QEMU's part, from the memory file it wrote, into the image after the header."""
    length = os.fstat(source).st_size
    if length <= 0:
        raise ClientError("QEMU wrote no device state")
    if length > MAX_DEVICE_STATE:
        raise ClientError(
            f"QEMU's device state is {human_bytes(length)}, more than a device state holds "
            f"({human_bytes(MAX_DEVICE_STATE)} at most): not copied into the image"
        )
    if os.pread(source, len(QEMU_STREAM_MAGIC), 0) != QEMU_STREAM_MAGIC:
        raise ClientError(
            "what QEMU wrote as its device state does not start as a QEMU migration stream "
            f"does ({QEMU_STREAM_MAGIC!r})"
        )
    hasher = hashlib.sha256()
    at = 0
    while at < length:
        chunk = os.pread(source, min(4 << 20, length - at), at)
        if not chunk:
            raise ClientError(f"QEMU's device state ended at {at} of {length} bytes")
        hasher.update(chunk)
        done = 0
        while done < len(chunk):
            where = vm_image.HEADER_AREA + at + done
            done += os.pwrite(image_fd, memoryview(chunk)[done:], where)
        at += len(chunk)
    return vm_image.DevicePart(vm_image.HEADER_AREA, length, hasher.hexdigest())


def _ram_part_info(path: str, fd: int, offset: int) -> SaveInfo:
    """The RAM part of the image open as `fd` (`path` names it in errors): read through
    the fd, not by the name again, so that a file swapped in since is not the one read."""
    try:
        info = inspect_file(path, offset, fd=fd)
    except (InspectError, OSError) as exc:
        raise ClientError(f"{path}: the RAM part at {offset:#x} cannot be read: {exc}") from None
    if not info.complete:
        raise ClientError(f"{path}: the RAM part at {offset:#x} is incomplete: {info.problem}")
    if info.save_id is None:
        raise ClientError(
            f"{path}: the RAM part at {offset:#x} has no save id (its vmdescription is "
            "missing or unreadable): it cannot be tied to the image header"
        )
    return info


async def run_vm_save(opts: VmOptions, out: TextIO, err: TextIO) -> int:
    qemu = await connect_qemu(opts.qmp, opts.qemu_timeout)
    locks: list[int] = []  # lock_vm's, held to the very end (--resume's cont included)
    try:
        # SIGINT/SIGTERM end the wait at hand, and the cleanup after it is not cut short
        # (a killed client left the guest stopped and its temporary file behind).
        with _interruptible(opts.qemu_timeout) as interrupt:
            try:
                return await _save(qemu, opts, out, err, interrupt, locks)
            except ClientError as exc:
                if not qemu_gone(exc):
                    raise
                # Raised only before the rename (a cont or quit after it is not an
                # error): the temporary file is gone, IMAGE untouched.
                image = os.path.abspath(opts.image)
                raise ClientError(
                    f"QEMU quit or was killed during the save ({exc}): the image is not "
                    f"written, {image} is as it was"
                ) from None
    finally:
        await disconnect(qemu)  # also after a failure (an in-process caller goes on)
        _release(locks)


def _release(locks: list[int]) -> None:
    for fd in locks:
        os.close(fd)
    locks.clear()


def _image_header(
    image_id: str,
    qemu_version: str,
    machine: str,
    device: vm_image.DevicePart,
    ram: vm_image.RamPart,
    backends: Sequence[GuestBackend],
    blocks: Mapping[str, str],
) -> vm_image.ImageHeader:
    return vm_image.ImageHeader(
        image_id=image_id,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        migd_version=__version__,
        qemu_version=qemu_version,
        machine=machine,
        device=device,
        ram=ram,
        backends=[
            vm_image.BackendEntry(b.id, blocks[b.id], b.size, str(b.mem_path)) for b in backends
        ],
    )


def _check_header_fits(header: vm_image.ImageHeader) -> None:
    """Before the guest stops: the header with this VM's names and the largest values
    its parts can take must fit its area (a 70,000-character machine type did not, and
    was found only after the whole downtime)."""
    trial = dataclasses.replace(
        header,
        device=vm_image.DevicePart(1 << 62, 1 << 62, "0" * 64),
        ram=vm_image.RamPart(1 << 62, 1 << 62, "0" * 32, "0" * 32),
    )
    try:
        vm_image.encode(trial)
    except ValueError as exc:
        raise ClientError(f"this VM's names do not fit an image header: {exc}") from None


async def _save(
    qemu: Any,
    opts: VmOptions,
    out: TextIO,
    err: TextIO,
    interrupt: Interrupt,
    locks: list[int],
) -> int:
    image = os.path.abspath(opts.image)
    image_id = uuid.uuid4().hex
    tag = image_id[:8]
    migd = None
    tmp, fd, device_fd = None, -1, -1
    ram_fds: dict[str, int] = {}
    migd_ids: list[str] = []
    migd_fdsets: list[int] = []
    migd_fdset: int | None = None
    settings = QemuMigration(qemu)
    resumes: Any = None  # QEMU's RESUME events from the stop on (_watch)
    was_running, stopped, done = False, False, False
    unsynced: str | None = None  # a failed sync of IMAGE's directory, said after the save
    t = opts.timings
    try:
        state = await run_state(qemu)
        if state not in SAVABLE_STATES:
            raise ClientError(f"the VM is in state '{state}': nothing to save")
        backends = await guest_backends(qemu)
        _check_backends(backends)
        ram_fds = open_backend_files(qemu, backends)
        # Before anything of QEMU's or migd's is changed: a second save of this VM
        # (through another QMP socket) fails here, the first goes on.
        lock_vm(backends, ram_fds, locks)
        _check_not_ram(backends, ram_fds, image)
        qemu_version, machine = await qemu_identity(qemu)
        blocks = {b.id: f"vm-{tag}/{b.id}" for b in backends}
        trial = vm_image.DevicePart(0, 0, ""), vm_image.RamPart(0, 0, "", None)
        _check_header_fits(
            _image_header(image_id, qemu_version, machine, *trial, backends, blocks)
        )
        # Scoped before any object-add or add-fd: if this process is killed, migd cancels
        # its job and drops its backends (the guest's RAM mapped) and fd sets.
        migd = await connect(opts.socket, scoped=True)
        tmp, fd = _temporary_image(image)
        direct_io = opts.direct_io
        if direct_io is None:
            direct_io = probe_direct_io(tmp, for_write=True)
        migd_ids = await add_migd_backends(
            migd,
            [(f"vm-{tag}-{b.id}", blocks[b.id], b.size, ram_fds[b.id]) for b in backends],
            migd_fdsets,
        )
        # A live save's passes read the file too; its fallback to a whole save writes.
        accesses = [os.O_RDWR, os.O_WRONLY] if opts.live else [os.O_WRONLY]
        migd_fdset = await pass_image_to_migd(migd, fd, accesses, direct_io, "migd vm save")
        was_running = state == "running"
        ram_uri = f"file:/dev/fdset/{migd_fdset},offset="
        ram_job_id = f"vm-save-{tag}"
        live = opts.live and was_running  # a paused guest changes nothing: one pass
        if live:
            # The first pass runs with the guest: its RAM, then what the file holds.
            t["precopy"] = time.monotonic()
            await ram_job(migd, interrupt, opts, "save", f"{ram_job_id}-live", migd_ids,
                          f"{ram_uri}{vm_image.LIVE_RAM_OFFSET}", direct_io, err,
                          {"x-live": True})  # fmt: skip
        if interrupt.event.is_set():
            raise ClientError("interrupted before the VM was stopped")
        # QEMU's settings for its part, for as short a time as can be: a killed save
        # (SIGKILL: nothing puts them back) left x-ignore-shared on a guest that ran on
        # through the live pass, for its next live migration to leave its RAM behind.
        await settings.set_up(incoming=False)
        # QEMU writes its part into memory first (it truncates the file it is given,
        # which would cut off a RAM part written before it); it is copied in after.
        device_fd = _device_state_buffer()
        # QEMU opens the fdset's fd write-only: it looks for one with those flags.
        qemu_fd = os.open(f"/proc/self/fd/{device_fd}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            uri_path = await settings.add_fd(qemu_fd, "migd vm save")
        finally:
            os.close(qemu_fd)

        # A cont by another client of this QEMU from here on would let the guest write
        # RAM that migd copies after QEMU wrote the device state: watched until the end.
        resumes = _watch(qemu, "RESUME")
        # The guest stops: from here on its downtime counts.
        t["start"] = time.monotonic()
        if was_running:
            # Set first: a stop that QEMU carried out but did not answer in time
            # must still be undone (cont) by the failure path.
            stopped = True
            await qemu_execute(qemu, "stop")
        await qemu_execute(qemu, "migrate", {"uri": f"file:{uri_path}"})
        await wait_qemu_migration(qemu, "device-state save")
        t["device"] = time.monotonic()
        await settings.restore()  # QEMU's part is written: nothing else needs them
        device = _copy_device_state(device_fd, fd)
        os.close(device_fd)
        device_fd = -1
        ram_at = vm_image.ram_offset(device.offset + device.length)
        update = live and ram_at <= vm_image.LIVE_RAM_OFFSET
        if live and not update:
            print(
                f"the device state ({human_bytes(device.length)}) does not fit before "
                "the RAM saved while the guest ran: the RAM is saved whole",
                file=err,
                flush=True,
            )
        if update:
            ram_at = vm_image.LIVE_RAM_OFFSET
        await ram_job(migd, interrupt, opts, "save", ram_job_id, migd_ids,
                      f"{ram_uri}{ram_at}", direct_io, err,
                      {"x-update": True} if update else None)  # fmt: skip
        await _check_still_stopped(qemu, resumes)
        t["ram"] = time.monotonic()
        ram = _ram_part_info(tmp, fd, ram_at)
        size = os.fstat(fd).st_size
        header = _image_header(
            image_id,
            qemu_version,
            machine,
            device,
            vm_image.RamPart(
                ram_at,
                size - ram_at,
                ram.save_id or "",
                ram.checksums.table_digest if ram.checksums is not None else None,
            ),
            backends,
            blocks,
        )
        # Both parts durable before the header that makes the file an image.
        os.fsync(fd)
        _pwrite_all(fd, vm_image.encode(header), 0)
        os.fsync(fd)
        _check_still_named(tmp, fd)
        replaced = os.path.lexists(image)
        os.rename(tmp, image)
        tmp = None
        # The image is complete and its content durable; only its name's durability can
        # still fail. It is saved: report that exactly rather than a failure (before: "the
        # save failed", the guest run again, the new image in place all the same).
        unsynced = _sync_directory(image, replaced)
        t["durable"] = time.monotonic()
        done = True
    except OSError as exc:
        if tmp is None:
            raise ClientError(f"{image}: {exc.strerror or exc}") from None
        # The write that failed was to the temporary file: name it, and say what is left
        # (a full disk's "IMAGE: No space left on device" read as if IMAGE were damaged).
        failed, tmp = tmp, None
        left = _drop_temporary(image, failed, fd)
        raise ClientError(_temporary_failure(failed, exc, left)) from None
    except ClientError as exc:
        if tmp is None or tmp not in str(exc):
            raise
        # migd's RAM part failed writing the temporary file (a full disk): say what is left.
        failed, tmp = tmp, None
        raise ClientError(f"{exc}: {_drop_temporary(image, failed, fd)}") from None
    finally:
        if resumes is not None:
            qemu.remove_listener(resumes)
        for ram_fd in ram_fds.values():
            os.close(ram_fd)
        if device_fd >= 0:
            os.close(device_fd)
        if tmp is not None:
            _remove_if_ours(tmp, fd)
        if fd >= 0:
            os.close(fd)
        if migd is not None:
            await drop_migd_fdset(migd, migd_fdset)
            await del_migd_backends(migd, migd_ids)
            for fdset in migd_fdsets:
                await drop_migd_fdset(migd, fdset)
            await disconnect(migd)
        if not (done and opts.after == "quit"):
            await settings.restore()
        if not done and stopped and was_running:
            await _resume_after_failure(qemu, err)
    resumed, after = True, opts.after
    if unsynced is not None:
        print(unsynced, file=err, flush=True)
        resumed = False  # the exit status says the save is not known durable
        if opts.after == "quit":
            # QEMU is all of the VM whose saving is known durable: it is kept.
            after = "pause"
            print("QEMU was not quit: the VM is paused (quit it once the directory is "
                  "synced, e.g. with `sync -f`)", file=err, flush=True)  # fmt: skip
    if opts.after == "resume":
        try:
            await qemu_execute(qemu, "cont", cleanup=True)
        except ClientError as exc:
            resumed, after = False, "pause"
            if qemu_gone(exc):  # not paused: there is no VM left to resume
                after = "gone"
                print("the image is saved, but QEMU is gone (it quit or was killed): there "
                      "is no VM to resume", file=err, flush=True)  # fmt: skip
            else:
                print(f"the image is saved, but the VM could not be resumed ({exc}): it is "
                      "paused", file=err, flush=True)  # fmt: skip
    elif after == "quit":
        with contextlib.suppress(ClientError):  # QEMU closes the socket as it goes
            await qemu_execute(qemu, "quit", cleanup=True)
    if opts.json:
        passes = {"live_pass": t["start"] - t["precopy"]} if "precopy" in t else {}
        _print_json(
            out, "save", image, header, **passes, device_state=t["device"] - t["start"],
            ram=t["ram"] - t["device"], downtime=t["durable"] - t["start"],
        )  # fmt: skip
    else:
        _print_save_summary(image, header, t, after, out)
    return 0 if resumed else 1


def _sync_directory(image: str, replaced: bool) -> str | None:
    """fsync IMAGE's directory after the rename: None, or what is left if it failed (the
    image complete and its content synced; after a crash, the name may be undone)."""
    try:
        paths.sync_directory_of(image)
    except OSError as exc:
        before = "the old image again" if replaced else "gone"
        return (
            f"{image} is saved, complete and its content synced, but syncing its directory "
            f"failed ({exc.strerror or exc}): the new name may not survive a crash (it would "
            f"then be {before}); sync the directory (`sync -f`) or save again"
        )
    return None


def _watch(qemu: Any, *names: str) -> Any:
    """A listener of QEMU's events `names` on this connection (QEMU sends every event to
    every monitor): what another client of this QEMU does shows here (RESUME: a `cont`;
    MIGRATION, with the `events` capability on: a `migrate-incoming`; SHUTDOWN: a `quit`).
    QEMU answers a command after the events it sent before, so an event from before a
    reply is in the listener once the reply is."""
    from qemu.qmp import EventListener

    listener = EventListener(list(names))
    qemu.register_listener(listener)
    return listener


def _seen(listener: Any, name: str) -> bool:
    return any(event.get("event") == name for event in listener.history)


async def _check_still_stopped(qemu: Any, resumes: Any) -> None:
    """After migd's RAM part: the guest must not have run since the stop, or the RAM
    copied after QEMU's device state would not match it (torn). QEMU answers after the
    events it sent before, so a RESUME before this query-status is in `resumes` by now."""
    state = await run_state(qemu)
    if state == "running" or not resumes.empty():
        raise ClientError(
            "the VM was resumed during the save (a cont by another client of this QEMU?): "
            "its RAM was copied while it ran, and would not match its device state; "
            "the image is not written"
        )


def qemu_gone(exc: ClientError) -> bool:
    """Whether QEMU's connection ended (QEMU quit or was killed) under a command:
    qemu_execute's text says so. Then there is no VM to resume or to load into."""
    return "lost QEMU" in str(exc)


async def _resume_after_failure(qemu: Any, err: TextIO) -> None:
    """A save that stopped a running guest failed: run it again, and say what came of it;
    a guest left paused must never go unmentioned (nor one that is gone called paused)."""
    try:
        await qemu_execute(qemu, "cont", cleanup=True)
    except ClientError as exc:
        if qemu_gone(exc):
            print("the save failed, and QEMU is gone (it quit or was killed): there is no "
                  "VM to resume", file=err, flush=True)  # fmt: skip
            return
        print(f"the save failed, and the VM could not be resumed ({exc}): it is paused",
              file=err, flush=True)  # fmt: skip
    else:
        print("the save failed: the VM runs again", file=err, flush=True)


def _print_json(
    out: TextIO, what: str, image: str, header: vm_image.ImageHeader, **seconds: float
) -> None:
    """--json: one object, for management applications and `migd bench --vm`."""
    _print_summary_json(out, _summary(what, image, header, seconds))


def _print_summary_json(out: TextIO, summary: Mapping[str, Any]) -> None:
    import json

    print(json.dumps(summary), file=out, flush=True)


def _summary(
    what: str, image: str, header: vm_image.ImageHeader, seconds: Mapping[str, float]
) -> dict[str, Any]:
    return {
        "command": f"vm {what}",
        "image": image,
        "image-id": header.image_id,
        "device-state-bytes": header.device.length,
        "ram-bytes": sum(b.size for b in header.backends),
        "seconds": {key.replace("_", "-"): round(value, 6) for key, value in seconds.items()},
    }


# What the summary says of the VM after the save (`gone`: QEMU ended before --resume's cont).
_AFTER_SAVE = {
    "pause": "paused",
    "resume": "running",
    "quit": "gone (quit)",
    "gone": "gone (QEMU quit or was killed)",
}


def _print_save_summary(
    image: str, header: vm_image.ImageHeader, t: Mapping[str, float], after: str, out: TextIO,
) -> None:  # fmt: skip
    total = header.ram.length + header.device.length
    ram_bytes = sum(b.size for b in header.backends)
    live = ""
    if "precopy" in t:
        live = (
            f"  live pass:    {human_bytes(ram_bytes)} by migd in "
            f"{t['start'] - t['precopy']:.3f} s while the guest ran\n"
        )
    ram_what = "what changed since, " if live else ""
    print(
        f"vm save completed: {image} ({human_bytes(total)}; image id {header.image_id})\n"
        f"{live}"
        f"  device state: {human_bytes(header.device.length)} by QEMU in "
        f"{t['device'] - t['start']:.3f} s\n"
        f"  RAM:          {ram_what}{human_bytes(ram_bytes)} by migd in "
        f"{t['ram'] - t['device']:.3f} s ({', '.join(b.id for b in header.backends)})\n"
        f"  downtime:     {t['durable'] - t['start']:.3f} s (stop -> image durable)\n"
        f"  the VM is {_AFTER_SAVE[after]}",
        file=out,
        flush=True,
    )


# --- restore ---------------------------------------------------------------------------------


def check_image(image: str, fd: int) -> vm_image.ImageHeader:
    """The image's header, after checking both parts against it; ClientError otherwise."""
    try:
        header = vm_image.read_header(fd, image)
    except vm_image.ImageError as exc:
        raise ClientError(str(exc)) from None
    if vm_image.device_digest(fd, header.device) != header.device.sha256:
        raise ClientError(
            f"'{image}': the device state ({header.device.length} bytes at "
            f"{header.device.offset:#x}) does not match its SHA-256 in the header: corrupt"
        )
    ram = _ram_part_info(image, fd, header.ram.offset)
    if ram.save_id != header.ram.save_id:
        raise ClientError(
            f"'{image}': its RAM part is save {ram.save_id}, the header names save "
            f"{header.ram.save_id}: the parts do not belong together"
        )
    if ram.bitmap_problem is not None:
        raise ClientError(f"'{image}': the RAM part: {ram.bitmap_problem}")
    digest = ram.checksums.table_digest if ram.checksums is not None else None
    if ram.checksums is not None and ram.checksums.problem is not None:
        raise ClientError(f"'{image}': the RAM part's checksum table: {ram.checksums.problem}")
    if digest != header.ram.table_digest:
        raise ClientError(f"'{image}': the RAM part's checksum table is not the one saved")
    saved = {b.name: b.size for b in ram.blocks}
    wanted = {b.block: b.size for b in header.backends}
    if saved != wanted:
        raise ClientError(
            f"'{image}': the RAM part holds blocks {saved}, the header lists {wanted}"
        )
    return header


def match_guest(
    header: vm_image.ImageHeader, machine: str, backends: Sequence[GuestBackend]
) -> None:
    """The QEMU to restore into has the saved VM's machine type and memory backends."""
    problems = []
    if machine != header.machine:
        problems.append(f"machine type {machine}, the image was saved from {header.machine}")
    have = {b.id: b for b in backends}
    for entry in header.backends:
        b = have.get(entry.id)
        if b is None:
            problems.append(
                f"no memory backend '{entry.id}' (the image has one of {entry.size} bytes)"
            )
        elif b.size != entry.size:
            problems.append(
                f"memory backend '{entry.id}' has {b.size} bytes, the image {entry.size}"
            )
        elif (p := b.problem()) is not None:
            problems.append(p)
    extra = sorted(set(have) - {e.id for e in header.backends})
    if extra:
        problems.append(f"memory backends not in the image: {', '.join(extra)}")
    if problems:
        raise ClientError(
            "this QEMU does not match the image (start it with the saved VM's "
            "configuration and -incoming defer):\n  " + "\n  ".join(problems)
        )


async def _load_device_state(qemu: Any, image: str, uri: str) -> None:
    """QEMU loads its part, after the RAM. Its own error ("load of migration failed:
    Invalid argument") names neither the image nor what the failure leaves; the detail
    ("Unknown savevm section ...") is only in QEMU's output."""
    try:
        await qemu_execute(qemu, "migrate-incoming", {"uri": uri, "exit-on-error": False})
        await wait_qemu_migration(qemu, "device-state load")
    except ClientError as exc:
        if qemu_gone(exc):  # not a stream QEMU refused: QEMU itself ended
            raise ClientError(
                f"QEMU quit or was killed as it loaded the device state of '{image}' "
                f"({exc}): there is no VM; the image's RAM landed in its memory files"
            ) from None
        raise ClientError(
            f"QEMU could not load the device state of '{image}' ({exc}); QEMU's own output "
            "says why (often a device the saved VM had that this QEMU lacks): the RAM is "
            "restored, the VM was not started"
        ) from None


async def _check_incoming_unused(qemu: Any) -> None:
    """Before anything is written: this QEMU can still take migd's migrate-incoming. One
    started with `-incoming URI` (not defer) listens already, and one whose earlier load
    failed refuses a second: found only after the RAM landed, either was reported as
    "another incoming migration was started ... during the restore" or as a device state
    QEMU "could not load", its RAM files overwritten for nothing."""
    command = "query-migrate"
    info = expect(await qemu_execute(qemu, command), dict, f"reply to {command}")
    status = info.get("status")
    if status not in _QEMU_NOT_LOADING:
        raise ClientError(
            f"this QEMU's incoming migration was already started (it is {status}: QEMU "
            "started with `-incoming URI` rather than `-incoming defer`, or an earlier "
            "migrate-incoming, a failed restore's say); QEMU takes one per process: "
            "restore into a new QEMU started with -incoming defer (nothing was written)"
        )


async def _check_before_load(qemu: Any, watch: Any) -> None:
    """Just before QEMU loads its part: no other client of this QEMU has quit it or
    started an incoming migration since the restore began (its device state would be
    another VM's, over this image's RAM, and migd's own migrate-incoming was refused as
    if the image did not load)."""
    try:
        state = await run_state(qemu)
        info = expect(await qemu_execute(qemu, "query-migrate"), dict, "reply to query-migrate")
    except ClientError as exc:
        if _seen(watch, "SHUTDOWN") or qemu_gone(exc):
            raise ClientError(
                "QEMU quit during the restore (a `quit` by another client of this QEMU?): "
                "the RAM landed in its file, but there is no VM to load the device state into"
            ) from None
        raise
    status = info.get("status")
    if _seen(watch, "MIGRATION") or status not in _QEMU_NOT_LOADING or state != "inmigrate":
        # A stream saved from a running guest starts it once loaded: said, if so.
        left = "it RUNS: stop or quit it" if state == "running" else "it was not started"
        raise ClientError(
            "another incoming migration was started in this QEMU during the restore (a "
            f"`migrate-incoming` by another client of it; QEMU's migration is "
            f"{status or 'none'}, the VM {state}): the image's RAM landed, but QEMU's CPU "
            f"and device state are not the image's; {left}; quit this QEMU and restore "
            "into a new one"
        )


async def run_vm_restore(opts: VmOptions, out: TextIO, err: TextIO) -> int:
    # SIGINT/SIGTERM end the wait at hand, and the cleanup after it is not cut short.
    locks: list[int] = []  # lock_vm's, held until QEMU's settings are put back
    try:
        with _interruptible(opts.qemu_timeout) as interrupt:
            return await _restore(opts, out, err, interrupt, locks)
    finally:
        _release(locks)


def _open_image(image: str) -> int:
    """IMAGE, read-only, under the rules migd applies to a restore file named by path
    (state/paths.py; README, Trust model): a regular file, not another local user's, not
    writable by others, one link, no link of theirs on the way. migd does not check the fd
    the CLI passes it (the client holds it already), so the CLI, often root, must: an image
    planted in /tmp by `nobody` was restored, its RAM and QEMU's device state theirs."""
    try:
        fd, _ = paths.open_regular(
            image, os.O_RDONLY | os.O_CLOEXEC, create=False, owners=paths.trusted_owners()
        )
    except paths.FileRefused as exc:  # its text names the file
        raise ClientError(f"cannot restore: {exc}") from None
    except OSError as exc:
        raise ClientError(f"cannot open {image}: {exc.strerror}") from None
    return fd


def _process_age() -> float | None:
    """Seconds since this process began (/proc/self/stat's starttime, in clock ticks since
    boot: 10 ms steps), None where /proc does not say. A restore's start-up: the guest is
    down while the command loads too, and a management application counts from its spawn."""
    try:
        began = int(read_stat()[1][19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - began)


async def _restore(
    opts: VmOptions, out: TextIO, err: TextIO, interrupt: Interrupt, locks: list[int]
) -> int:
    # The guest is down all along: its downtime counts from here, checks included, and
    # the command's own start-up before it is reported beside it.
    t = opts.timings
    t["start"] = time.monotonic()
    startup = _process_age()
    image = os.path.abspath(opts.image)
    fd = _open_image(image)
    qemu = migd = watch = None
    settings: QemuMigration | None = None
    ram_fds: dict[str, int] = {}
    migd_ids: list[str] = []
    migd_fdsets: list[int] = []
    migd_fdset: int | None = None
    requests = (0, 0)  # a postcopy restore's: QEMU's page requests, the pages they named
    try:
        header = check_image(image, fd)
        qemu = await connect_qemu(opts.qmp, opts.qemu_timeout)
        # What other clients of this QEMU do during the restore (QEMU 10 serves several
        # monitors): watched from here on, checked just before QEMU's part loads.
        # (A `cont` is harmless here: docs/vm-image.md, test_vm_concurrent.)
        watch = _watch(qemu, "MIGRATION", "SHUTDOWN")
        settings = QemuMigration(qemu)
        state = await run_state(qemu)
        if state != "inmigrate":
            raise ClientError(
                f"the VM is in state '{state}': restore needs a QEMU started with -incoming defer"
            )
        await _check_incoming_unused(qemu)
        _, machine = await qemu_identity(qemu)
        backends = await guest_backends(qemu)
        match_guest(header, machine, backends)
        ram_fds = open_backend_files(qemu, backends)
        lock_vm(backends, ram_fds, locks)  # as a save's: before anything is changed
        if opts.postcopy:
            from .vm_postcopy import CAPS, restore_postcopy  # numpy: only when needed

            await settings.set_up(incoming=True, wanted=CAPS)
            t["checked"] = time.monotonic()
            # Incoming QEMU starts the guest at RUN unless stopped first (--paused).
            await qemu_execute(qemu, "stop")
            await _check_before_load(qemu, watch)
            postcopy = await restore_postcopy(
                qemu, fd, image, header, ram_fds, opts.paused, opts.quiet, err
            )
            t["device"], t["running"], t["ram"] = postcopy.started, postcopy.running, postcopy.ram
            requests = (postcopy.requests, postcopy.requested_pages)
        else:
            # Set now, not at the load: the MIGRATION events are on while the RAM lands (one
            # started before and still running, or done, shows in _check_before_load too).
            await settings.set_up(incoming=True)
            # Scoped before any object-add or add-fd: if this process is killed, migd cancels
            # its job and drops its backends (the guest's RAM mapped) and fd sets.
            migd = await connect(opts.socket, scoped=True)
            direct_io = opts.direct_io
            if direct_io is None:
                direct_io = probe_direct_io(f"/proc/self/fd/{fd}", for_write=False)
            tag = f"{header.image_id[:8]}-{os.getpid()}"
            t["checked"] = time.monotonic()
            try:
                migd_ids = await add_migd_backends(
                    migd,
                    [(f"vm-{tag}-{e.id}", e.block, e.size, ram_fds[e.id]) for e in header.backends],
                    migd_fdsets,
                    opts.accept_partial,
                )
            except ClientError as exc:
                if "left partial" not in str(exc):
                    raise
                raise ClientError(
                    f"{exc}\n(this QEMU's RAM file holds a partial restore; "
                    "`migd vm restore --accept-partial` restores into it anyway)"
                ) from None
            # Incoming QEMU starts the guest when its part is loaded unless stopped first.
            await qemu_execute(qemu, "stop")
            uri_path = await settings.add_fd(fd, "migd vm restore")
            migd_fdset = await pass_image_to_migd(
                migd, fd, [os.O_RDONLY], direct_io, "migd vm restore"
            )
            await ram_job(migd, interrupt, opts, "restore", f"vm-restore-{tag}", migd_ids,
                          f"file:/dev/fdset/{migd_fdset},offset={header.ram.offset}",
                          direct_io, err)  # fmt: skip
            t["ram"] = time.monotonic()
            await _check_before_load(qemu, watch)
            await _load_device_state(qemu, image, f"file:{uri_path},offset={header.device.offset}")
            t["device"] = time.monotonic()
            if not opts.paused:
                # Not ended by Ctrl-C: a cont QEMU carried out but answered late would be
                # reported as a failed restore of a guest that runs.
                await qemu_execute(qemu, "cont", interruptible=False)
            t["running"] = time.monotonic()
        # QEMU's settings and migd's mappings are undone once the guest runs
        # (unmapping GiBs takes tens of ms), and also after a failure.
    finally:
        if qemu is not None and watch is not None:
            qemu.remove_listener(watch)
        os.close(fd)
        for ram_fd in ram_fds.values():
            os.close(ram_fd)
        if qemu is not None and settings is not None:
            await settings.restore()
        if migd is not None:
            await drop_migd_fdset(migd, migd_fdset)
            await del_migd_backends(migd, migd_ids)
            for fdset in migd_fdsets:
                await drop_migd_fdset(migd, fdset)
            await disconnect(migd)
        if qemu is not None:
            await disconnect(qemu)
    ram_bytes = sum(b.size for b in header.backends)
    if opts.postcopy:
        return _print_postcopy_summary(out, opts, image, header, t, startup, ram_bytes, requests)
    if opts.json:
        _print_json(
            out, "restore", image, header, checks=t["checked"] - t["start"],
            ram=t["ram"] - t["checked"],
            device_state=t["device"] - t["ram"], downtime=t["running"] - t["start"],
            **({"startup": startup} if startup is not None else {}),
        )  # fmt: skip
        return 0
    loading = _startup_line(startup)
    print(
        f"vm restore completed: {image} (image id {header.image_id})\n"
        f"{loading}"
        f"  checks:       image and QEMU in {t['checked'] - t['start']:.3f} s\n"
        f"  RAM:          {human_bytes(ram_bytes)} by migd in {t['ram'] - t['checked']:.3f} s\n"
        f"  device state: {human_bytes(header.device.length)} by QEMU in "
        f"{t['device'] - t['ram']:.3f} s\n"
        f"  downtime:     {t['running'] - t['start']:.3f} s (restore start -> "
        f"{'paused, ready' if opts.paused else 'running'})",
        file=out,
        flush=True,
    )
    return 0


def _startup_line(startup: float | None) -> str:
    """The restore summary's start-up line; none where /proc did not say (_process_age)."""
    if startup is None:
        return ""
    return f"  start-up:     {startup:.2f} s (the command loading, before the restore)\n"


def _print_postcopy_summary(
    out: TextIO,
    opts: VmOptions,
    image: str,
    header: vm_image.ImageHeader,
    t: Mapping[str, float],
    startup: float | None,
    ram_bytes: int,
    requests: tuple[int, int],
) -> int:
    """A postcopy restore's timings: its downtime ends before its RAM is in; and how
    often the guest had to wait for a page (QEMU's requests)."""
    state = "paused, ready" if opts.paused else "running"
    if opts.json:
        seconds = {
            "checks": t["checked"] - t["start"],
            "device_state": t["device"] - t["checked"],
            "downtime": t["running"] - t["start"],
            "ram": t["ram"] - t["start"],
            "ram_after_start": t["ram"] - t["running"],
            **({"startup": startup} if startup is not None else {}),
        }
        summary = _summary("restore", image, header, seconds)
        summary["postcopy"] = True
        summary["page-requests"], summary["pages-requested"] = requests
        _print_summary_json(out, summary)
        return 0
    loading = _startup_line(startup)
    print(
        f"vm restore completed (postcopy): {image} (image id {header.image_id})\n"
        f"{loading}"
        f"  checks:       image and QEMU in {t['checked'] - t['start']:.3f} s\n"
        f"  device state: {human_bytes(header.device.length)} by QEMU in "
        f"{t['device'] - t['checked']:.3f} s\n"
        f"  downtime:     {t['running'] - t['start']:.3f} s (restore start -> {state})\n"
        f"  RAM:          {human_bytes(ram_bytes)} in {t['ram'] - t['running']:.3f} s more, "
        f"the guest {state} (all in {t['ram'] - t['start']:.3f} s after the start)\n"
        f"  asked for:    {requests[1]} pages in {requests[0]} requests of QEMU's, sent first",
        file=out,
        flush=True,
    )
    return 0


def _image_or_unfinished(fd: int) -> bool:
    """A VM image, or a `vm save` killed before its header (shown and refused as such,
    not as a foreign file)."""
    return vm_image.is_image(fd) or vm_image.is_unfinished(fd)


def check_image_file(path: str) -> vm_image.ImageHeader | None:
    """For `migd verify`: the header of the VM image `path`, its parts checked as `vm
    restore` checks them (ClientError names what is wrong), or None when the file is
    not a VM image (or cannot be opened: verify's own open says why). The RAM part's
    pages are left to verify, at the header's offset: a VM image starts with this
    header, not QEVM, and was called "not a QEMU/migd save file", its device state and
    the tie between the parts checked by nothing short of a restore."""
    try:
        fd = open_regular(path)
    except (InspectError, OSError):
        return None
    try:
        if not _image_or_unfinished(fd):
            return None
        return check_image(path, fd)
    finally:
        os.close(fd)


def describe(path: str) -> dict[str, Any] | None:
    """For `migd inspect`: the image's header and what each part holds, with "problems"
    listing why `migd vm restore` would refuse it; None when the file is not a VM image
    (a plain save file)."""
    fd = open_regular(path)
    try:
        if not _image_or_unfinished(fd):
            return None
        try:
            header = vm_image.read_header(fd, path)
        except vm_image.ImageError as exc:
            return {"image": path, "header": None, "problems": [str(exc)]}
        problems = []
        if vm_image.device_digest(fd, header.device) != header.device.sha256:
            problems.append("the device state does not match its SHA-256: corrupt")
        device_head = os.pread(fd, 8, header.device.offset)
    finally:
        os.close(fd)
    ram: dict[str, Any] | None = None
    try:
        ram = inspect_file(path, header.ram.offset).to_dict()
    except (InspectError, OSError) as exc:
        problems.append(f"the RAM part cannot be read: {exc}")
    else:
        if not ram["complete"]:
            problems.append(f"the RAM part is incomplete: {ram['problem']}")
        elif ram["bitmap_problem"] is not None:
            problems.append(f"the RAM part: {ram['bitmap_problem']}")
        elif ram["checksums"] is not None and ram["checksums"]["problem"] is not None:
            problems.append(f"the RAM part's checksum table: {ram['checksums']['problem']}")
        elif ram["save_id"] != header.ram.save_id:
            problems.append("the RAM part is another save than the header names")
    return {
        "image": path,
        "header": header.to_json(),
        "device-state-magic": device_head.hex(),
        "ram-part": ram,
        "problems": problems,
    }
