"""The command table: every command module registers into the registry on import."""

from __future__ import annotations

from . import control_commands, fd_commands, memory_commands, migration_commands
from .registry import COMMANDS, Command, Context, dispatch

__all__ = [
    "COMMANDS",
    "Command",
    "Context",
    "control_commands",
    "dispatch",
    "fd_commands",
    "memory_commands",
    "migration_commands",
]
