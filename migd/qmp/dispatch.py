"""The command registry: name -> (argument model, result type, handler), and dispatch.

Adding a command is one argument model, one handler and one `@command` line in one of
the migd.api modules. Handlers are thin: validated arguments in, an engine call, a
result out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import TypeAdapter

from .. import QEMU_VERSION
from ..errors import CommandNotFound, MigdError
from .validation import QapiModel, validate
from .wire import Request, error_reply, return_reply

if TYPE_CHECKING:
    from ..app.services import Services

log = logging.getLogger(__name__)


class Session(Protocol):
    """What a handler may ask of the connection that sent the command."""

    negotiated: bool
    peer_uid: int | None  # the client's uid (SO_PEERCRED), None if unknown

    def take_fd(self) -> int: ...


@dataclass
class Context:
    """Everything a handler can reach: the connection and the daemon's services."""

    session: Session
    services: Services


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
    """The `qemu` triple of the greeting and query-version: the QEMU release whose
    interface migd implements (migd's own version goes in `package`)."""
    return QEMU_VERSION
