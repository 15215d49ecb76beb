"""The daemon's long-lived services, as handlers see them through their Context."""

from __future__ import annotations

from dataclasses import dataclass

from ..migration.engine import MigrationEngine
from ..state.fdsets import FdStore
from ..state.memory import MemoryRegistry
from ..state.paths import PathPolicy


@dataclass
class Services:
    memory: MemoryRegistry
    engine: MigrationEngine
    fdsets: FdStore
    paths: PathPolicy

    async def close(self) -> None:
        """Shutdown step 3 (app.daemon): end the job (threads joined, or given up on after
        the engine's STOP_TIMEOUT), unmap the backends, close the passed fds."""
        await self.engine.close()
        self.memory.close_all()
        self.fdsets.close_all()
