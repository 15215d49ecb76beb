"""Memory backend commands: object-add, object-del, query-memdev."""

from __future__ import annotations

import enum
import os
import typing
from collections.abc import Callable, Collection
from typing import Annotated, Any, ClassVar

from pydantic import Strict, create_model

from ..errors import BackendError, InvalidRequest
from ..io import blocking
from ..pages import PAGE_SIZE
from ..qapi import Uint64
from ..qmp.dispatch import command
from ..qmp.validation import Empty, QapiModel, QapiUnion
from ..state.fdsets import check_room_for_fds, file_name, is_fdset_path
from ..state.memory import MemoryBackend, create_file_backend, create_ram_backend
from ..state.partial import PartialMarks
from ..state.paths import PathPolicy, trusted_owners
from .context import Context
from .scope import record_backend


class QomType(enum.StrEnum):
    memory_backend_file = "memory-backend-file"
    memory_backend_ram = "memory-backend-ram"


class ObjectAddArgs(QapiModel):
    """One flat model checks both types (QEMU's texts for each); query-qmp-schema shows
    it as QEMU's ObjectOptions is shown, a union on 'qom-type' (qapi_union below)."""

    qom_type: Annotated[QomType, Strict(False)]
    id: str
    size: Uint64
    mem_path: str | None = None
    share: bool | None = None
    ramblock_name: str | None = None
    x_accept_partial: bool = False

    qapi_union: ClassVar[QapiUnion]  # set below, from these fields


def _properties(name: str, *members: str, required: Collection[str] = ()) -> type[QapiModel]:
    """A case of object-add's union for introspection: those members of ObjectAddArgs,
    as declared there, `required` ones mandatory (mem-path of a file, as in QEMU)."""
    fields: dict[str, Any] = {}
    for member in members:
        info = ObjectAddArgs.model_fields[member]
        kind = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        fields[member] = (_strip_none(kind), ...) if member in required else (kind, info)
    model: type[QapiModel] = create_model(name, __base__=QapiModel, **fields)
    return model


def _strip_none(kind: Any) -> Any:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if len(args) == 1 else kind


# QEMU's ObjectOptions for the two types migd creates: base 'qom-type' and 'id', then each
# type's properties (QEMU's MemoryBackendFileProperties / MemoryBackendProperties).
ObjectAddArgs.qapi_union = QapiUnion(
    "qom_type",
    {
        "memory-backend-file": _properties(
            "MemoryBackendFileProperties",
            "size", "share", "mem_path", "ramblock_name", "x_accept_partial",
            required=("mem_path",),
        ),
        "memory-backend-ram": _properties(
            "MemoryBackendProperties", "size", "share", "ramblock_name", "x_accept_partial"
        ),
    },
    base=("qom_type", "id"),
)  # fmt: skip


@command(
    "object-add",
    ObjectAddArgs,
    Empty,
    "Create a memory backend, the unit migd saves and restores. 'memory-backend-file' maps "
    "'mem-path', a regular file on tmpfs, hugetlbfs or any filesystem: created with mode "
    "0600 if missing; a new or empty file is extended to 'size', a larger one used as a "
    "prefix, a smaller non-empty one refused, as in QEMU; an existing file must belong to "
    "migd's or the client's uid, be writable by no one else and have one link, and be "
    "named through no other user's link or directory; a file another backend or a "
    "running job uses is refused. "
    "'/dev/fdset/N' maps a read-write fd of that set passed by add-fd, such as a VMM's "
    "memfd (exempt from the ownership rule); 'memory-backend-ram' is anonymous memory "
    "owned by migd. 'size' is a positive multiple of 4096. migd extension: 'share' "
    "defaults to true for files, so that a restore lands in the file. 'ramblock-name' "
    "sets the block name used in save files (default: the id), to match QEMU names such "
    "as 'pc.ram'. A file that an interrupted restore left partial (a mix of old and "
    "restored pages) is refused unless 'x-accept-partial' is true; its mark stays until "
    "a restore into it completes.",
)
async def object_add(ctx: Context, args: ObjectAddArgs) -> Empty:
    registry = ctx.services.memory
    check_size(args.qom_type, args.size)
    if args.qom_type is QomType.memory_backend_file:
        if args.mem_path is None:
            raise InvalidRequest("Parameter 'mem-path' is missing")
    else:
        if args.mem_path is not None:
            raise InvalidRequest("Parameter 'mem-path' is unexpected")
        if args.share:
            raise InvalidRequest("Parameter 'share' is unexpected: memory-backend-ram is private")
    owner = blocking.capped_uid()
    if owner is not None and args.mem_path is not None:
        # A file backend holds two fds while listed: another uid's may not take the fds
        # migd keeps free for root's clients, passed fds and jobs (state/fdsets.py).
        check_room_for_fds("memory backends", "delete some with object-del", capped=True)
    # Before anything is created, and held until the backend is added: a refused
    # object-add must leave no file behind.
    with registry.reserving(args.id, args.ramblock_name or args.id, owner):
        fd = None
        # A VMM's memfd or file passed by add-fd: map a read-write dup the backend owns.
        if args.mem_path is not None and is_fdset_path(args.mem_path):
            fd = ctx.services.fdsets.dup_from_fdset(args.mem_path, os.O_RDWR)
        engine = ctx.services.engine
        # Messages name a passed fd's file by its real name (state/fdsets.file_name).
        name = file_name(args.mem_path, fd) if args.mem_path and fd is not None else None
        name = name or args.mem_path or args.id

        def refuse_file(identity: tuple[int, int]) -> None:
            # Before the file is extended or mapped; again below, on the loop, where no
            # other request can start a job or add a backend between the check and the add.
            registry.refuse_shared_file(identity, name)
            engine.refuse_job_file(identity, name)

        backend = await blocking.to_thread(
            create_backend,
            args,
            ctx.services.paths,
            engine.partial,
            owners=trusted_owners(ctx.session.peer_uid),
            fd=fd,
            close_fd=ctx.services.fdsets.close_dup,
            refuse_file=refuse_file,
        )
        try:
            identity = backend.file_identity()
            if identity is not None:
                engine.refuse_job_file(identity, name)
            registry.add(backend, reserved=True)
        except BaseException:
            # Unmapping takes ms per GiB, and a close on a FUSE mount waits for its FLUSH.
            await blocking.to_thread(backend.close)
            raise
        record_backend(ctx, backend)
    return Empty()


