"""What a handler reaches: the Context of qmp.dispatch, over the services the api needs.

The daemon's Services (app.services) has these and more; naming them here as a Protocol
keeps the layers apart: qmp/ knows no services, api/ knows no daemon.
"""

from __future__ import annotations

from typing import Protocol

from ..migration.engine import MigrationEngine
from ..qmp import dispatch
from ..state.fdsets import FdStore
from ..state.memory import MemoryRegistry
from ..state.paths import PathPolicy


class Services(Protocol):
    """The daemon's long-lived services, as the command handlers use them."""

    memory: MemoryRegistry
    engine: MigrationEngine
    fdsets: FdStore
    paths: PathPolicy


Context = dispatch.Context[Services]
