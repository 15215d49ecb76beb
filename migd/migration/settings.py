"""Migration capabilities and parameters, declared once: QEMU 10's full sets, in QEMU's
order, with their QAPI types, defaults, QEMU's own checks and what migd refuses.

The QMP models (api/migration.py, and through them query-qmp-schema), the [capabilities]
and [parameters] tables of the configuration (app/config.py) and the client's options
(app/cli.py) are all built from these; the engine holds one frozen instance of each and
replaces it on every change. Field names are the Python spelling of the wire names
('mapped_ram' for 'mapped-ram').

A change is checked against the resulting set, as QEMU checks it (migrate_caps_check and
migrate_params_check in QEMU's migration/options.c): first QEMU's own checks in QEMU's
order with QEMU's texts, then what migd cannot do ("migd does not implement ..."). A
refused change changes nothing.

Parameters that only shape a live migration of a running guest (downtime-limit,
announce-*, cpu-throttle-*, xbzrle-cache-size, the postcopy and switchover bandwidths,
x-checkpoint-delay, the dirty limits, compression levels while compression is none, the
TLS host name and authorization without TLS credentials) are accepted, stored and
reported with no effect on migd's file save, just as they have none in QEMU for a
stopped guest's file migration.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import typing
from typing import Annotated, Any

from pydantic import Strict

from ..errors import MigrationError
from ..limits import CHANNELS_MAX, CHANNELS_MIN
from ..qapi import QapiStruct, Size, StrOrNull, Uint8, Uint32, Uint64

MAX_DOWNTIME_MS = 2000 * 1000  # QEMU's MAX_MIGRATE_DOWNTIME
TARGET_PAGE_SIZE = 4096  # x86's, what xbzrle-cache-size is checked against


def wire_name(name: str) -> str:
    return name.replace("_", "-")


class SettingError(MigrationError):
    """A capability or parameter change refused; `member` is the wire name it is about,
    if one (the configuration file names its key with it)."""

    def __init__(self, member: str | None, desc: str) -> None:
        super().__init__(desc)
        self.member = member


# -- capabilities ------------------------------------------------------------------------

REFUSED = "refused"  # field metadata: why migd does not implement a capability


def _refused(why: str) -> Any:
    return dataclasses.field(default=False, metadata={REFUSED: why})


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """QEMU 10's MigrationCapability, in its order, all off by default as in QEMU. migd
    does multifd, mapped-ram and events; turning on any other is refused, with why."""

    xbzrle: bool = _refused("it re-sends the changed pages of a running guest as deltas")
    rdma_pin_all: bool = _refused("it is for RDMA transport; migd writes files")
    auto_converge: bool = _refused("it throttles a running guest's vCPUs; migd has none")
    zero_blocks: bool = _refused("it is for block migration; migd saves memory only")
    events: bool = False
    postcopy_ram: bool = _refused(
        "postcopy starts the guest on the destination before its memory has arrived"
    )
    x_colo: bool = _refused("COLO keeps a running secondary VM in step; migd has no VM")
    release_ram: bool = _refused("it frees source memory during postcopy; migd has none")
    return_path: bool = _refused("it needs a channel back from the destination")
    pause_before_switchover: bool = _refused(
        "it pauses a live migration before device state moves; migd has no devices"
    )
    multifd: bool = False
    dirty_bitmaps: bool = _refused("it migrates block dirty bitmaps; migd saves memory only")
    postcopy_blocktime: bool = _refused("it measures postcopy stalls; migd has no postcopy")
    late_block_activate: bool = _refused("it delays block device activation; migd has none")
    x_ignore_shared: bool = _refused("migd saves every memory backend, shared ones too")
    validate_uuid: bool = _refused("it compares two VMs' UUIDs; migd has no VM")
    background_snapshot: bool = _refused(
        "it snapshots a running guest while it writes; migd saves memory in one pass"
    )
    zero_copy_send: bool = _refused("it sends pages over a network socket; migd writes files")
    postcopy_preempt: bool = _refused("it adds a postcopy channel; migd has no postcopy")
    switchover_ack: bool = _refused("it waits for a destination's acknowledgement")
    dirty_limit: bool = _refused("it limits a running guest's dirty page rate")
    mapped_ram: bool = False


# What QEMU 10's schema marks 'deprecated' among the names migd shares with it (its
# 'unstable' ones are the x- names, which query-qmp-schema marks by their prefix).
DEPRECATED = frozenset({"zero-blocks"})

# Wire names, in QEMU's order; each member's name is its Capabilities field.
# Built from the table (one declaration); mypy cannot see members of a functional enum.
MigrationCapability = enum.StrEnum(  # type: ignore[misc]
    "MigrationCapability",
    [(f.name, wire_name(f.name)) for f in dataclasses.fields(Capabilities)],
)

# QEMU's check_caps_background_snapshot, in its order.
_BACKGROUND_SNAPSHOT_CONFLICTS = (
    "postcopy_ram",
    "dirty_bitmaps",
    "postcopy_blocktime",
    "late_block_activate",
    "return_path",
    "multifd",
    "pause_before_switchover",
    "auto_converge",
    "release_ram",
    "rdma_pin_all",
    "xbzrle",
    "x_colo",
    "validate_uuid",
    "zero_copy_send",
)


def qemu_capability_refusal(c: Capabilities, p: Parameters) -> str | None:
    """QEMU 10's migrate_caps_check of the resulting set, its texts in its order. migd has
    no KVM, so dirty-limit always fails as in a QEMU without one."""
    if c.postcopy_ram:
        if c.x_ignore_shared:
            return "Postcopy is not compatible with ignore-shared"
        if c.multifd:
            return "Postcopy is not yet compatible with multifd"
    if c.background_snapshot:
        for name in _BACKGROUND_SNAPSHOT_CONFLICTS:
            if getattr(c, name):
                return f"Background-snapshot is not compatible with {wire_name(name)}"
    compressed = c.xbzrle or p.multifd_compression != MultiFDCompression.none
    if c.zero_copy_send and (not c.multifd or compressed or p.tls_creds):
        return "Zero copy only available for non-compressed non-TLS multifd migration"
    if c.postcopy_preempt and not c.postcopy_ram:
        return "Postcopy preempt requires postcopy-ram"
    if c.switchover_ack and not c.return_path:
        return "Capability 'switchover-ack' requires capability 'return-path'"
    if c.dirty_limit:
        if c.auto_converge:
            return "dirty-limit conflicts with auto-converge either of then available currently"
        return "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set"
    if c.multifd and c.xbzrle:
        return "Multifd is not compatible with xbzrle"
    if c.mapped_ram:
        if c.xbzrle:
            return "Mapped-ram migration is incompatible with xbzrle"
        if c.postcopy_ram:
            return "Mapped-ram migration is incompatible with postcopy"
    return None


def check_capabilities(c: Capabilities, p: Parameters) -> None:
    """Refuse a resulting capability set: QEMU's checks, then what migd does not do."""
    text = qemu_capability_refusal(c, p)
    if text is not None:
        raise SettingError(None, text)
    for f in dataclasses.fields(Capabilities):
        if getattr(c, f.name) and REFUSED in f.metadata:
            raise SettingError(
                wire_name(f.name),
                f"migd does not implement the '{wire_name(f.name)}' capability: "
                f"{f.metadata[REFUSED]}",
            )