def check_size(qom_type: QomType, size: int) -> None:
    """QEMU's texts for a size it refuses too. QEMU rounds a memory-backend-ram size up to
    whole pages; migd refuses it, saying so in QEMU's words for a file."""
    if size == 0:
        raise BackendError(f"property 'size' of {qom_type} doesn't take value '0'")
    if size % PAGE_SIZE:
        raise BackendError(f"backend '{qom_type}' memory size must be multiple of 4 KiB")


def create_backend(
    spec: ObjectAddArgs,
    paths: PathPolicy,
    partial: PartialMarks | None = None,
    *,
    owners: Collection[int] | None = None,
    fd: int | None = None,
    close_fd: Callable[[int], None] = os.close,
    refuse_file: Callable[[tuple[int, int]], None] | None = None,
) -> MemoryBackend:
    """The memory backend `spec` describes (object-add's arguments, or a [[memory-backend]]
    table of the configuration, which derives from them): a file one is refused if an
    interrupted restore left it partial (unless spec.x_accept_partial), and then closed.
    Blocking: run it in a thread."""
    if spec.qom_type != QomType.memory_backend_file:
        return create_ram_backend(spec.id, spec.size, ramblock_name=spec.ramblock_name)
    assert spec.mem_path is not None  # object-add and the configuration require it
    backend = create_file_backend(
        spec.id,
        spec.size,
        spec.mem_path,
        share=True if spec.share is None else spec.share,
        ramblock_name=spec.ramblock_name,
        fd=fd,
        close_fd=close_fd,
        open_file=paths.open,
        owners=owners,
        refuse_file=refuse_file,
    )
    if partial is not None:
        try:
            partial.check_add(backend, spec.x_accept_partial)
        except BaseException:
            backend.close()
            raise
    return backend


class ObjectDelArgs(QapiModel):
    id: str


@command(
    "object-del",
    ObjectDelArgs,
    Empty,
    "Remove a memory backend and unmap it (its file stays). Refused while a job (a "
    "migration, memory-save, memory-restore) uses it, naming the job.",
)
async def object_del(ctx: Context, args: ObjectDelArgs) -> Empty:
    if not any(backend.id == args.id for backend in ctx.services.memory):
        raise BackendError(f"object '{args.id}' not found")  # QEMU's text
    owner = ctx.services.engine.owner_of(args.id)
    if owner is not None:
        raise BackendError(f"Memory backend '{args.id}' is in use by job '{owner}'")
    backend = ctx.services.memory.take(args.id)
    # munmap of a populated mapping frees its page tables (and a memory-backend-ram's
    # pages): 44-51 ms for 2 GiB, in which no other client was answered (red-team,
    # session 16). Gone from the registry at once; the reply waits for the close, so
    # that the client's next command finds the file and any fdset dup released.
    await blocking.to_thread(backend.close)
    return Empty()


class HostMemPolicy(enum.StrEnum):
    default = "default"
    preferred = "preferred"
    bind = "bind"
    interleave = "interleave"


class Memdev(QapiModel):
    """QEMU 10's MemdevInfo members in QEMU's order, then migd's own."""

    id: str
    size: int
    merge: bool
    dump: bool
    prealloc: bool
    share: bool
    reserve: bool
    host_nodes: list[int]
    policy: HostMemPolicy
    qom_type: str
    mem_path: str | None = None
    ramblock_name: str


@command(
    "query-memdev",
    Empty,
    list[Memdev],
    "List the memory backends in creation order, with QEMU's members as they are for "
    "migd's mappings: 'merge' false (no KSM advice), 'dump' true, 'prealloc' false "
    "(pages are populated by a save or restore, not at creation), 'reserve' true (no "
    "MAP_NORESERVE), 'host-nodes' empty and 'policy' default (no NUMA binding). migd "
    "extension, after QEMU's members: 'qom-type', 'mem-path' and 'ramblock-name'.",
)
async def query_memdev(ctx: Context, args: Empty) -> list[Memdev]:
    return [
        Memdev(
            id=b.id,
            size=b.size,
            merge=b.mergeable,
            dump=b.dumpable,
            prealloc=b.preallocated,
            share=b.share,
            reserve=b.reserves_swap,
            host_nodes=[],
            policy=HostMemPolicy.default,
            qom_type=b.qom_type,
            mem_path=b.mem_path,
            ramblock_name=b.block_name,
        )
        for b in ctx.services.memory
    ]
