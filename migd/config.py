"""Daemon configuration: socket, permissions and defaults, from the command line (TOML later)."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field


def default_socket_path() -> str:
    """/run/migd/migd.sock for root, $XDG_RUNTIME_DIR/migd/migd.sock otherwise."""
    if os.geteuid() == 0:
        return "/run/migd/migd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/migd-{os.geteuid()}"
    return os.path.join(runtime, "migd", "migd.sock")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    socket_path: str = Field(default_factory=default_socket_path)
    socket_mode: int = Field(0o600, ge=0, le=0o777)
    log_level: str = "info"