def apply_capabilities(c: Capabilities, changes: dict[str, bool], p: Parameters) -> Capabilities:
    """The capabilities after `changes` (field name -> state), checked as a whole."""
    new = dataclasses.replace(c, **changes)
    check_capabilities(new, p)
    return new


# -- parameters --------------------------------------------------------------------------


class MultiFDCompression(enum.StrEnum):
    # QEMU 10's values in a build without QPL, UADK or QATzip (Debian's)
    none = "none"
    zlib = "zlib"
    zstd = "zstd"


class MigMode(enum.StrEnum):
    normal = "normal"
    cpr_reboot = "cpr-reboot"
    cpr_transfer = "cpr-transfer"


class ZeroPageDetection(enum.StrEnum):
    none = "none"
    legacy = "legacy"  # QEMU's main-thread scan; for migd the same file as multifd
    multifd = "multifd"


class BitmapMigrationBitmapAliasTransform(QapiStruct):
    persistent: bool | None = None


class BitmapMigrationBitmapAlias(QapiStruct):
    name: str
    alias: str
    transform: BitmapMigrationBitmapAliasTransform | None = None


class BitmapMigrationNodeAlias(QapiStruct):
    node_name: str
    alias: str
    bitmaps: list[BitmapMigrationBitmapAlias]


