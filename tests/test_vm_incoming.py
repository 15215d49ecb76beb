"""`migd vm restore` into a QEMU whose one incoming migration is spoken for: started with
`-incoming URI` (listening, not `defer`), or after an earlier migrate-incoming that
failed (a failed restore's). QEMU takes one migrate-incoming per process; the restore
must say so before it writes the guest's RAM (red-team, session 8a). Real QEMU
processes, a real migd daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import DaemonProcess, fill_random
from .qemu_vm import QemuVM, requires_qemu
from .test_vm import INCOMING, SIZE, qemu_args, saved_image, status, vm_cli

pytestmark = requires_qemu


@pytest.mark.parametrize("how", ["-incoming unix:", "an earlier load failed"])
async def test_a_qemu_whose_incoming_migration_was_started_is_refused_before_the_ram(
    daemon: DaemonProcess, setup: dict[str, Path], how: str
) -> None:
    """Before: the RAM landed (minutes for a large guest, the new QEMU's memory files
    overwritten), then the refusal blamed "another client of it ... during the restore"
    (a listener of QEMU's own command line) or said QEMU "could not load the device
    state ... (often a device the saved VM had that this QEMU lacks)" ("The incoming
    migration has already been started")."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    await saved_image(daemon, setup, "--quit")
    fill_random(ram, SIZE, seed=81)
    before = ram.read_bytes()
    extra = ("-incoming", f"unix:{d}/in.sock") if how == "-incoming unix:" else INCOMING
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=extra), d, name="b") as qemu:
        if how == "an earlier load failed":
            (d / "junk").write_bytes(b"not a migration stream")
            uri = f"file:{d}/junk"
            await qemu.cmd("migrate-incoming", {"uri": uri, "exit-on-error": False})
            assert (await qemu.wait_migration())["status"] == "failed"
        result = vm_cli(daemon, d / "b-cli.sock", "restore", str(image), check=False)
        assert result.returncode == 1, result
        assert "incoming migration was already started" in result.stderr, result.stderr
        assert "nothing was written" in result.stderr
        assert ram.read_bytes() == before
        assert await status(qemu) == "inmigrate"
