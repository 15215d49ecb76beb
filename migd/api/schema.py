"""JSON Schemas of every command, generated from the models; never edited by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .commands import COMMANDS, Command

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"


def command_schema(cmd: Command) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "command": cmd.name,
        "description": cmd.description,
        "arguments": cmd.arguments.model_json_schema(by_alias=True),
        "returns": cmd.result_adapter.json_schema(by_alias=True, mode="serialization"),
    }


def render_all() -> dict[str, str]:
    """File name -> exact text, for every registered command."""
    return {
        f"{name}.json": json.dumps(command_schema(cmd), indent=2, sort_keys=True) + "\n"
        for name, cmd in sorted(COMMANDS.items())
    }


def drift(directory: Path = SCHEMA_DIR) -> list[str]:
    """Human-readable differences between the committed files and the models."""
    wanted = render_all()
    problems: list[str] = []
    present = {p.name for p in directory.glob("*.json")} if directory.is_dir() else set()
    for name, text in wanted.items():
        path = directory / name
        if name not in present:
            problems.append(f"{path}: missing")
        elif path.read_text() != text:
            problems.append(f"{path}: differs from the models")
    for name in sorted(present - set(wanted)):
        problems.append(f"{directory / name}: no such command")
    return problems


def write_all(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    wanted = render_all()
    for stale in directory.glob("*.json"):
        if stale.name not in wanted:
            stale.unlink()
    written = []
    for name, text in wanted.items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written
