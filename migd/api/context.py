"""What a handler reaches: the Context of qmp.dispatch, over the services the api needs.

The daemon's Services (app.services) has these and more; naming them here as a Protocol
keeps the layers apart: qmp/ knows no services, api/ knows no daemon.
"""

from __future__ import annotations

from typing import Protocol

from ..io import blocking
from ..migration.engine import MigrationEngine
from ..qmp import dispatch
from ..state.fdsets import FdStore, is_fdset_path
from ..state.memory import MemoryRegistry
from ..state.paths import PathPolicy


class Services(Protocol):
    """The daemon's long-lived services, as the command handlers use them."""

    memory: MemoryRegistry
    engine: MigrationEngine
    fdsets: FdStore
    paths: PathPolicy


Context = dispatch.Context[Services]


async def refuse_other_view(ctx: Context, path: str | None) -> None:
    """Before a file named by path is opened or created: refused if the client sees its
    directory elsewhere than migd (state/peer_view.py). A passed fd is the client's own."""
    if path is None or is_fdset_path(path):
        return
    await blocking.to_thread(ctx.session.refuse_other_view, path)
