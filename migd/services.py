"""The daemon's long-lived services, as handlers see them through their Context."""

from __future__ import annotations

from dataclasses import dataclass

from .memory import MemoryRegistry
from .migration import MigrationEngine


@dataclass
class Services:
    memory: MemoryRegistry
    engine: MigrationEngine

    async def close(self) -> None:
        """Shutdown order: end the job (threads joined), then unmap the backends."""
        await self.engine.close()
        self.memory.close_all()