@dataclasses.dataclass(frozen=True)
class SetAs:
    """migrate-set-parameters takes this type for the member, not the one reported (QEMU's
    MigrateSetParameters takes the TLS members as StrOrNull, null meaning "")."""

    kind: Any


TlsString = Annotated[str, SetAs(StrOrNull)]
# Absent from query-migrate-parameters until set; a JSON null is no list.
BitmapMapping = Annotated[
    list[BitmapMigrationNodeAlias] | None, SetAs(list[BitmapMigrationNodeAlias])
]
# A JSON string names an enum's member.
Compression = Annotated[MultiFDCompression, Strict(False)]
Mode = Annotated[MigMode, Strict(False)]
ZeroDetect = Annotated[ZeroPageDetection, Strict(False)]


@dataclasses.dataclass(frozen=True)
class Parameters:
    """QEMU 10's MigrationParameters, in its order, with QEMU's defaults except
    max-bandwidth (0 = unlimited: QEMU's 128 MiB/s would slow a save 10x)."""

    announce_initial: Size = 50
    announce_max: Size = 550
    announce_rounds: Size = 5
    announce_step: Size = 100
    throttle_trigger_threshold: Uint8 = 50
    cpu_throttle_initial: Uint8 = 20
    cpu_throttle_increment: Uint8 = 10
    cpu_throttle_tailslow: bool = False
    tls_creds: TlsString = ""
    tls_hostname: TlsString = ""
    tls_authz: TlsString = ""
    max_bandwidth: Size = 0  # bytes/s; 0 = unlimited
    avail_switchover_bandwidth: Size = 0
    downtime_limit: Uint64 = 300
    x_checkpoint_delay: Uint32 = 20000
    multifd_channels: Uint8 = 2
    xbzrle_cache_size: Size = 64 << 20
    max_postcopy_bandwidth: Size = 0
    max_cpu_throttle: Uint8 = 99
    multifd_compression: Compression = MultiFDCompression.none
    multifd_zlib_level: Uint8 = 1
    multifd_qatzip_level: Uint8 = 1
    multifd_zstd_level: Uint8 = 1
    block_bitmap_mapping: BitmapMapping = None
    x_vcpu_dirty_limit_period: Uint64 = 1000
    vcpu_dirty_limit: Uint64 = 1
    mode: Mode = MigMode.normal
    zero_page_detection: ZeroDetect = ZeroPageDetection.multifd
    direct_io: bool = False


def _expects(name: str, what: str) -> SettingError:
    """QEMU's QERR_INVALID_PARAMETER_VALUE, naming the member as QEMU's check does."""
    return SettingError(wire_name(name), f"Parameter '{name}' expects {what}")


