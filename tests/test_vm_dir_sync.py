"""`migd vm save` whose fsync of IMAGE's directory fails after the rename of its
temporary file over IMAGE: the image is complete and its content synced, only the
rename's durability is in doubt. The save said it failed and ran the guest again while
the new image was in place all the same (session 9b). Real QEMU, a real migd daemon, a
FUSE filesystem (test_faults' FaultFS) that renames and fails every FSYNCDIR."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from migd.tools import vm_image

from .conftest import DaemonProcess, fill_random
from .qemu_vm import QemuVM, requires_qemu
from .test_faults import FaultFS, _Errno, mounted_fuse
from .test_vm import SIZE, qemu_args, status, vm_cli

pytestmark = requires_qemu

F_RENAME, F_FSYNCDIR = 12, 30


class DirSyncFailFS(FaultFS):
    """FaultFS with RENAME (flat: within its one directory), and FSYNCDIR failing (EIO).
    An FSYNCDIR answered ENOSYS would make the kernel report success from then on."""

    def _handle(self, op: int, node: int, body: memoryview) -> bytes:
        if op == F_RENAME:  # struct fuse_rename_in (newdir), old name, new name
            old, new = (
                n.decode("utf-8", "surrogateescape") for n in bytes(body[8:]).split(b"\0")[:2]
            )
            (self.backing / old).rename(self.backing / new)
            moved = self._names.pop(old)
            self._paths.pop(self._names.pop(new, 0), None)
            self._names[new], self._paths[moved] = moved, str(self.backing / new)
            return b""
        if op == F_FSYNCDIR:
            self.failures += 1
            raise _Errno(errno.EIO)
        return super()._handle(op, node, body)


@pytest.fixture
def dirsyncfail(short_dir: Path) -> Iterator[DirSyncFailFS]:
    yield from mounted_fuse(short_dir, "f", DirSyncFailFS)


async def test_a_failed_directory_sync_after_the_rename_says_the_image_is_saved(
    daemon: DaemonProcess, short_dir: Path, shm: Path, dirsyncfail: DirSyncFailFS
) -> None:
    d, image = short_dir, dirsyncfail.mountpoint / "vm.img"
    ram = shm / "guest-ram"
    fill_random(ram, SIZE, seed=73)
    image.write_bytes(b"the previous image")
    async with QemuVM(qemu_args(ram, d / "cli.sock"), d, name="a") as qemu:
        result = vm_cli(daemon, d / "cli.sock", "save", "--quit", str(image), check=False)
        assert dirsyncfail.failures >= 1
        assert result.returncode == 1, result.stdout
        assert (
            f"{image} is saved, complete and its content synced, but syncing its directory "
            "failed (Input/output error): the new name may not survive a crash (it would "
            "then be the old image again)" in result.stderr
        ), result.stderr
        assert "QEMU was not quit: the VM is paused" in result.stderr, result.stderr
        assert "save failed" not in result.stderr, result.stderr
        # Kept as the image holds it: stopped, not run again, not quit.
        assert await status(qemu) in ("paused", "postmigrate")
    with open(image, "rb") as f:
        vm_image.read_header(f.fileno(), str(image))  # the new image, whole
    assert sorted(p.name for p in dirsyncfail.backing.iterdir()) == ["vm.img"]
