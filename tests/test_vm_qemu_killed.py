"""QEMU killed (or quit) in the middle of a `migd vm save` or `vm restore`: the error
says QEMU is gone and what became of the image, never that the VM "is paused" or that
QEMU refused a device (red-team, session 8a). Real QEMU processes, a real migd daemon."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from migd.tools import vm, vm_image
from migd.tools.client import ClientError

from .conftest import DaemonProcess, fill_random
from .qemu_vm import QemuVM, requires_qemu
from .test_vm import INCOMING, SIZE, _options, qemu_args, saved_image

pytestmark = requires_qemu


async def test_qemu_killed_during_the_saves_ram_part_keeps_the_old_image_and_says_so(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: "QEMU: query-status: lost QEMU ..." and "the save failed, and the VM
    could not be resumed (...): it is paused", of a VM that no longer exists."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    image.write_bytes(b"the previous image")
    fill_random(ram, SIZE, seed=91)
    original = vm.ram_job
    async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a") as qemu:

        async def killed_then_ram(*args: Any, **kwargs: Any) -> None:
            qemu.kill()  # QEMU wrote its part; SIGKILLed, reaped, as migd copies the RAM
            await original(*args, **kwargs)

        monkeypatch.setattr(vm, "ram_job", killed_then_ram)
        err = io.StringIO()
        with pytest.raises(ClientError) as caught:
            await vm.run_vm_save(_options(daemon, d / "a-cli.sock", image), io.StringIO(), err)
    text = str(caught.value)
    assert "QEMU quit or was killed during the save" in text, text
    assert f"{image} is as it was" in text
    assert "it is paused" not in err.getvalue(), err.getvalue()
    assert "there is no VM to resume" in err.getvalue()
    assert image.read_bytes() == b"the previous image"
    assert not list(d.glob(".*migd-vm-tmp"))


async def test_qemu_killed_as_it_loads_the_device_state_is_not_called_a_missing_device(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: "QEMU could not load the device state ...; QEMU's own output says why
    (often a device the saved VM had that this QEMU lacks): ... the VM was not started"."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    await saved_image(daemon, setup, "--quit")
    fill_random(ram, SIZE, seed=92)
    original = vm._check_before_load
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d, name="b") as qemu:

        async def checked_then_killed(*args: Any) -> None:
            await original(*args)
            qemu.kill()  # just before migd's migrate-incoming

        monkeypatch.setattr(vm, "_check_before_load", checked_then_killed)
        with pytest.raises(ClientError) as caught:
            opts = _options(daemon, d / "b-cli.sock", image)
            await vm.run_vm_restore(opts, io.StringIO(), io.StringIO())
    text = str(caught.value)
    assert f"QEMU quit or was killed as it loaded the device state of '{image}'" in text, text
    assert "often a device" not in text
    assert "there is no VM" in text


async def test_qemu_killed_before_the_resume_of_a_saved_vm_is_not_called_paused(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image is whole (renamed into place); `--resume`'s cont finds QEMU gone.
    Before: "the image is saved, but the VM could not be resumed (...): it is paused",
    and the summary "the VM is paused"."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    fill_random(ram, SIZE, seed=93)
    original = vm.paths.sync_directory_of
    async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a") as qemu:

        def synced_then_killed(path: str) -> None:
            original(path)
            qemu.kill()  # after the rename, before the cont

        monkeypatch.setattr(vm.paths, "sync_directory_of", synced_then_killed)
        out, err = io.StringIO(), io.StringIO()
        opts = _options(daemon, d / "a-cli.sock", image)
        opts.after = "resume"
        assert await vm.run_vm_save(opts, out, err) == 1
    assert "the image is saved, but QEMU is gone" in err.getvalue(), err.getvalue()
    assert "paused" not in err.getvalue() + out.getvalue()
    assert "the VM is gone (QEMU quit or was killed)" in out.getvalue()
    with open(image, "rb") as f:
        assert vm_image.read_header(f.fileno(), str(image)).device.length > 0
