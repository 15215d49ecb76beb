"""QEMU's qmp-shell (shipped by qemu.qmp) works against a real migd daemon: it negotiates,
sends commands typed in its own `name key=value` syntax and prints migd's replies."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("qemu.qmp.qmp_shell") is None,
    reason="qemu.qmp's qmp-shell is not installed",
)

PROMPT = "(QEMU) "


def _shell(socket_path: str, lines: list[str]) -> tuple[str, list[Any]]:
    """Run qmp-shell with `lines` on stdin -> (its banner, one JSON reply per line)."""
    result = subprocess.run(
        [sys.executable, "-m", "qemu.qmp.qmp_shell", socket_path],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    banner, *replies = result.stdout.split(PROMPT)
    assert replies[-1].strip() == "", result.stdout  # the prompt left at end of input
    return banner, [json.loads(reply) for reply in replies[:-1]]


def test_qmp_shell_runs_commands_against_migd(daemon):
    banner, replies = _shell(
        str(daemon.socket_path),
        [
            "query-version",
            "object-add qom-type=memory-backend-ram id=r0 size=8192",
            "query-memdev",
            "object-del id=nope",
        ],
    )
    version = replies[0]["return"]
    assert f"Connected to QEMU {version['qemu']['major']}.{version['qemu']['minor']}" in banner
    assert version["package"].startswith("migd ")
    assert replies[1] == {"return": {}}
    [memdev] = replies[2]["return"]
    assert (memdev["id"], memdev["size"], memdev["qom-type"]) == ("r0", 8192, "memory-backend-ram")
    assert replies[3] == {"error": {"class": "GenericError", "desc": "object 'nope' not found"}}
