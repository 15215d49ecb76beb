"""The committed JSON Schemas match the pydantic models exactly."""

from __future__ import annotations

import json
import subprocess
import sys

from migd.api import schema
from migd.api.commands import COMMANDS


def test_committed_schemas_match_the_models():
    assert schema.drift() == [], "run 'migd schema --write' and commit schemas/"


def test_every_command_has_a_schema_with_arguments_and_returns():
    for name in COMMANDS:
        data = json.loads((schema.SCHEMA_DIR / f"{name}.json").read_text())
        assert data["command"] == name
        assert data["arguments"]["type"] == "object"
        assert "returns" in data


def test_schema_check_fails_when_a_file_drifts(tmp_path):
    schema.write_all(tmp_path)
    victim = next(tmp_path.glob("*.json"))
    victim.write_text(victim.read_text().replace('"object"', '"array"', 1))
    result = subprocess.run(
        [sys.executable, "-m", "migd", "schema", "--check", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert victim.name in result.stderr
    (tmp_path / "bogus.json").write_text("{}")
    assert "no such command" in schema.drift(tmp_path)[-1]