def _qemu_parameter_check(p: Parameters, c: Capabilities) -> None:
    """QEMU 10's migrate_params_check of the resulting set, its texts in its order."""
    if not 1 <= p.throttle_trigger_threshold <= 100:
        raise _expects("throttle_trigger_threshold", "an integer in the range of 1 to 100")
    if not 1 <= p.cpu_throttle_initial <= 99:
        raise _expects("cpu_throttle_initial", "an integer in the range of 1 to 99")
    if not 1 <= p.cpu_throttle_increment <= 99:
        raise _expects("cpu_throttle_increment", "an integer in the range of 1 to 99")
    if p.downtime_limit > MAX_DOWNTIME_MS:
        raise _expects("downtime_limit", "an integer in the range of 0 to (2000 * 1000) ms")
    if not CHANNELS_MIN <= p.multifd_channels <= CHANNELS_MAX:
        raise _expects("multifd_channels", f"a value between {CHANNELS_MIN} and {CHANNELS_MAX}")
    if p.multifd_zlib_level > 9:
        raise _expects("multifd_zlib_level", "a value between 0 and 9")
    if not 1 <= p.multifd_qatzip_level <= 9:
        raise _expects("multifd_qatzip_level", "a value between 1 and 9")
    if p.multifd_zstd_level > 20:
        raise _expects("multifd_zstd_level", "a value between 0 and 20")
    size = p.xbzrle_cache_size
    if size < TARGET_PAGE_SIZE or size & (size - 1):
        raise _expects("xbzrle_cache_size", "a power of two no less than the target page size")
    if not p.cpu_throttle_initial <= p.max_cpu_throttle <= 99:
        raise _expects("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")
    if p.announce_initial > 100000:
        raise _expects("announce_initial", "a value between 0 and 100000")
    if p.announce_max > 100000:
        raise _expects("announce_max", "a value between 0 and 100000")
    if p.announce_rounds > 1000:
        raise _expects("announce_rounds", "a value between 0 and 1000")
    if not 1 <= p.announce_step <= 10000:
        raise _expects("announce_step", "a value between 0 and 10000")  # sic: 0 is refused
    # QEMU checks this against the current settings, not the resulting ones, so it
    # takes one compression or TLS change and then refuses every later one: migd
    # checks the resulting set (an intended difference).
    compressed = p.multifd_compression != MultiFDCompression.none
    if c.mapped_ram and (compressed or p.tls_creds):
        raise SettingError(
            "multifd-compression" if compressed else "tls-creds",
            "Mapped-ram only available for non-compressed non-TLS multifd migration",
        )
    if not 1 <= p.x_vcpu_dirty_limit_period <= 1000:
        raise _expects("x-vcpu-dirty-limit-period", "a value between 1 and 1000")
    if p.vcpu_dirty_limit < 1:
        raise SettingError(
            "vcpu-dirty-limit", "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s"
        )
    if p.direct_io and not hasattr(os, "O_DIRECT"):
        raise SettingError("direct-io", "No build-time support for direct-io")


def _not_implemented(member: str, what: str) -> SettingError:
    return SettingError(member, f"migd does not implement {what}")


def _migd_parameter_check(p: Parameters) -> None:
    """Values QEMU takes that migd cannot honour (QEMU's checks passed)."""
    if p.multifd_compression != MultiFDCompression.none:
        raise _not_implemented(
            "multifd-compression",
            f"multifd-compression '{p.multifd_compression}': it writes pages as they are, "
            "the mapped-ram layout has no compressed form",
        )
    if p.tls_creds:
        raise _not_implemented(
            "tls-creds", "TLS ('tls-creds'): it writes local files, no network channel"
        )
    if p.mode != MigMode.normal:
        raise _not_implemented(
            "mode", f"migration mode '{p.mode}': it saves memory, not a whole VM for CPR"
        )
    if p.block_bitmap_mapping:
        raise _not_implemented(
            "block-bitmap-mapping",
            "'block-bitmap-mapping': it saves memory, not block devices' dirty bitmaps",
        )


def check_parameters(p: Parameters, c: Capabilities) -> None:
    _qemu_parameter_check(p, c)
    _migd_parameter_check(p)


def apply_parameters(p: Parameters, changes: dict[str, Any], c: Capabilities) -> Parameters:
    """The parameters after `changes` (field name -> value), checked as a whole. A TLS
    member set to null (StrOrNull) becomes "", as in QEMU."""
    tls = {name: "" for name in ("tls_creds", "tls_hostname", "tls_authz")}
    changes = {
        name: tls[name] if value is None and name in tls else value
        for name, value in changes.items()
    }
    new = dataclasses.replace(p, **changes)
    check_parameters(new, c)
    return new


# -- types for the models ----------------------------------------------------------------


def field_types(settings: type[Capabilities] | type[Parameters]) -> dict[str, Any]:
    """name -> annotated type of each setting, in declaration order (for models)."""
    hints = typing.get_type_hints(settings, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(settings)}


def set_types(settings: type[Capabilities] | type[Parameters]) -> dict[str, Any]:
    """name -> the type a set command takes for it (SetAs where it differs)."""
    out = {}
    for name, kind in field_types(settings).items():
        metadata = typing.get_args(kind)[1:] if typing.get_origin(kind) is Annotated else ()
        set_as = next((m.kind for m in metadata if isinstance(m, SetAs)), None)
        out[name] = kind if set_as is None else set_as
    return out


def plain_types(settings: type[Capabilities] | type[Parameters]) -> dict[str, Any]:
    """name -> type without its constraints (what a reply reports, unchecked)."""
    return {
        name: typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind
        for name, kind in field_types(settings).items()
    }
