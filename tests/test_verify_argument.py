"""migrate-incoming's 'verify' (a migd extension) as a QMP client sends it: a JSON string."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import add_file_backend, enable_mapped_ram, fill_random, qmp_error, restore, save

MiB = 1 << 20


@pytest.mark.parametrize(
    ("verify", "state"),
    [("on", "verified"), ("off", "unverified"), ("before-write", "verified")],
)
async def test_verify_taken_as_a_json_string(qmp, tmp_path: Path, verify: str, state: str) -> None:
    mem = tmp_path / "mem"
    fill_random(mem, 4 * MiB)
    await enable_mapped_ram(qmp, channels=2)
    await add_file_backend(qmp, "ram0", mem, 4 * MiB, share=True)
    assert (await save(qmp, tmp_path / "save.img"))["status"] == "completed"
    info = await restore(qmp, tmp_path / "save.img", verify=verify)
    assert info["status"] == "completed", info
    assert info["x-checksums"]["state"] == state


async def test_verify_refuses_other_values(qmp, tmp_path: Path) -> None:
    await enable_mapped_ram(qmp, channels=2)
    text = await qmp_error(
        qmp, "migrate-incoming", {"uri": f"file:{tmp_path}/x", "verify": "maybe"}
    )
    assert text == "Parameter 'verify' does not accept value 'maybe'"
