"""The command table: name -> (argument model, result type, handler), and dispatch.

Adding a command is one argument model, one handler and one `@command` line. Handlers
are thin: validated arguments in, a call into the engine, a result out.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from pydantic import Strict, TypeAdapter

from . import __version__
from .errors import CommandNotFound, MigdError
from .qmp import Request, error_reply, return_reply
from .validation import QapiModel, validate

log = logging.getLogger(__name__)


class Session(Protocol):
    """What a handler may ask of the connection that sent the command."""

    negotiated: bool

    def take_fd(self) -> int: ...


@dataclass
class Context:
    """Everything a handler can reach: the connection and the daemon's services."""

    session: Session
    services: Any = None


Handler = Callable[[Context, Any], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    name: str
    arguments: type[QapiModel]
    result: Any
    handler: Handler
    description: str
    result_adapter: TypeAdapter[Any] = field(compare=False, repr=False, default=None)  # type: ignore[assignment]


COMMANDS: dict[str, Command] = {}


def command(
    name: str, arguments: type[QapiModel], result: Any, description: str
) -> Callable[[Handler], Handler]:
    """Register a handler under its QMP name."""

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, arguments, result, handler, description, TypeAdapter(result))
        return handler

    return register


async def dispatch(ctx: Context, req: Request) -> dict[str, Any]:
    """Run one request; every failure becomes an error reply, never an exception."""
    try:
        if not ctx.session.negotiated and req.execute != "qmp_capabilities":
            raise CommandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'")
        cmd = COMMANDS.get(req.execute)
        if cmd is None:
            raise CommandNotFound(f"The command {req.execute} has not been found")
        args = validate(cmd.arguments, req.arguments)
        value = await cmd.handler(ctx, args)
        wire = cmd.result_adapter.dump_python(value, mode="json", by_alias=True, exclude_none=True)
        return return_reply(wire, req)
    except MigdError as exc:
        return error_reply(exc, req)
    except Exception as exc:  # a bug must not kill the session
        log.exception("command %s failed", req.execute)
        return error_reply(exc, req)


def version_numbers() -> tuple[int, int, int]:
    major, minor, micro = (int(x) for x in __version__.split(".")[:3])
    return major, minor, micro


# --- control commands ---------------------------------------------------------------


class Empty(QapiModel):
    """No arguments / an empty object result."""


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
    "Return migd's version. As in QEMU's reply, 'qemu' carries the numbers (here migd's "
    "own) and 'package' names the program.",
)
async def query_version(ctx: Context, args: Empty) -> VersionInfo:
    return version_info()


class CommandInfo(QapiModel):
    name: str


@command("query-commands", Empty, list[CommandInfo], "List the commands migd accepts.")
async def query_commands(ctx: Context, args: Empty) -> list[CommandInfo]:
    return [CommandInfo(name=name) for name in sorted(COMMANDS)]
