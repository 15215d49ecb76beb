"""Migration capabilities and parameters, declared once: names, types, ranges, defaults.

The QMP models (api/migration.py), the [capabilities] and [parameters] tables of the
configuration (app/config.py) and the client's options (app/cli.py) are all built from
these; the engine holds one frozen instance of each and replaces it on every change.
Field names are the Python spelling of the wire names ('mapped_ram' for 'mapped-ram').
"""

import dataclasses
import enum
import typing
from typing import Annotated, Any

from pydantic import Field, Strict

from ..qapi import UINT8_T, CheckedAs, Uint64

CHANNELS_MIN = 1
CHANNELS_MAX = 255  # QEMU's range for multifd-channels


# Wire names; each member's name is its Capabilities field.
class MigrationCapability(enum.StrEnum):
    multifd = "multifd"
    mapped_ram = "mapped-ram"
    events = "events"


class ZeroPageDetection(enum.StrEnum):
    none = "none"
    multifd = "multifd"


# QAPI uint8 first, then QEMU's own check (named 'multifd_channels' in its text).
Channels = Annotated[
    int, UINT8_T, Field(ge=CHANNELS_MIN, le=CHANNELS_MAX), CheckedAs("multifd_channels")
]
Bandwidth = Uint64  # bytes/s; 0 = unlimited
ZeroDetect = Annotated[ZeroPageDetection, Strict(False)]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    multifd: bool = False
    mapped_ram: bool = False
    events: bool = False


@dataclasses.dataclass(frozen=True)
class Parameters:
    multifd_channels: Channels = 2
    direct_io: bool = False
    max_bandwidth: Bandwidth = 0  # QEMU's 128 MiB/s default would slow saves 10x
    zero_page_detection: ZeroDetect = ZeroPageDetection.multifd


def field_types(settings: type[Capabilities] | type[Parameters]) -> dict[str, Any]:
    """name -> annotated type of each setting, in declaration order (for models)."""
    hints = typing.get_type_hints(settings, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(settings)}


def plain_types(settings: type[Capabilities] | type[Parameters]) -> dict[str, Any]:
    """name -> type without its constraints (what a reply reports, unchecked)."""
    return {
        name: typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind
        for name, kind in field_types(settings).items()
    }


def channels_in_range(value: int) -> bool:
    return CHANNELS_MIN <= value <= CHANNELS_MAX
