"""The daemon's long-lived services, as handlers see them through their Context."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..migration.engine import MigrationEngine
from ..state.fdsets import FdStore
from ..state.memory import MemoryRegistry
from ..state.paths import PathPolicy

log = logging.getLogger(__name__)


@dataclass
class Services:
    memory: MemoryRegistry
    engine: MigrationEngine
    fdsets: FdStore
    paths: PathPolicy

    async def close(self) -> None:
        """Shutdown step 3 (app.daemon): end the job (threads joined, or given up on after
        the engine's STOP_TIMEOUT), unmap the backends, close the passed fds. A backend a
        job given up on still uses is not closed (MemoryRegistry.close_all)."""
        await self.engine.close()
        for backend in self.memory.close_all():
            log.warning(
                "memory backend %r: a stopping job's thread may still use it: its fd and "
                "mapping are left to the process's exit",
                backend.id,
            )
        self.fdsets.close_all()
