"""Migration commands: capabilities, parameters, migrate, migrate-incoming, query, cancel."""

from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Annotated, Any

from pydantic import ConfigDict, Field, Strict, ValidationInfo, create_model, field_validator
from pydantic_core import PydanticCustomError

from ..errors import MigrationError
from ..io.target import FileTarget, NotSeekable, Target, parse_uri
from ..migration.job import MigrationStatus, RamStats
from ..migration.settings import MigrationCapability, Parameters, plain_types, set_types
from ..qapi import Uint16, Uint64
from ..qmp.dispatch import command, event
from ..qmp.validation import Empty, QapiModel, QapiUnion, QapiUnionModel
from .context import Context, refuse_other_view
from .scope import record_job


class CapabilityState(QapiModel):
    capability: Annotated[MigrationCapability, Strict(False)]
    state: bool


class SetCapabilitiesArgs(QapiModel):
    capabilities: list[CapabilityState]


@command(
    "migrate-set-capabilities",
    SetCapabilitiesArgs,
    Empty,
    "Turn migration capabilities on or off. Every capability of QEMU 10 is accepted, and "
    "all are off by default, as in QEMU. migd does 'multifd' (page I/O through "
    "'multifd-channels' threads, each with its own fd), 'mapped-ram' (required: the only "
    "layout migd writes and reads) and 'events' (MIGRATION events). Turning any other on "
    "is refused: with QEMU's text where QEMU refuses the resulting set too (xbzrle or "
    "postcopy-ram with mapped-ram, zero-copy-send without multifd, postcopy-preempt "
    "without postcopy-ram, switchover-ack without return-path, dirty-limit without KVM, "
    "...), else with \"migd does not implement the 'X' capability\" and why. Turning "
    "one off is always accepted. As in QEMU, the whole list is checked against the "
    "resulting set first, and a refused request changes nothing. Refused while a "
    "migration runs.",
)
async def migrate_set_capabilities(ctx: Context, args: SetCapabilitiesArgs) -> Empty:
    changes = {c.capability.name: c.state for c in args.capabilities}
    ctx.services.engine.set_capabilities(changes)
    return Empty()


@command(
    "query-migrate-capabilities",
    Empty,
    list[CapabilityState],
    "The state of every capability of QEMU 10, in QEMU's order.",
)
async def query_migrate_capabilities(ctx: Context, args: Empty) -> list[CapabilityState]:
    caps = dataclasses.asdict(ctx.services.engine.caps)
    return [CapabilityState(capability=c, state=caps[c.name]) for c in MigrationCapability]


# Every parameter, each optional (a JSON null is a type error, except for StrOrNull):
# what migrate-set-parameters changes.
_SET_FIELDS: dict[str, Any] = {name: (kind, None) for name, kind in set_types(Parameters).items()}
SetParametersArgs = create_model("SetParametersArgs", __base__=QapiModel, **_SET_FIELDS)
# Every parameter, as query-migrate-parameters reports it (each optional in QEMU's
# schema too; block-bitmap-mapping is left out until set).
_QUERY_FIELDS: dict[str, Any] = {
    name: (kind, None) for name, kind in plain_types(Parameters).items()
}
MigrationParameters = create_model("MigrationParameters", __base__=QapiModel, **_QUERY_FIELDS)


@command(
    "migrate-set-parameters",
    SetParametersArgs,
    Empty,
    "Set migration parameters. Every parameter of QEMU 10 is accepted with its QAPI type "
    "and QEMU's own range checks and texts. migd uses 'multifd-channels' (1..255, default "
    "2), 'direct-io' (default false; O_DIRECT on every multifd channel, effective only "
    "with the multifd and mapped-ram capabilities), 'max-bandwidth' (bytes/s; migd's "
    "default 0 means unlimited, unlike QEMU's 128 MiB/s) and 'zero-page-detection' "
    "('multifd' and 'legacy' both skip zero pages, giving the same file; 'none' writes "
    "every page). The others only shape a live migration of a running guest "
    "(downtime-limit, announce-*, cpu-throttle-*, xbzrle-cache-size, the postcopy and "
    "switchover bandwidths, dirty limits, compression levels, tls-hostname, tls-authz, "
    "...): they are stored and reported with no effect, as in QEMU for a stopped "
    "guest. Refused with QEMU's text: 'multifd-compression' other than none or a "
    "non-empty 'tls-creds' with mapped-ram on; refused as not implemented by migd: those "
    "without mapped-ram, 'mode' other than normal and a non-empty "
    "'block-bitmap-mapping'. As in QEMU, the resulting set is checked as a whole and a "
    "refused request changes nothing. Never refused while jobs run: each job keeps the "
    "settings it started with and later jobs get the new ones; 'max-bandwidth' also "
    "applies at once to a running migrate, as in QEMU.",
)
async def migrate_set_parameters(ctx: Context, args: SetParametersArgs) -> Empty:
    ctx.services.engine.set_parameters(
        {name: getattr(args, name) for name in args.model_fields_set}
    )
    return Empty()


