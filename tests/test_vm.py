"""`migd vm save` / `migd vm restore` against real QEMU processes (docs/vm-image.md).

These VMs run only their firmware (no kernel): what matters here is that the RAM file a
new QEMU gets back is byte for byte the one the stopped guest had, that QEMU's device
state loads, and that every mismatch or damage is refused before anything is written.
tests/test_vm_guest.py runs a real Linux guest through the same commands.

The CLI runs as a subprocess (`python -m migd vm ...`) against a migd daemon process.
Each QEMU has two QMP sockets: one for the test, one for the CLI (a QMP socket serves one
client at a time).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from migd.tools import vm, vm_image
from migd.tools.client import ClientError

from .conftest import DaemonProcess, fill_random
from .qemu_vm import QemuVM, requires_qemu

pytestmark = requires_qemu

MiB = 1 << 20
SIZE = 64 * MiB


def qemu_args(
    ram: Path,
    cli_sock: Path,
    size: int = SIZE,
    extra: tuple[str, ...] = (),
    machine: str = "q35",
    backend: str | None = None,
    backend_id: str = "ram0",
) -> list[str]:
    if backend is None:
        backend = f"memory-backend-file,id={backend_id},size={size},mem-path={ram},share=on"
    return [
        "-accel", "tcg", "-M", machine, "-m", str(size // MiB), "-smp", "1", "-nodefaults",
        "-display", "none", "-object", backend, "-machine", f"memory-backend={backend_id}",
        "-qmp", f"unix:{cli_sock},server=on,wait=off", *extra,
    ]  # fmt: skip


INCOMING = ("-incoming", "defer")


def vm_cli(
    daemon: DaemonProcess, qemu_sock: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "migd", "vm", args[0], "--qmp", str(qemu_sock),
           "--socket", str(daemon.socket_path), "-q", *args[1:]]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


async def status(vm: QemuVM) -> str:
    return str((await vm.cmd("query-status"))["status"])


async def ignore_shared(vm: QemuVM) -> bool:
    caps = await vm.cmd("query-migrate-capabilities")
    return next(c["state"] for c in caps if c["capability"] == "x-ignore-shared")


async def saved_image(daemon: DaemonProcess, setup: dict[str, Path], *flags: str) -> bytes:
    """Run a firmware-only VM on random RAM, `vm save` it; the RAM file it had then."""
    ram, d = setup["ram"], setup["dir"]
    fill_random(ram, SIZE, seed=5)
    async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a") as vm:
        assert await status(vm) == "running"
        vm_cli(daemon, d / "a-cli.sock", "save", str(setup["image"]), *flags)
        if "--quit" not in flags:
            assert await status(vm) in ("paused", "postmigrate")
        return ram.read_bytes()


@pytest.mark.parametrize("flags", [("--quit",), ("--live", "--quit")])
async def test_a_saved_vm_restores_into_a_new_qemu_byte_exact_and_runs(
    daemon: DaemonProcess, setup: dict[str, Path], flags: tuple[str, ...]
) -> None:
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    saved = await saved_image(daemon, setup, *flags)
    assert not list(d.glob(".*migd-vm-tmp"))  # the temporary file became the image
    fill_random(ram, SIZE, seed=99)  # what a new guest's RAM file might hold
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d,
                      name="b") as vm:  # fmt: skip
        assert await status(vm) == "inmigrate"
        as_json = ("--json",) if "--live" not in flags else ()  # both outputs, one each
        spawned = time.monotonic()
        out = vm_cli(daemon, d / "b-cli.sock", "restore", "--paused", *as_json, str(image)).stdout
        took = time.monotonic() - spawned
        if as_json:
            # Its start-up (the command loading, which a caller's downtime includes) is
            # told beside its own downtime, which starts after it; both fit in the run.
            seconds = json.loads(out)["seconds"]
            assert 0 < seconds["startup"] < took, (seconds, took)
            assert seconds["startup"] + seconds["downtime"] < took + 0.01, (seconds, took)
        else:
            assert "vm restore completed" in out and "downtime" in out
            assert re.search(r"start-up: +\d+\.\d\d s \(the command loading", out), out
        assert await status(vm) == "paused"
        assert ram.read_bytes() == saved
        assert not await ignore_shared(vm)  # QEMU's settings put back
        await vm.cmd("cont")
        assert await status(vm) == "running"


# What `migd vm restore` must not load: it runs during the guest's downtime, its start-up
# included, and these are the daemon's (pydantic models, the engine, its threads) or
# numpy: from a cold page cache the command took 0.74-1.06 s to fail on a missing image
# with them, 0.32-0.44 s without (docs/bench/vm/run9-startup.md).
DAEMON_ONLY = ("numpy", "pydantic", "uvloop", "aiofiles", "migd.api", "migd.qmp",
               "migd.app.config", "migd.app.daemon", "migd.migration.settings",
               "migd.migration.engine", "migd.io.checksums", "migd.io.threads",
               "migd.bench.suite")  # fmt: skip


async def test_restore_loads_none_of_the_daemons_modules(
    daemon: DaemonProcess, setup: dict[str, Path]
) -> None:
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    saved = await saved_image(daemon, setup, "--quit")
    listing = d / "modules.json"
    # The command as `python -m migd` runs it, and what it had loaded when it exited.
    wrapper = (
        "import atexit, json, runpy, sys\n"
        f"atexit.register(lambda: open({str(listing)!r}, 'w').write("
        "json.dumps(list(sys.modules))))\n"
        "sys.argv[0] = 'migd'\n"
        "runpy.run_module('migd', run_name='__main__', alter_sys=True)\n"
    )
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d,
                      name="b") as vm:  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-c", wrapper, "vm", "restore", "--qmp", str(d / "b-cli.sock"),
             "--socket", str(daemon.socket_path), "-q", "--paused", str(image)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert await status(vm) == "paused" and ram.read_bytes() == saved
    loaded = json.loads(listing.read_text())
    assert {"migd.tools.vm", "qemu.qmp"} <= set(loaded)  # the command did run
    assert [m for m in loaded if m == "numpy" or m.startswith(DAEMON_ONLY)] == []


async def test_save_stops_a_running_vm_and_resume_lets_it_run_with_its_settings_back(
    daemon: DaemonProcess, setup: dict[str, Path]
) -> None:
    ram, d = setup["ram"], setup["dir"]
    fill_random(ram, SIZE, seed=6)
    async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a") as vm:
        await vm.cmd("migrate-set-parameters", {"max-bandwidth": 12345678})
        events_before = await vm.cmd("query-migrate-capabilities")
        out = vm_cli(daemon, d / "a-cli.sock", "save", "--resume", str(setup["image"])).stdout
        assert "the VM is running" in out
        assert await status(vm) == "running"
        assert await vm.cmd("query-migrate-capabilities") == events_before
        params = await vm.cmd("query-migrate-parameters")
        assert params["max-bandwidth"] == 12345678
        # Without --resume or --quit the guest stays stopped.
        vm_cli(daemon, d / "a-cli.sock", "save", str(setup["image"]))
        assert await status(vm) == "postmigrate"


@pytest.mark.parametrize(
    "change",
    ["other size", "other machine", "other backend id", "running vm", "extra backend"],
)
async def test_a_mismatched_qemu_is_refused_before_anything_is_written(
    daemon: DaemonProcess, setup: dict[str, Path], change: str
) -> None:
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    await saved_image(daemon, setup, "--quit")
    size, extra, machine, backend_id = SIZE, INCOMING, "q35", "ram0"
    if change == "other size":
        size = SIZE // 2
    elif change == "other machine":
        machine = "pc"
    elif change == "other backend id":
        backend_id = "mem0"
    elif change == "running vm":
        extra = ()
    elif change == "extra backend":
        more = f"memory-backend-file,id=more,size={MiB},mem-path={ram}.more,share=on"
        extra = (*INCOMING, "-object", more)
    fill_random(ram, size, seed=42)
    before = ram.read_bytes()
    args = qemu_args(ram, d / "b-cli.sock", size, extra, machine, backend_id=backend_id)
    async with QemuVM(args, d, name="b") as vm:
        state = await status(vm)
        result = vm_cli(daemon, d / "b-cli.sock", "restore", str(image), check=False)
        assert result.returncode == 1, result
        expected = {
            "other size": f"memory backend 'ram0' has {size} bytes, the image {SIZE}",
            "other machine": "machine type pc-i440fx",
            "other backend id": "no memory backend 'ram0'",
            "running vm": "restore needs a QEMU started with -incoming defer",
            "extra backend": "memory backends not in the image: more",
        }[change]
        assert expected in result.stderr
        if change != "running vm":  # a running guest changes its own RAM
            assert ram.read_bytes() == before
        assert await status(vm) == state


def _damage(image: Path, how: str, other: Path | None = None) -> str:
    """Damage the image one way; the text the refusal must hold."""
    with open(image, "rb") as f:
        header = vm_image.read_header(f.fileno(), str(image))
    data = bytearray(image.read_bytes())
    if how == "header byte":
        data[40] ^= 0x01
        text = "header is corrupt"
    elif how == "header gone":
        data[: vm_image.HEADER_AREA] = bytes(vm_image.HEADER_AREA)
        text = "did not finish"
    elif how == "device byte":
        data[header.device.offset + header.device.length // 2] ^= 0x80
        text = "does not match its SHA-256"
    elif how == "truncated":
        del data[-4096:]
        text = "cut short"
    elif how == "foreign":
        data[:8] = b"QEVM\x00\x00\x00\x03"
        text = "not a migd VM image"
    else:  # "other ram part": another save's RAM spliced in
        assert other is not None
        with open(other, "rb") as f:
            theirs = vm_image.read_header(f.fileno(), str(other))
        data[header.ram.offset :] = other.read_bytes()[theirs.ram.offset :]
        text = "do not belong together"
    image.write_bytes(bytes(data))
    return text


@pytest.mark.parametrize(
    "how", ["header byte", "header gone", "device byte", "truncated", "foreign", "other ram part"]
)
async def test_a_damaged_image_is_refused_before_anything_is_written(
    daemon: DaemonProcess, setup: dict[str, Path], how: str
) -> None:
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    other = None
    if how == "other ram part":
        await saved_image(daemon, {**setup, "image": d / "other.img"}, "--quit")
        other = d / "other.img"
    await saved_image(daemon, setup, "--quit")
    text = _damage(image, how, other)
    fill_random(ram, SIZE, seed=43)
    before = ram.read_bytes()
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d,
                      name="b") as vm:  # fmt: skip
        result = vm_cli(daemon, d / "b-cli.sock", "restore", str(image), check=False)
        assert result.returncode == 1 and text in result.stderr, result.stderr
        assert ram.read_bytes() == before
        assert await status(vm) == "inmigrate"
    inspect = subprocess.run([sys.executable, "-m", "migd", "inspect", str(image)],
                             capture_output=True, text=True)  # fmt: skip
    assert inspect.returncode == 1


@pytest.mark.parametrize("kind", ["memory-backend-ram", "memory-backend-memfd", "share=off"])
async def test_backends_migd_cannot_reach_are_refused_and_the_vm_keeps_running(
    daemon: DaemonProcess, setup: dict[str, Path], kind: str
) -> None:
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    backend = {
        "memory-backend-ram": f"memory-backend-ram,id=ram0,size={SIZE}",
        "memory-backend-memfd": f"memory-backend-memfd,id=ram0,size={SIZE},share=on",
        "share=off": f"memory-backend-file,id=ram0,size={SIZE},mem-path={ram},share=off",
    }[kind]
    args = qemu_args(ram, d / "a-cli.sock", backend=backend)
    async with QemuVM(args, d, name="a") as vm:
        result = vm_cli(daemon, d / "a-cli.sock", "save", str(image), check=False)
        assert result.returncode == 1
        assert {
            "memory-backend-ram": "private anonymous memory",
            "memory-backend-memfd": "is a memfd",
            "share=off": "has share=off",
        }[kind] in result.stderr
        assert await status(vm) == "running"
    assert not image.exists() and not list(d.glob(".*migd-vm-tmp"))


async def test_a_save_that_fails_keeps_the_old_image_and_runs_the_vm_again(
    daemon: DaemonProcess, setup: dict[str, Path], short_dir: Path
) -> None:
    """The image's filesystem fills up during migd's part (a 16 MiB tmpfs)."""
    ram, d = setup["ram"], setup["dir"]
    small = short_dir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        image = small / "vm.img"
        image.write_bytes(b"the previous image")
        fill_random(ram, SIZE, seed=7)
        async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a") as vm:
            result = vm_cli(daemon, d / "a-cli.sock", "save", str(image), check=False)
            assert result.returncode == 1
            assert "No space left on device" in result.stderr, result.stderr
            assert "the VM runs again" in result.stderr
            assert await status(vm) == "running"
            assert not await ignore_shared(vm)
        assert image.read_bytes() == b"the previous image"
        assert sorted(p.name for p in small.iterdir()) == ["vm.img"]
    finally:
        subprocess.run(["umount", str(small)], check=True)


async def test_a_device_state_buffer_that_cannot_be_made_is_named_not_the_image(
    daemon: DaemonProcess, setup: dict[str, Path]
) -> None:
    """memfd_create failing (ENOMEM, a seccomp filter) raises an OSError with no file
    name: it was reported as a write of the image that failed ("vm.img.TMP (the image
    being written): Cannot allocate memory"). The client's os.memfd_create fails here."""
    ram, d = setup["ram"], setup["dir"]
    image = d / "vm.img"
    image.write_bytes(b"the previous image")
    fill_random(ram, SIZE, seed=8)
    prelude = (
        "import errno, os, sys\n"
        "def refuse(*a):\n    raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))\n"
        "os.memfd_create = refuse\n"
        "from migd.app.cli import main\nsys.exit(main())\n"
    )
    async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a") as vm:
        result = subprocess.run(
            [sys.executable, "-c", prelude, "vm", "save", "--qmp", str(d / "a-cli.sock"),
             "--socket", str(daemon.socket_path), "-q", str(image)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert (
            "cannot create the memory file that takes QEMU's device state: Cannot allocate "
            "memory" in result.stderr
        ), result.stderr
        assert "image being written" not in result.stderr
        assert await status(vm) == "running"
    assert image.read_bytes() == b"the previous image"
    assert sorted(p.name for p in d.iterdir() if "vm.img" in p.name) == ["vm.img"]


async def test_inspect_shows_both_parts(daemon: DaemonProcess, setup: dict[str, Path]) -> None:
    await saved_image(daemon, setup, "--quit")
    out = subprocess.run([sys.executable, "-m", "migd", "inspect", str(setup["image"])],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "migd VM image" in out and "machine pc-q35-" in out
    assert "device state:" in out and "(QEMU's stream, x-ignore-shared)" in out
    assert f"ram0     {SIZE / MiB:.1f} MiB" in out and "checksums xxh3-128" in out
    assert "migd vm restore accepts it" in out


async def test_an_image_path_that_is_the_guests_memory_file_is_refused(
    daemon: DaemonProcess, setup: dict[str, Path]
) -> None:
    ram, d = setup["ram"], setup["dir"]
    fill_random(ram, SIZE, seed=8)
    link = d / "ram-link"
    link.symlink_to(ram)
    async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a") as vm:
        for image in (ram, link):
            result = vm_cli(daemon, d / "a-cli.sock", "save", str(image), check=False)
            assert result.returncode == 1
            assert "is the memory file of backend 'ram0'" in result.stderr
            assert await status(vm) == "running"
    assert ram.stat().st_size == SIZE and not list(ram.parent.glob(".*migd-vm-tmp"))


def _options(daemon: DaemonProcess, qemu_sock: Path, image: Path) -> vm.VmOptions:
    return vm.VmOptions(image=str(image), qmp=str(qemu_sock),
                        socket=str(daemon.socket_path), quiet=True)  # fmt: skip


async def test_restore_reads_the_image_it_checked_even_if_its_name_is_replaced(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another valid image of the same VM is renamed over IMAGE after the checks, just
    before migd's RAM job: migd still reads the checked file (it gets it as an fd set)."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    saved = await saved_image(daemon, setup, "--quit")
    other = d / "other.img"
    fill_random(ram, SIZE, seed=12)
    async with QemuVM(qemu_args(ram, d / "o-cli.sock"), d, name="o"):
        vm_cli(daemon, d / "o-cli.sock", "save", "--quit", str(other))
    swapped_in = ram.read_bytes()
    assert swapped_in != saved
    original = vm.add_migd_backends

    async def swap_then_add(*args: Any) -> list[str]:
        other.replace(image)
        return await original(*args)

    monkeypatch.setattr(vm, "add_migd_backends", swap_then_add)
    fill_random(ram, SIZE, seed=98)
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d, name="b") as qemu:
        options = _options(daemon, d / "b-cli.sock", image)
        options.paused = True
        assert await vm.run_vm_restore(options, io.StringIO(), io.StringIO()) == 0
        assert not other.exists()  # the swap happened
        assert ram.read_bytes() == saved
        assert await status(qemu) == "paused"


async def test_a_restore_whose_start_is_unknown_reports_without_its_start_up(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where /proc/self/stat cannot be read, the summary leaves the start-up out (before:
    formatting the missing figure raised TypeError after the guest was restored)."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    saved = await saved_image(daemon, setup, "--quit")
    monkeypatch.setattr(vm, "_process_age", lambda: None)
    fill_random(ram, SIZE, seed=97)
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d, name="b") as qemu:
        options = _options(daemon, d / "b-cli.sock", image)
        options.paused = True
        out = io.StringIO()
        assert await vm.run_vm_restore(options, out, io.StringIO()) == 0
        assert "vm restore completed" in out.getvalue() and "start-up" not in out.getvalue()
        assert ram.read_bytes() == saved
        assert await status(qemu) == "paused"


async def test_a_temporary_file_replaced_during_the_save_is_not_renamed_into_place(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temporary file is moved away and another file put under its name after it
    was created: migd writes into the file the CLI created (an fd set), the impostor is
    left untouched, and it does not become IMAGE."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    image.write_bytes(b"the previous image")
    moved, impostor = d / "moved", b"someone else's file"
    original = vm.add_migd_backends

    async def swap_then_add(*args: Any) -> list[str]:
        (tmp,) = d.glob(".*migd-vm-tmp")
        tmp.rename(moved)
        tmp.write_bytes(impostor)
        return await original(*args)

    monkeypatch.setattr(vm, "add_migd_backends", swap_then_add)
    saved = fill_random(ram, SIZE, seed=13)
    async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a") as qemu:
        err = io.StringIO()
        with pytest.raises(ClientError, match="was replaced during the save"):
            await vm.run_vm_save(_options(daemon, d / "a-cli.sock", image), io.StringIO(), err)
        assert "the VM runs again" in err.getvalue()
        assert await status(qemu) == "running"
    assert image.read_bytes() == b"the previous image"
    (tmp,) = d.glob(".*migd-vm-tmp")  # the impostor, untouched and left where it was
    assert tmp.read_bytes() == impostor
    # The RAM went into the file the CLI created (now `moved`), not by name elsewhere.
    middle = saved[SIZE // 2 : SIZE // 2 + 4096]  # far from what the firmware touches
    assert middle in moved.read_bytes()


def test_usage_errors_exit_2(daemon: DaemonProcess, setup: dict[str, Path]) -> None:
    run = [sys.executable, "-m", "migd", "vm"]
    missing = subprocess.run([*run, "save", str(setup["image"])], capture_output=True, text=True)
    assert missing.returncode == 2 and "--qmp" in missing.stderr
    nobody = setup["dir"] / "nobody.sock"
    result = subprocess.run([*run, "restore", "--qmp", str(nobody), str(setup["image"])],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 1 and "cannot open" in result.stderr  # no image yet
    result = subprocess.run(
        [*run, "save", "--qmp", str(nobody), "--socket", str(daemon.socket_path),
         str(setup["image"])], capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"cannot connect to QEMU's QMP socket {nobody}" in result.stderr
    assert not setup["image"].exists()


async def test_live_save_of_a_paused_vm_is_one_pass_and_restores_byte_exact(
    daemon: DaemonProcess, setup: dict[str, Path]
) -> None:
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    fill_random(ram, SIZE, seed=21)
    async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a") as qemu:
        await qemu.cmd("stop")
        out = vm_cli(daemon, d / "a-cli.sock", "save", "--live", str(image)).stdout
        assert "live pass" not in out  # nothing changes under a paused guest
        assert await status(qemu) in ("paused", "postmigrate")
        saved = ram.read_bytes()
    fill_random(ram, SIZE, seed=22)
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d, name="b"):
        vm_cli(daemon, d / "b-cli.sock", "restore", "--paused", str(image))
        assert ram.read_bytes() == saved


async def test_a_device_state_too_large_for_the_live_room_gets_the_ram_saved_whole_after_it(
    daemon: DaemonProcess, setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live save leaves room for QEMU's part before the RAM it writes while the guest
    runs; a part larger than that room (here: no room at all) is written first and the
    RAM saved whole after it, saying so."""
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    monkeypatch.setattr(vm_image, "LIVE_RAM_OFFSET", 0)
    fill_random(ram, SIZE, seed=23)
    async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a") as qemu:
        options = _options(daemon, d / "a-cli.sock", image)
        options.live = True
        err = io.StringIO()
        assert await vm.run_vm_save(options, io.StringIO(), err) == 0
        assert "does not fit before the RAM saved while the guest ran" in err.getvalue()
        assert "precopy" in options.timings  # the live pass ran, then was not used
        assert await status(qemu) in ("paused", "postmigrate")
        saved = ram.read_bytes()
    fd = os.open(image, os.O_RDONLY)
    try:
        header = vm_image.read_header(fd, str(image))
    finally:
        os.close(fd)
    assert header.ram.offset == vm_image.ram_offset(header.device.offset + header.device.length)
    fill_random(ram, SIZE, seed=24)
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d, name="b"):
        vm_cli(daemon, d / "b-cli.sock", "restore", "--paused", str(image))
        assert ram.read_bytes() == saved
