"""`migd vm save` / `vm restore` red-team, session 16: another QMP client of the same
QEMU, a QEMU whose device state fails to load after the RAM landed, an image with bytes
appended (docs/vm-image.md). Real QEMU processes, a real migd daemon."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from migd.tools import vm, vm_image
from migd.tools.client import ClientError, connect, disconnect, execute

from .conftest import DaemonProcess, fill_random, poll_until
from .qemu_vm import QemuVM, requires_qemu
from .test_vm import INCOMING, SIZE, MiB, _options, ignore_shared, qemu_args, status, vm_cli

pytestmark = requires_qemu


async def test_a_guest_another_client_resumes_during_the_save_gives_no_image(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU's monitor is not migd's alone (libvirt, a second -qmp, another `vm save
    --resume` finishing): a `cont` from elsewhere after the stop lets the guest write
    its RAM while migd copies it. The image would hold RAM torn against the device state
    QEMU wrote before; the save must fail, the old image kept."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    image.write_bytes(b"the previous image")
    fill_random(ram, SIZE, seed=31)
    original = vm.ram_job

    async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a") as qemu:

        async def resumed_then_ram(*args: Any, **kwargs: Any) -> None:
            await qemu.cmd("cont")  # another client of this QEMU
            with open(ram, "r+b") as f:  # what the running guest then writes
                f.seek(SIZE // 2)
                f.write(b"written by the guest after the stop")
            await original(*args, **kwargs)

        monkeypatch.setattr(vm, "ram_job", resumed_then_ram)
        err = io.StringIO()
        with pytest.raises(ClientError, match="resumed during the save"):
            await vm.run_vm_save(_options(daemon, d / "a-cli.sock", image), io.StringIO(), err)
        assert await status(qemu) == "running"
    assert image.read_bytes() == b"the previous image"
    assert not list(d.glob(".*migd-vm-tmp"))


async def test_a_device_state_qemu_fails_to_load_after_the_ram_landed_leaves_it_stopped(
    daemon: DaemonProcess, setup: dict[str, Path]
) -> None:
    """The image's RAM is restored, then QEMU refuses its device state (a device the
    saved VM had and this QEMU lacks): the restore fails naming QEMU's reason, and the
    guest is not started on RAM without its CPU and device state."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    fill_random(ram, SIZE, seed=32)
    extra = ("-device", "i6300esb")
    async with QemuVM(qemu_args(ram, d / "a-cli.sock", extra=extra), d, name="a"):
        vm_cli(daemon, d / "a-cli.sock", "save", "--quit", str(image))
        saved = ram.read_bytes()
    fill_random(ram, SIZE, seed=33)
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d, name="b") as qemu:
        result = vm_cli(daemon, d / "b-cli.sock", "restore", str(image), check=False)
        assert result.returncode == 1
        # The image, QEMU's reason, and what state that leaves: QEMU's own text alone
        # ("load of migration failed: Invalid argument") named neither.
        assert f"QEMU could not load the device state of '{image}'" in result.stderr
        assert "Invalid argument" in result.stderr
        assert "the VM was not started" in result.stderr, result.stderr
        assert await status(qemu) == "inmigrate"
        assert ram.read_bytes() == saved  # the RAM part landed whole, checked