@command(
    "query-migrate-parameters",
    Empty,
    MigrationParameters,
    "Every migration parameter of QEMU 10 with its current value ('block-bitmap-mapping' "
    "only once set, as in QEMU). Defaults are QEMU's, except 'max-bandwidth' 0 "
    "(unlimited).",
)
async def query_migrate_parameters(ctx: Context, args: Empty) -> MigrationParameters:
    # Not strict: a value from the configuration file is the enum's plain string.
    params = dataclasses.asdict(ctx.services.engine.params)
    return MigrationParameters.model_validate(params, strict=False)


class ChannelType(enum.StrEnum):
    main = "main"
    cpr = "cpr"


class Transport(enum.StrEnum):  # QEMU's order
    socket = "socket"
    exec = "exec"
    rdma = "rdma"
    file = "file"


class FileMigrationArgs(QapiModel):
    filename: str
    offset: Uint64


class InetSocketAddress(QapiModel):
    host: str
    port: str
    numeric: bool | None = None
    to: Uint16 | None = None
    ipv4: bool | None = None
    ipv6: bool | None = None
    keep_alive: bool | None = None
    mptcp: bool | None = None


class UnixSocketAddress(QapiModel):
    path: str
    abstract: bool | None = None
    tight: bool | None = None


class VsockSocketAddress(QapiModel):
    cid: str
    port: str


class FdSocketAddress(QapiModel):  # QEMU's String
    str_: str = Field(alias="str")


class SocketAddressType(enum.StrEnum):
    inet = "inet"
    unix = "unix"
    vsock = "vsock"
    fd = "fd"


class SocketAddress(QapiUnionModel):
    qapi_union = QapiUnion(
        "type",
        {
            "inet": InetSocketAddress,
            "unix": UnixSocketAddress,
            "vsock": VsockSocketAddress,
            "fd": FdSocketAddress,
        },
    )

    type: Annotated[SocketAddressType, Strict(False)]


class MigrationExecCommand(QapiModel):
    args: list[str]


class MigrationAddress(QapiUnionModel):
    """QEMU's MigrationAddress, a flat union on 'transport'. Every transport's members
    are checked as QEMU checks them, so a malformed address gets QEMU's text before the
    transport is refused; query-qmp-schema describes only 'file', the one migd takes."""

    qapi_union = QapiUnion(
        "transport",
        {
            "socket": SocketAddress,
            "exec": MigrationExecCommand,
            "rdma": InetSocketAddress,
            "file": FileMigrationArgs,
        },
        introspected=frozenset({"file"}),
    )

    transport: Annotated[Transport, Strict(False)]


class MigrationChannel(QapiModel):
    channel_type: Annotated[ChannelType, Strict(False)]
    addr: MigrationAddress


def resolve_target(
    uri: str | None, channels: list[MigrationChannel] | None, outgoing: bool = False
) -> Target:
    """QEMU 10's rules for `uri` versus `channels`, down to one file target: migrate's
    (qmp_migrate: one entry of each channel type, a 'cpr' one unused outside cpr-transfer
    mode) or migrate-incoming's (exactly one entry). An empty list is no list, as QAPI
    reads it."""
    if not channels:
        channels = None
    if (uri is None) == (channels is None):
        raise MigrationError("need either 'uri' or 'channels' argument")
    if uri is not None:
        return parse_uri(uri)
    assert channels is not None
    if outgoing:
        seen: set[ChannelType] = set()
        for entry in channels:
            if entry.channel_type in seen:
                raise MigrationError(
                    f"Channel list has more than one {entry.channel_type.value} entry"
                )
            seen.add(entry.channel_type)
    elif len(channels) != 1:
        raise MigrationError("Channel list must have only one entry, for type 'main'")
    channel = next((c for c in channels if c.channel_type is ChannelType.main), None)
    if channel is None:
        raise MigrationError("Channel list has no main entry")
    addr = channel.addr.variant
    if not isinstance(addr, FileMigrationArgs):
        raise NotSeekable("Migration requires seekable transport (e.g. file)")
    if not addr.filename:
        raise MigrationError("file address has no filename")
    return FileTarget(addr.filename, addr.offset)


