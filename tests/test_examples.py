"""Every example runs end to end (at a small size)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_saves_and_restores_identical_memory():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--size-mib", "32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restored memory is identical to the saved memory" in result.stdout
    assert "GiB/s" in result.stdout