async def test_ctrl_c_while_qemu_writes_its_part_cancels_it_and_puts_the_settings_back(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while QEMU writes the device state (256 MiB of video RAM: long enough to be
    caught in it). The interrupt ended the query-migrate in flight, so the migrate_cancel
    after it was never sent: QEMU's migration ran on under a guest said to "run again"
    (and would stop it when it completed), and QEMU, mid-migration, refused the settings
    put back: x-ignore-shared stayed on for the guest's next live migration."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    fill_random(ram, SIZE, seed=34)
    original = vm.wait_qemu_migration

    async def ctrl_c_then_wait(qemu: Any, what: str, *args: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)  # taken by the save's own handler
        return await original(qemu, what, *args)

    monkeypatch.setattr(vm, "wait_qemu_migration", ctrl_c_then_wait)
    extra = ("-device", "VGA,vgamem_mb=256")
    async with QemuVM(qemu_args(ram, d / "a-cli.sock", extra=extra), d, name="a") as qemu:
        await qemu.cmd("migrate-set-parameters", {"max-bandwidth": 12345678})
        err = io.StringIO()
        with pytest.raises(ClientError, match=r"interrupted \(Ctrl-C or SIGTERM\)"):
            await vm.run_vm_save(_options(daemon, d / "a-cli.sock", image), io.StringIO(), err)
        assert "the VM runs again" in err.getvalue()
        info = await qemu.wait_migration()
        # Cancelled (here in 6 of 6 runs), or completed just before the cancel came.
        assert info["status"] in ("cancelled", "completed"), info
        assert await status(qemu) == "running"  # also now that QEMU's migration ended
        assert not await ignore_shared(qemu)
        params = await qemu.cmd("query-migrate-parameters")
        assert params["max-bandwidth"] == 12345678
    assert not image.exists() and not list(d.glob(".*migd-vm-tmp"))


@pytest.mark.parametrize("planted", ["owner", "mode", "hard link", "link"])
async def test_an_image_another_user_could_have_planted_is_refused_by_vm_restore(
    daemon: DaemonProcess, setup: dict[str, Path], planted: str
) -> None:
    """`migd restore` refuses a save file another local user owns or can write, a second
    hard link, a link of theirs (README, Trust model): the file's RAM and, here, QEMU's
    device state would be theirs to choose. `migd vm restore` opens IMAGE itself, as root,
    and passed migd an fd, so none of that was checked: a VM image planted in /tmp by
    `nobody` was restored into the guest."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    fill_random(ram, SIZE, seed=35)
    async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a"):
        vm_cli(daemon, d / "a-cli.sock", "save", "--quit", str(image))
    named = image
    if planted == "owner":
        os.chown(image, 65534, 65534)
        text = "is owned by uid 65534"
    elif planted == "mode":
        image.chmod(0o666)
        text = "is writable by group or others"
    elif planted == "hard link":
        os.link(image, d / "second-name")
        text = "has 2 hard links"
    else:  # nobody's link, in a sticky directory all may write (as /tmp), to root's image
        shared = d / "shared"
        shared.mkdir()
        shared.chmod(0o1777)
        named = shared / "vm.img"
        named.symlink_to(image)
        os.chown(named, 65534, 65534, follow_symlinks=False)
        text = "is a symbolic link owned by uid 65534"
    fill_random(ram, SIZE, seed=36)
    before = ram.read_bytes()
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d, name="b") as qemu:
        result = vm_cli(daemon, d / "b-cli.sock", "restore", str(named), check=False)
        assert result.returncode == 1
        assert f"'{named}' {text}" in result.stderr, result.stderr
        assert ram.read_bytes() == before
        assert await status(qemu) == "inmigrate"


@pytest.mark.parametrize("flags", [(), ("--live",), ("--live", "first pass only")])
async def test_inspect_of_a_save_killed_before_its_header_says_the_save_did_not_finish(
    daemon: DaemonProcess, setup: dict[str, Path], flags: tuple[str, ...]
) -> None:
    """A `vm save` killed before its header leaves its temporary file: both parts (or
    a live save's first RAM pass alone), and zeros where the header goes. `vm restore`
    says the save did not finish; `migd inspect` said only "not a QEMU/migd save file
    (no QEVM magic at offset 0)"."""
    cut = vm_image.LIVE_RAM_OFFSET if "first pass only" in flags else vm_image.HEADER_AREA
    flags = tuple(f for f in flags if f.startswith("--"))
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    fill_random(ram, SIZE, seed=37)
    async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a"):
        vm_cli(daemon, d / "a-cli.sock", "save", "--quit", *flags, str(image))
    with open(image, "r+b") as f:
        f.write(bytes(cut))
    result = subprocess.run([sys.executable, "-m", "migd", "inspect", str(image)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 1
    assert "migd VM image, UNUSABLE" in result.stdout, result
    assert "no image header: the save that wrote it did not finish" in result.stderr


@pytest.mark.parametrize("during", ["live pass", "ram part"])
async def test_a_killed_vm_save_leaves_qemu_without_x_ignore_shared(
    daemon: DaemonProcess, setup: dict[str, Path], during: str
) -> None:
    """SIGKILL of `vm save` (OOM killer, a killed ssh session's process group) cannot be
    cleaned up after. QEMU's settings for its part were set before the live pass and put
    back only at the very end: a guest whose save was killed while it ran kept
    x-ignore-shared, and its next live migration (libvirt's, to another host) would leave
    its RAM behind. They are now set just before the stop and put back as soon as QEMU's
    part is written: milliseconds of the downtime, not the whole RAM copy."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    size = 256 * MiB
    fill_random(ram, size, seed=38)
    flags = ("--live",) if during == "live pass" else ()
    migd = await connect(str(daemon.socket_path))
    try:
        async with QemuVM(qemu_args(ram, d / "a-cli.sock", size), d, name="a") as qemu:
            cmd = [sys.executable, "-m", "migd", "vm", "save", "--qmp", str(d / "a-cli.sock"),
                   "--socket", str(daemon.socket_path), "-q", *flags, str(image)]  # fmt: skip
            cli = subprocess.Popen(cmd, stderr=subprocess.PIPE)
            try:
                jobs = await poll_until(lambda: execute(migd, "query-jobs"), bool, "migd's job")
            finally:
                cli.kill()
                cli.communicate()
            assert jobs[0]["id"].endswith("-live") == (during == "live pass")
            assert await status(qemu) == ("running" if during == "live pass" else "postmigrate")
            assert not await ignore_shared(qemu)
    finally:
        await disconnect(migd)


async def test_a_killed_vm_save_leaves_nothing_of_it_in_migd(
    daemon: DaemonProcess, setup: dict[str, Path]
) -> None:
    """SIGKILL of `vm save` during migd's RAM part: its job ran on to the end, writing
    the guest's RAM into a temporary file no one would use, and its backend kept the
    guest's RAM file mapped and open in migd (tmpfs pages pinned after the VM and its
    file are gone) until migd restarted; its fd sets and the concluded job stayed listed.
    Its session is scoped now (x-migd-session-scope): all of it goes with the connection."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    fill_random(ram, SIZE, seed=39)
    migd = await connect(str(daemon.socket_path))
    try:
        async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a"):
            cmd = [sys.executable, "-m", "migd", "vm", "save", "--qmp", str(d / "a-cli.sock"),
                   "--socket", str(daemon.socket_path), "-q", str(image)]  # fmt: skip
            cli = subprocess.Popen(cmd, stderr=subprocess.PIPE)
            try:
                await poll_until(lambda: execute(migd, "query-jobs"), bool, "migd's job")
            finally:
                cli.kill()
                cli.communicate()
            async def left() -> list[Any]:
                return [await execute(migd, c)
                        for c in ("query-jobs", "query-memdev", "query-fdsets")]  # fmt: skip

            # Released in the background once migd sees the connection end.
            await poll_until(left, lambda lists: not any(lists), "the killed save's release")
    finally:
        await disconnect(migd)
