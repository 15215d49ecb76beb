"""Where migd looks by default: its configuration file and its QMP socket. Apart from
config.py, whose pydantic models a client command does not need (migd/app/cli.py: a
client's start-up counts in a `migd vm restore`'s downtime)."""

from __future__ import annotations

import os

DEFAULT_CONFIG_PATH = "/etc/migd/migd.toml"


def default_socket_path() -> str:
    """/run/migd/migd.sock for root, $XDG_RUNTIME_DIR/migd/migd.sock otherwise."""
    if os.geteuid() == 0:
        return "/run/migd/migd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/migd-{os.geteuid()}"
    return os.path.join(runtime, "migd", "migd.sock")
