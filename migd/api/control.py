"""Control commands: negotiation, version, the command list."""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import Strict

from .. import __version__
from ..errors import CommandNotFound, MigdError
from ..qmp.dispatch import COMMANDS, command, version_numbers
from ..qmp.validation import Empty, QapiModel
from .context import Context


class QMPCapability(enum.StrEnum):
    oob = "oob"


class QmpCapabilitiesArgs(QapiModel):
    enable: list[Annotated[QMPCapability, Strict(False)]] | None = None


@command(
    "qmp_capabilities",
    QmpCapabilitiesArgs,
    Empty,
    "Leave capabilities negotiation mode; until then only this command is accepted. "
    "migd offers no optional capabilities.",
)
async def qmp_capabilities(ctx: Context, args: QmpCapabilitiesArgs) -> Empty:
    if ctx.session.negotiated:
        raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
    for cap in args.enable or []:
        raise MigdError(f"Capability {cap.value} not available")
    ctx.session.negotiated = True
    return Empty()


class VersionTriple(QapiModel):
    major: int
    minor: int
    micro: int


class VersionInfo(QapiModel):
    qemu: VersionTriple
    package: str


def version_info() -> VersionInfo:
    major, minor, micro = version_numbers()
    return VersionInfo(
        qemu=VersionTriple(major=major, minor=minor, micro=micro), package=f"migd {__version__}"
    )


@command(
    "query-version",
    Empty,
    VersionInfo,
    "Return the version. 'qemu' is the QEMU release whose migration interface migd "
    "implements (commands, replies, error texts and mapped-ram files), so that clients "
    "gating features on QEMU's version (mapped-ram, direct-io: >= 9.1) see what migd "
    "does; 'package' names migd and its own version, e.g. 'migd 0.1.0'.",
)
async def query_version(ctx: Context, args: Empty) -> VersionInfo:
    return version_info()


class CommandInfo(QapiModel):
    name: str


@command("query-commands", Empty, list[CommandInfo], "List the commands migd accepts.")
async def query_commands(ctx: Context, args: Empty) -> list[CommandInfo]:
    return [CommandInfo(name=name) for name in sorted(COMMANDS)]
