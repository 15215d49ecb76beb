"""`migd vm save` / `vm restore` and the other clients of the same QEMU (QEMU 10 serves
several QMP monitors): a `cont`, `migrate-incoming` or `quit` sent by another client while
a restore's RAM lands, and a second `vm save` of the same VM through another QMP socket.
Real QEMU processes, a real migd daemon."""

from __future__ import annotations

import fcntl
import io
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from migd.state import paths
from migd.tools import vm, vm_image
from migd.tools.client import ClientError

from .conftest import DaemonProcess, fill_random, poll_until, start_daemon
from .qemu_vm import QemuVM, requires_qemu
from .test_vm import INCOMING, SIZE, _options, ignore_shared, qemu_args, status, vm_cli

pytestmark = requires_qemu


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


def _save_cmd(daemon: DaemonProcess, sock: Path, image: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "migd", "vm", "save", "--qmp", str(sock),
            "--socket", str(daemon.socket_path), "-q", *flags, str(image)]  # fmt: skip


def _second_while_first_holds(
    monkeypatch: pytest.MonkeyPatch, cmd: list[str], during: str
) -> list[subprocess.CompletedProcess[str]]:
    """`cmd` run once, from the first command's `during` (vm.ram_job: its RAM part;
    vm.wait_qemu_migration: QEMU's part, QEMU's settings changed then)."""
    original = getattr(vm, during)
    seconds: list[subprocess.CompletedProcess[str]] = []

    async def second_then(*args: Any, **kwargs: Any) -> Any:
        if not seconds:
            seconds.append(subprocess.run(cmd, capture_output=True, text=True, timeout=120))
        return await original(*args, **kwargs)

    monkeypatch.setattr(vm, during, second_then)
    return seconds


def _refused(seconds: list[subprocess.CompletedProcess[str]]) -> None:
    assert len(seconds) == 1 and seconds[0].returncode == 1, seconds
    text = f"another migd vm save or vm restore of this VM is running (pid {os.getpid()})"
    assert text in seconds[0].stderr, seconds[0].stderr


async def test_a_second_vm_save_of_the_same_vm_through_another_socket_fails_fast(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `vm save`s of one VM through two QMP sockets and two migd instances
    (docs/instances.md) ran interleaved: the second, started during the first's live
    pass, saved and left the guest paused as asked; the first then found QEMU in
    postmigrate, failed, and its cleanup ran the guest again: the second's "the VM is
    paused" was false (and each puts back the QEMU settings it found, the other's
    x-ignore-shared included). The second now fails at once, naming the first's pid,
    before it changes anything; the first goes on, its image restores byte-exact."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    fill_random(ram, SIZE, seed=46)
    second = ("-qmp", f"unix:{d / 'c-cli.sock'},server=on,wait=off")
    other_migd = start_daemon(d / "m2.sock")
    try:
        cmd = _save_cmd(other_migd, d / "c-cli.sock", d / "second.img")
        seconds = _second_while_first_holds(monkeypatch, cmd, "ram_job")
        async with QemuVM(qemu_args(ram, d / "a-cli.sock", extra=second), d, name="a") as qemu:
            opts = _options(daemon, d / "a-cli.sock", image)
            opts.live = True  # the second runs from the first's live pass
            await vm.run_vm_save(opts, io.StringIO(), io.StringIO())
            saved = ram.read_bytes()
            assert not await ignore_shared(qemu)
            assert await status(qemu) == "postmigrate"
    finally:
        other_migd.stop()
    _refused(seconds)
    assert not (d / "second.img").exists()
    monkeypatch.undo()
    fill_random(ram, SIZE, seed=47)
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d, name="b") as qemu:
        vm_cli(daemon, d / "b-cli.sock", "restore", "--paused", str(image))
        assert ram.read_bytes() == saved
        assert await status(qemu) == "paused"


async def test_a_second_vm_restore_into_the_same_qemu_fails_fast(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `vm restore`s into one QEMU through two QMP sockets and two migd instances:
    the second fails at once, before it writes any RAM; the first restores its image
    byte-exact."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    other = d / "other.img"
    await _saved(daemon, setup, other, seed=49)
    saved = await _saved(daemon, setup, image, seed=50)
    fill_random(ram, SIZE, seed=51)
    other_migd = start_daemon(d / "m2.sock")  # with one migd, its object-add refused it
    try:
        cmd = _save_cmd(other_migd, d / "c-cli.sock", other)
        cmd[4] = "restore"
        seconds = _second_while_first_holds(monkeypatch, cmd, "ram_job")
        extra = (*INCOMING, "-qmp", f"unix:{d / 'c-cli.sock'},server=on,wait=off")
        async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=extra), d, name="b") as qemu:
            opts = _options(daemon, d / "b-cli.sock", image)
            opts.paused = True
            await vm.run_vm_restore(opts, io.StringIO(), io.StringIO())
            assert ram.read_bytes() == saved
            assert await status(qemu) == "paused"
            assert not await ignore_shared(qemu)
    finally:
        other_migd.stop()
    _refused(seconds)


def _vm_locked(ram: Path) -> bool:
    """Whether some process holds a `migd vm` lock on `ram` (paths.VM_BYTE)."""
    fd = os.open(ram, os.O_RDWR)
    try:  # F_OFD_GETLK: asks, takes nothing (a lock taken here could refuse the save)
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, paths.VM_BYTE, 1, 0)
        kind = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query))[0]
        return bool(kind != fcntl.F_UNLCK)
    finally:
        os.close(fd)


async def test_a_killed_vm_save_does_not_block_the_next_one(
    daemon: DaemonProcess, setup: dict[str, Path]
) -> None:
    """The lock of a `vm save` killed with SIGKILL goes with its process: the next save
    of the VM is not refused. The killed save waits on a migd socket that never greets
    (it holds the lock then, and has changed nothing of QEMU's)."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    fill_random(ram, SIZE, seed=48)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(d / "silent.sock"))
    silent.listen()
    try:
        async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a") as qemu:
            cmd = _save_cmd(daemon, d / "a-cli.sock", image)
            cmd[cmd.index("--socket") + 1] = str(d / "silent.sock")
            cli = subprocess.Popen(cmd, stderr=subprocess.PIPE)
            try:

                async def locked() -> bool:
                    return _vm_locked(ram)

                await poll_until(locked, bool, "the first save's lock")
            finally:
                cli.kill()
                cli.communicate()
            assert not _vm_locked(ram)
            vm_cli(daemon, d / "a-cli.sock", "save", str(image))
            assert await status(qemu) == "postmigrate"
    finally:
        silent.close()
