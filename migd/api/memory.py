"""Memory backend commands: object-add, object-del, query-memdev."""

from __future__ import annotations

import enum
import os
import typing
from collections.abc import Callable, Collection
from typing import Annotated, Any, ClassVar

from pydantic import ModelWrapValidatorHandler, Strict, create_model, model_validator

from ..errors import BackendError, DeviceNotFound, InvalidRequest
from ..io import blocking
from ..pages import PAGE_SIZE
from ..qapi import Uint16, Uint32, Uint64
from ..qmp.dispatch import command
from ..qmp.validation import ArgumentError, Empty, QapiModel, QapiUnion
from ..state.fdsets import check_room_for_fds, file_name, is_fdset_path
from ..state.memory import MemoryBackend, create_file_backend, create_ram_backend
from ..state.partial import PartialMarks
from ..state.paths import PathPolicy, trusted_owners
from .context import Context, refuse_other_view
from .scope import record_backend


class QomType(enum.StrEnum):
    memory_backend_file = "memory-backend-file"
    memory_backend_ram = "memory-backend-ram"


class HostMemPolicy(enum.StrEnum):
    default = "default"
    preferred = "preferred"
    bind = "bind"
    interleave = "interleave"


class OnOffAuto(enum.StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


# memory-backend-file's own properties (QEMU's MemoryBackendFileProperties), as fields
# of ObjectAddArgs and as QMP names: a memory-backend-ram given one is refused as QEMU
# refuses it, as unexpected.
_FILE = ("align", "offset", "discard_data", "mem_path", "pmem", "readonly", "rom")
FILE_ONLY = tuple(field.replace("_", "-") for field in _FILE)


class ObjectAddArgs(QapiModel):
    """One flat model checks both types (QEMU's texts for each); query-qmp-schema shows
    it as QEMU's ObjectOptions is shown, a union on 'qom-type' (qapi_union below). Every
    property of QEMU's two backends is taken with its QAPI type; what migd does with
    each is in check_backend_options and docs/qemu-conformance.md."""

    qom_type: Annotated[QomType, Strict(False)]
    id: str
    # QEMU's MemoryBackendProperties, in its order
    dump: bool | None = None
    host_nodes: list[Uint16] | None = None
    merge: bool | None = None
    policy: Annotated[HostMemPolicy, Strict(False)] | None = None
    prealloc: bool | None = None
    prealloc_threads: Uint32 | None = None
    prealloc_context: str | None = None
    share: bool | None = None
    reserve: bool | None = None
    size: Uint64
    x_use_canonical_path_for_ramblock_id: bool | None = None
    # MemoryBackendFileProperties
    align: Uint64 | None = None
    offset: Uint64 | None = None
    discard_data: bool | None = None
    mem_path: str | None = None
    pmem: bool | None = None
    readonly: bool | None = None
    rom: Annotated[OnOffAuto, Strict(False)] | None = None
    # migd's
    ramblock_name: str | None = None
    x_accept_partial: bool = False

    qapi_union: ClassVar[QapiUnion]  # set below, from these fields

    @model_validator(mode="wrap")
    @classmethod
    def _file_only_members(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        """QEMU reads a memory-backend-ram's own members first, then refuses a file's
        member as unexpected (mem-path is refused later, in migd's words)."""
        if isinstance(data, dict) and data.get("qom-type") == QomType.memory_backend_ram:
            extra = [k for k in data if k in FILE_ONLY and k != "mem-path"]
            if extra:
                handler({k: v for k, v in data.items() if k not in extra})
                raise ArgumentError(f"Parameter '{extra[0]}' is unexpected")
        return handler(data)

    @property
    def block_name(self) -> str:
        """The RAM block's name in save files: 'ramblock-name', else QEMU's: the id, or
        with x-use-canonical-path-for-ramblock-id the object's path, '/objects/ID'."""
        if self.ramblock_name:
            return self.ramblock_name
        return f"/objects/{self.id}" if self.x_use_canonical_path_for_ramblock_id else self.id


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


_COMMON = (
    *("dump", "host_nodes", "merge", "policy", "prealloc", "prealloc_threads"),
    *("prealloc_context", "share", "reserve", "size", "x_use_canonical_path_for_ramblock_id"),
)
_MIGD = ("ramblock_name", "x_accept_partial")

# QEMU's ObjectOptions for the two types migd creates: base 'qom-type' and 'id', then each
# type's properties (QEMU's MemoryBackendFileProperties / MemoryBackendProperties).
ObjectAddArgs.qapi_union = QapiUnion(
    "qom_type",
    {
        "memory-backend-file": _properties(
            "MemoryBackendFileProperties", *_COMMON, *_FILE, *_MIGD, required=("mem_path",)
        ),
        "memory-backend-ram": _properties("MemoryBackendProperties", *_COMMON, *_MIGD),
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
    await refuse_other_view(ctx, args.mem_path)
    # Before anything is created, and held until the backend is added: a refused
    # object-add must leave no file behind.
    with registry.reserving(args.id, args.block_name, owner):
        fd = None
        # A VMM's memfd or file passed by add-fd: map a read-write dup the backend owns.
        if args.mem_path is not None and is_fdset_path(args.mem_path):
            fd = ctx.services.fdsets.dup_from_fdset(args.mem_path, os.O_RDWR, owner)
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


def check_backend_options(args: ObjectAddArgs) -> None:
    """QEMU's own checks of the backend properties, in its texts and order, then what migd
    does not do, named with why (docs/qemu-conformance.md has the table). merge, dump,
    prealloc, prealloc-threads and x-use-canonical-path-for-ramblock-id are honoured
    (create_backend); the others are taken at the value that asks for nothing."""
    qom_type = args.qom_type.value
    if args.prealloc_threads == 0:
        raise BackendError(f"property 'prealloc-threads' of {qom_type} doesn't take value '0'")
    if args.prealloc_context is not None:
        # QEMU's answer for a thread-context object that does not exist: migd has none.
        raise DeviceNotFound(f"Device '{args.prealloc_context}' not found")
    policy = args.policy or HostMemPolicy.default
    if args.host_nodes and policy is HostMemPolicy.default:
        raise BackendError(
            "host-nodes must be empty for policy default, or you should explicitly "
            "specify a policy other than default"
        )
    if not args.host_nodes and policy is not HostMemPolicy.default:
        raise BackendError(f"host-nodes must be set for policy {policy.value}")
    if args.prealloc and args.reserve is False:
        raise BackendError("'prealloc=on' and 'reserve=off' are incompatible")
    if args.align is not None and args.align % PAGE_SIZE:
        raise BackendError(
            f"alignment {args.align:#x} must be multiples of page size {PAGE_SIZE:#x}"
        )
    if args.rom is OnOffAuto.on and not args.readonly:
        raise BackendError("property 'rom' = 'on' is not supported with 'readonly' = 'off'")
    _refuse_unsupported(args, policy)


def _refuse_unsupported(args: ObjectAddArgs, policy: HostMemPolicy) -> None:
    """What a QEMU backend can do and migd's cannot: refused by name, with why."""
    why: dict[str, tuple[bool, str]] = {
        "reserve": (
            args.reserve is False,
            "migd's mappings always reserve their memory (no MAP_NORESERVE), so that a "
            "restore fails with an error rather than a process killed for want of memory",
        ),
        "policy": (policy is not HostMemPolicy.default, "migd binds no memory to NUMA nodes"),
        "align": (
            args.align is not None and args.align > PAGE_SIZE,
            "migd maps memory aligned to the page size only",
        ),
        "offset": (bool(args.offset), "migd maps a memory file from its start"),
        "discard-data": (
            bool(args.discard_data),
            "migd never destroys a memory file's contents: they are what it saves",
        ),
        "pmem": (bool(args.pmem), "migd makes no persistent-memory (MAP_SYNC) guarantees"),
        "readonly": (
            bool(args.readonly),
            "migd maps its backends read-write, so that a restore can land in them",
        ),
    }
    for name, (refused, reason) in why.items():
        if refused:
            value = getattr(args, name.replace("-", "_"))
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            raise BackendError(f"migd does not support '{name}' = '{shown}': {reason}")


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
    check_backend_options(spec)
    if spec.qom_type != QomType.memory_backend_file:
        backend = create_ram_backend(spec.id, spec.size, ramblock_name=spec.block_name)
    else:
        backend = _create_file_backend(spec, paths, owners, fd, close_fd, refuse_file)
    try:
        if partial is not None:  # a file's mark (memory-backend-ram has none: no-op)
            partial.check_add(backend, spec.x_accept_partial)
        _apply_advice(backend, spec)
    except BaseException:  # refused (partial, a prealloc with no room): nothing is kept
        backend.close()
        raise
    return backend


def _create_file_backend(
    spec: ObjectAddArgs,
    paths: PathPolicy,
    owners: Collection[int] | None,
    fd: int | None,
    close_fd: Callable[[int], None],
    refuse_file: Callable[[tuple[int, int]], None] | None,
) -> MemoryBackend:
    assert spec.mem_path is not None  # object-add and the configuration require it
    return create_file_backend(
        spec.id,
        spec.size,
        spec.mem_path,
        share=True if spec.share is None else spec.share,
        ramblock_name=spec.block_name,
        fd=fd,
        close_fd=close_fd,
        open_file=paths.open,
        owners=owners,
        refuse_file=refuse_file,
    )


def _apply_advice(backend: MemoryBackend, spec: ObjectAddArgs) -> None:
    """merge (MADV_MERGEABLE: KSM may share its pages), dump false (MADV_DONTDUMP) and
    prealloc (every page populated now, MADV_POPULATE_WRITE, as QEMU's prealloc does, in
    one call whatever prealloc-threads says); query-memdev reports what took effect. A
    prealloc that fails refuses the backend."""
    if spec.merge:
        backend.advise_mergeable()
    if spec.dump is False:
        backend.advise_dontdump()
    if spec.prealloc:
        backend.preallocate()


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
