"""`migd vm save` onto a filesystem that fills up just as its header is written: a
full filesystem cuts a write short when part of it fits, and a header longer than one
page (many backends, long paths) lost its digest. The save said "completed" and renamed
the unusable file over the good image (red-team, session 8a). Real QEMU, a real migd
daemon, a real size-limited tmpfs (its room is counted in whole pages, exactly)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from migd.tools import vm_image

from .conftest import DaemonProcess, fill_random
from .qemu_vm import QemuVM, requires_qemu
from .test_vm import SIZE, qemu_args, status, vm_cli

pytestmark = requires_qemu

PAGE = 4096


@pytest.fixture
def tmpfs_80m(short_dir: Path) -> Iterator[Path]:
    where = short_dir / "t"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(where)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def _long_ram_path(shm: Path) -> Path:
    """A guest RAM file whose path (in the header, as 'mem-path') is 3,600 characters
    long: the header's JSON then takes more than one page."""
    deep = shm
    for i in range(16):
        deep = deep / (f"d{i:02}" + "x" * 220)
    deep.mkdir(parents=True)
    return deep / "guest-ram"


async def test_a_disk_that_fills_up_as_the_header_is_written_keeps_the_old_image(
    daemon: DaemonProcess, short_dir: Path, shm: Path, tmpfs_80m: Path
) -> None:
    d, image = short_dir, tmpfs_80m / "vm.img"
    ram = _long_ram_path(shm)
    fill_random(ram, SIZE, seed=71)
    # The room an image of this VM takes, from a first save of it (-S: its CPU never
    # runs, so two such QEMUs write the same device state).
    async with QemuVM(qemu_args(ram, d / "a-cli.sock", extra=("-S",)), d, name="a"):
        vm_cli(daemon, d / "a-cli.sock", "save", str(image))
    used = os.stat(image).st_blocks * 512
    with open(image, "rb") as f:
        header = vm_image.read_header(f.fileno(), str(image))
    assert len(vm_image.encode(header).rstrip(b"\0")) > PAGE  # the digest is on page 2
    image.unlink()
    image.write_bytes(b"the previous image")
    # Room for both parts and the header's first page, not its second.
    st = os.statvfs(tmpfs_80m)
    room = used - vm_image.HEADER_AREA + PAGE
    filler = st.f_bavail * st.f_frsize - room
    subprocess.run(["fallocate", "-l", str(filler), str(tmpfs_80m / "filler")], check=True)
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=("-S",)), d, name="b") as qemu:
        result = vm_cli(daemon, d / "b-cli.sock", "save", str(image), check=False)
        assert result.returncode == 1, result.stdout
        # The write that failed was to the temporary file beside IMAGE: named, and what
        # is left said (before: "IMAGE: No space left on device", as if IMAGE were hit).
        tmp = re.escape(f"{tmpfs_80m}/") + r"\.vm\.img\.[0-9a-f]{8}\.migd-vm-tmp"
        assert re.search(
            rf"{tmp} \(the image being written\): No space left on device: the old image "
            rf"{re.escape(str(image))} is kept, untouched; the temporary file was removed",
            result.stderr,
        ), result.stderr
        # Not started (it had not run): QEMU calls a VM whose part it wrote postmigrate.
        assert await status(qemu) == "postmigrate"
    assert image.read_bytes() == b"the previous image"
    assert sorted(p.name for p in tmpfs_80m.iterdir()) == ["filler", "vm.img"]


async def test_a_disk_that_fills_up_as_the_ram_is_written_says_what_is_left(
    daemon: DaemonProcess, short_dir: Path, shm: Path, tmpfs_80m: Path
) -> None:
    """migd's RAM part fails on the full disk: its error names the temporary file, and
    the CLI adds what is left (before: nothing said of IMAGE or of the temporary file)."""
    d, image = short_dir, tmpfs_80m / "vm.img"
    ram = shm / "guest-ram"
    fill_random(ram, SIZE, seed=72)
    st = os.statvfs(tmpfs_80m)
    filler = st.f_bavail * st.f_frsize - SIZE // 2  # room for half the RAM
    subprocess.run(["fallocate", "-l", str(filler), str(tmpfs_80m / "filler")], check=True)
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=("-S",)), d, name="b"):
        result = vm_cli(daemon, d / "b-cli.sock", "save", str(image), check=False)
        assert result.returncode == 1, result.stdout
        tmp = re.escape(f"{tmpfs_80m}/") + r"\.vm\.img\.[0-9a-f]{8}\.migd-vm-tmp"
        assert re.search(
            rf"Could not write '{tmp}': No space left on device: {re.escape(str(image))} was "
            r"not created; the temporary file was removed",
            result.stderr,
        ), result.stderr
    assert sorted(p.name for p in tmpfs_80m.iterdir()) == ["filler"]