class TargetArgs(QapiModel):
    """The address both directions take: a `uri` or a QAPI `channels` list."""

    uri: str | None = None
    channels: list[MigrationChannel] | None = None

    @field_validator("uri", "channels", mode="before")
    @classmethod
    def _null_is_a_wrong_type(cls, value: Any, info: ValidationInfo) -> Any:
        """QEMU's visitor: a member sent as null has the wrong type; absent is fine."""
        if value is None:
            raise PydanticCustomError("string_type" if info.field_name == "uri" else "list_type",
                                      "null")  # fmt: skip
        return value

    @field_validator("channels", mode="after")
    @classmethod
    def _addresses_as_qemu_reads_them(
        cls, value: list[MigrationChannel] | None
    ) -> list[MigrationChannel] | None:
        """Each address's transport members, checked before any rule on the list (QEMU's
        visitor reads the whole request before qmp_migrate looks at it)."""
        for i, channel in enumerate(value or ()):
            channel.addr.check_variant(("channels", i, "addr"))
        return value

    def target(self, outgoing: bool = False) -> Target:
        return resolve_target(self.uri, self.channels, outgoing)


async def client_target(ctx: Context, args: TargetArgs, outgoing: bool = False) -> Target:
    """The request's target, a file refused if the client sees its directory elsewhere
    than migd does (another mount namespace: it would never find the file)."""
    target = args.target(outgoing)
    if isinstance(target, FileTarget):
        await refuse_other_view(ctx, target.path)
    return target


class MigrateArgs(TargetArgs):
    detach: bool | None = None
    resume: bool | None = None
    checksums: bool = True


@command(
    "migrate",
    MigrateArgs,
    Empty,
    "Save every memory backend to a file in QEMU's mapped-ram layout: 'uri' "
    "'file:PATH[,offset=N]' (split at the first ',offset=' as QEMU does, N a size as "
    "QEMU reads it: 4096, 0x1000, 4k; bytes before N are kept) or 'channels' "
    "with one 'main' file address. Needs the mapped-ram capability. Returns at once; "
    "follow the job with query-migrate or MIGRATION events. 'detach' is accepted and "
    "ignored, as in QEMU; 'resume' (postcopy recovery) is refused. The file must be a "
    "regular file: a new one is created with mode 0600; an existing one must belong to "
    "migd's or the client's uid, be writable by no one else, have one link and not be a "
    "memory backend's file (the same rules hold for migrate-incoming's file). migd "
    "extension: 'checksums' (default true) records an xxh3-128 checksum of every MiB of "
    "memory in the file, after the vmdescription where QEMU does not read, so that a "
    "restore and 'migd verify' can prove the pages (docs/checksums.md).",
)
async def migrate(ctx: Context, args: MigrateArgs) -> Empty:
    args.target(outgoing=True)  # its errors first, as QEMU orders them
    if args.resume:
        # QEMU's text, always true here: migd has no postcopy, so nothing is ever paused.
        raise MigrationError("Cannot resume if there is no paused migration")
    target = await client_target(ctx, args, outgoing=True)
    job = await ctx.services.engine.start_save(target, ctx.session.peer_uid, args.checksums)
    record_job(ctx, job)
    return Empty()


class VerifyMode(enum.StrEnum):
    on = "on"
    off = "off"
    before_write = "before-write"


class ReadCached(enum.StrEnum):
    """x-read-cached: what a restore with direct-io does with pages the page cache holds."""

    auto = "auto"  # reads the runs the page cache mostly holds buffered, the rest O_DIRECT
    never = "never"  # reads everything O_DIRECT, as QEMU does


READ_CACHED_TEXT = (
    "migd extension: 'x-read-cached' for a restore with direct-io: 'auto' (default) "
    "reads each MiB that the page cache mostly holds (a file just saved without "
    "direct-io, or read recently) through a buffered fd, and the rest with O_DIRECT; "
    "'never' reads all of it with O_DIRECT. Without direct-io every read is buffered."
)


class MigrateIncomingArgs(TargetArgs):
    exit_on_error: bool | None = None
    skip_unmatched_blocks: bool = False
    verify: Annotated[VerifyMode, Strict(False)] = VerifyMode.on
    x_read_cached: Annotated[ReadCached, Strict(False)] = ReadCached.auto


@command(
    "migrate-incoming",
    MigrateIncomingArgs,
    Empty,
    "Restore memory backends from a mapped-ram save file (migd's or QEMU's): blocks are "
    "matched to backends by block name; pages absent from the file end up zero. Same "
    "'uri'/'channels' forms as migrate. Returns at once after the file's head and block "
    "list are checked. 'exit-on-error' is accepted and ignored (migd never exits). "
    "migd extension: 'skip-unmatched-blocks' (default false) restores only the blocks "
    "that have a backend and lists the others in query-migrate's 'x-skipped-blocks'. "
    "migd extension: 'verify' for a file with checksums: 'on' (default) checks each MiB "
    "as it lands and fails the restore on the first mismatch; 'before-write' first checks "
    "the whole file (one more read of it), so that a corrupt file changes no memory; "
    "'off' checks nothing. Files without checksums (QEMU's) restore unverified, as "
    f"query-migrate's 'x-checksums' says. {READ_CACHED_TEXT}",
)
async def migrate_incoming(ctx: Context, args: MigrateIncomingArgs) -> Empty:
    target = await client_target(ctx, args)
    job = await ctx.services.engine.start_restore(
        target,
        args.skip_unmatched_blocks,
        ctx.session.peer_uid,
        args.verify.value,
        read_cached=args.x_read_cached == ReadCached.auto,
    )
    record_job(ctx, job)
    return Empty()


