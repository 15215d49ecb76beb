"""The command table: every command module registers into the registry on import.

Adding a command module means adding it to the import line below (the table entry)."""

from __future__ import annotations

from ..qmp.dispatch import COMMANDS, Command, Context, dispatch
from . import control, fds, introspection, jobs, memory, migration, scope

__all__ = [
    "COMMANDS",
    "Command",
    "Context",
    "control",
    "dispatch",
    "fds",
    "introspection",
    "jobs",
    "memory",
    "migration",
    "scope",
]
