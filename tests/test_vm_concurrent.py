"""`migd vm save` / `vm restore` and the other clients of the same QEMU (QEMU 10 serves
several QMP monitors): a `cont`, `migrate-incoming` or `quit` sent by another client while
a restore's RAM lands, and a second `vm save` of the same VM through another QMP socket.
Real QEMU processes, a real migd daemon."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from migd.tools import vm, vm_image
from migd.tools.client import ClientError

from .conftest import DaemonProcess, fill_random
from .qemu_vm import QemuVM, requires_qemu
from .test_vm import INCOMING, SIZE, _options, qemu_args, status, vm_cli

pytestmark = requires_qemu


@pytest.fixture
def setup(short_dir: Path, shm: Path, daemon: DaemonProcess) -> dict[str, Path]:
    return {"dir": short_dir, "ram": shm / "guest-ram", "image": short_dir / "vm.img"}


async def _saved(daemon: DaemonProcess, setup: dict[str, Path], image: Path, seed: int) -> bytes:
    ram, d = setup["ram"], setup["dir"]
    fill_random(ram, SIZE, seed=seed)
    async with QemuVM(qemu_args(ram, d / "s-cli.sock"), d, name="s"):
        vm_cli(daemon, d / "s-cli.sock", "save", "--quit", str(image))
    return ram.read_bytes()


async def test_a_cont_by_another_client_during_a_paused_restore_leaves_it_paused(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the incoming state QEMU's `cont` only sets autostart. Another client's `cont`
    while migd restores the RAM could have started a `--paused` guest once its state
    loaded; QEMU 10 takes the run state from the stream (QEMU >= 9.1), and `vm save`
    always stops the guest before QEMU's part: it stays paused, as said. Not a bug:
    this pins it (a QEMU that changed it would fail here, not in a user's restore)."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    saved = await _saved(daemon, setup, image, seed=41)
    fill_random(ram, SIZE, seed=42)
    original = vm.ram_job
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d, name="b") as qemu:

        async def cont_then_ram(*args: Any, **kwargs: Any) -> None:
            await qemu.cmd("cont")  # another client of this QEMU
            assert await status(qemu) == "inmigrate"
            await original(*args, **kwargs)

        monkeypatch.setattr(vm, "ram_job", cont_then_ram)
        opts = _options(daemon, d / "b-cli.sock", image)
        opts.paused = True
        out = io.StringIO()
        await vm.run_vm_restore(opts, out, io.StringIO())
        assert "paused, ready" in out.getvalue()
        assert await status(qemu) == "paused"
        assert ram.read_bytes() == saved


async def test_a_migrate_incoming_by_another_client_during_a_restore_fails_it_naming_that(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another client loads another image's device state while migd restores this
    image's RAM: QEMU then holds image B's CPU and device state over image A's RAM, and
    the restore said only "QEMU could not load the device state ... the VM was not
    started". It now says another incoming migration was started, and that the VM's
    state is not the image's."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    other = d / "other.img"
    await _saved(daemon, setup, other, seed=43)
    await _saved(daemon, setup, image, seed=44)
    offset = vm_image.HEADER_AREA
    original = vm.ram_job
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d, name="b") as qemu:

        async def incoming_then_ram(*args: Any, **kwargs: Any) -> None:
            uri = f"file:{other},offset={offset}"
            await qemu.cmd("migrate-incoming", {"uri": uri, "exit-on-error": False})
            await qemu.wait_migration()
            await original(*args, **kwargs)

        monkeypatch.setattr(vm, "ram_job", incoming_then_ram)
        with pytest.raises(ClientError, match="another incoming migration") as caught:
            await vm.run_vm_restore(_options(daemon, d / "b-cli.sock", image),
                                    io.StringIO(), io.StringIO())  # fmt: skip
        assert "not the image's; it was not started" in str(caught.value)
        assert await status(qemu) != "running"


async def test_a_quit_by_another_client_during_a_restore_is_named(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another client quits QEMU while migd restores the RAM: the restore said QEMU
    "could not load the device state ... QEMU's own output says why"; it now says QEMU
    quit during the restore."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    await _saved(daemon, setup, image, seed=45)
    original = vm.ram_job
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d, name="b") as qemu:

        async def quit_then_ram(*args: Any, **kwargs: Any) -> None:
            await qemu.quit()
            await original(*args, **kwargs)

        monkeypatch.setattr(vm, "ram_job", quit_then_ram)
        with pytest.raises(ClientError, match="QEMU quit during the restore"):
            await vm.run_vm_restore(_options(daemon, d / "b-cli.sock", image),
                                    io.StringIO(), io.StringIO())  # fmt: skip
