"""The command registry: name -> (argument model, result type, handler), and dispatch.

Adding a command is one argument model, one handler and one `@command` line in one of
the migd.api modules. Handlers are thin: validated arguments in, an engine call, a
result out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from pydantic import TypeAdapter

from .. import QEMU_VERSION
from ..errors import CommandNotFound, MigdError
from .validation import QapiModel, validate
from .wire import Request, error_reply, return_reply

log = logging.getLogger(__name__)


class Session(Protocol):
    """What a handler may ask of the connection that sent the command."""

    negotiated: bool
    # What the api layer ties to the connection (x-migd-session-scope), None until then.
    scope: Any

    @property
    def peer_uid(self) -> int | None:
        """The client's uid (SO_PEERCRED), None if unknown."""

    def take_fd(self) -> int: ...

    def refuse_other_view(self, path: str) -> None:
        """Refuse `path` if the client sees its directory elsewhere than migd (another
        mount namespace); blocking."""


ServicesT = TypeVar("ServicesT")


@dataclass
class Context(Generic[ServicesT]):
    """Everything a handler can reach: the connection and the daemon's services.

    Generic over the services, so that this layer names no type of the layers that
    define them: the api layer says what its handlers need (api.context), the daemon
    hands in what it has (app.services).
    """

    session: Session
    services: ServicesT


Handler = Callable[[Context[Any], Any], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    name: str
    arguments: type[QapiModel]
    result: Any
    handler: Handler
    description: str
    result_adapter: TypeAdapter[Any] = field(compare=False, repr=False)


COMMANDS: dict[str, Command] = {}
# Events migd sends: name -> model of their 'data' (what query-qmp-schema describes).
EVENTS: dict[str, type[QapiModel]] = {}


def command(
    name: str, arguments: type[QapiModel], result: Any, description: str
) -> Callable[[Handler], Handler]:
    """Register a handler under its QMP name."""

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, arguments, result, handler, description, TypeAdapter(result))
        return handler

    return register


def event(name: str, data: type[QapiModel]) -> None:
    """Declare an event and the shape of its data."""
    EVENTS[name] = data


async def dispatch(ctx: Context[Any], req: Request) -> dict[str, Any]:
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