# QEMU's MigrationStats: the job's snapshot, member for member (one declaration, in job.py).
_STATS_FIELDS: dict[str, Any] = {
    name: (kind, ...) for name, kind in typing.get_type_hints(RamStats).items()
}
MigrationStats = create_model("MigrationStats", __base__=QapiModel, **_STATS_FIELDS)


class ChecksumInfo(QapiModel):
    """A restore's checksums (migd extension): state "verifying-file" (verify
    before-write), "verifying", "verified", "mismatch" or "unverified" (with a 'note'
    saying why); units of 1 MiB checked so far, of 'units'."""

    state: str
    units: int
    units_done: int
    save_id: str | None = None
    note: str | None = None


class MigrationInfo(QapiModel):
    model_config = ConfigDict(populate_by_name=True, alias_generator=None)

    status: MigrationStatus | None = None
    total_time: int | None = Field(None, alias="total-time")
    expected_downtime: int | None = Field(None, alias="expected-downtime")
    downtime: int | None = None
    setup_time: int | None = Field(None, alias="setup-time")
    error_desc: str | None = Field(None, alias="error-desc")
    ram: MigrationStats | None = None
    x_skipped_blocks: list[str] | None = Field(None, alias="x-skipped-blocks")
    x_checksums: ChecksumInfo | None = Field(None, alias="x-checksums")


class MigrationEvent(QapiModel):
    status: MigrationStatus


event("MIGRATION", MigrationEvent)


class MigrationPassEvent(QapiModel):
    """QEMU's MIGRATION_PASS: the number of the RAM pass (its dirty-sync-count)."""

    pass_: int = Field(alias="pass")


# A save emits pass 1 as its one pass over memory starts and pass 2 at the final sync,
# with the 'events' capability on, as QEMU does for a stopped guest; a restore none.
event("MIGRATION_PASS", MigrationPassEvent)


def _members(stats: Any) -> dict[str, Any]:
    """A flat dataclass's members, not copied: query-migrate is what every management
    application polls, and dataclasses.asdict deep-copies (a third of its answer's
    CPU, 200 clients polling a save: README, "Control plane under load")."""
    return {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}


@command(
    "query-migrate",
    Empty,
    MigrationInfo,
    "The state of the last migration: {} before any; else 'status' (setup, active, "
    "completed, failed, cancelling, cancelled) and, for a save, QEMU's members for that "
    "status: none more in setup; 'total-time', 'setup-time' (ms), 'expected-downtime' "
    "(the downtime-limit, as QEMU reports it for a stopped guest) and 'ram' (QEMU's "
    "MigrationStats; 'dirty-sync-count' 1) while active or cancelling; 'total-time', "
    "'setup-time', 'downtime' (ms of the final stage: final sync, bitmaps, end section, "
    "fdatasync, measured as QEMU does from the switchover) and 'ram' ('dirty-sync-count' "
    "2) once completed; 'error-desc' once failed; nothing more once cancelled. A restore "
    "reports 'total-time', 'setup-time' and 'ram' in every status (a migd "
    "extension: QEMU's incoming side reports only its status), 'error-desc' on failure "
    "and 'x-skipped-blocks' and 'x-checksums' (the state of the checks of its checksums, "
    "docs/checksums.md). Answered from counters, never waiting for I/O.",
)
async def query_migrate(ctx: Context, args: Empty) -> MigrationInfo:
    stats = ctx.services.engine.query()
    if stats is None:
        return MigrationInfo()
    return MigrationInfo(
        status=stats.status,
        total_time=stats.total_time,
        expected_downtime=stats.expected_downtime,
        downtime=stats.downtime,
        setup_time=stats.setup_time,
        error_desc=stats.error_desc,
        ram=None if stats.ram is None else MigrationStats(**_members(stats.ram)),
        x_skipped_blocks=list(stats.skipped_blocks) or None,
        x_checksums=(
            None if stats.checksums is None else ChecksumInfo(**_members(stats.checksums))
        ),
    )


@command(
    "migrate_cancel",
    Empty,
    Empty,
    "Stop the running save or restore. Returns {} at once, with the status cancelling; it "
    "goes cancelled once the job's threads have stopped and its fds are closed. Returns {} "
    "even when nothing runs.",
)
async def migrate_cancel(ctx: Context, args: Empty) -> Empty:
    await ctx.services.engine.cancel()
    return Empty()
