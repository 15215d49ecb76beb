"""A real Linux guest suspended to one image by `migd vm save --quit` and resumed in a new
QEMU by `migd vm restore`, also with --postcopy (tests/guest.py builds it; TCG unless KVM
can boot it here).

The guest re-checks 64 MiB of tmpfs data and a rewritten 16 MiB region every round and
prints `tick N ok`: after the restore into a QEMU whose RAM file was filled with garbage,
the counter must go on rising from where it stopped, with no `CORRUPT` and no second
`guest: boot`. A QEMU of another size is refused, and its RAM file left as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import DaemonProcess, fill_random
from .guest import accelerator, guest_dir, qemu_args, ticks, wait_for_tick
from .qemu_vm import QemuVM, requires_qemu
from .test_vm import vm_cli

pytestmark = requires_qemu

RAM_MIB = 384
BOOT_TIMEOUT = 180.0  # TCG: the first tick comes 10-30 s after start on this machine


def with_cli_socket(args: list[str], sock: Path) -> list[str]:
    return [*args, "-qmp", f"unix:{sock},server=on,wait=off"]


# --live: the RAM is copied while the guest runs its checks (and rewrites its region),
# then only the units that changed are saved again once it is stopped. postcopy: the
# guest runs again before its RAM is back, asking for the pages it touches first.
@pytest.mark.parametrize(
    "live, postcopy", [(False, False), (True, False), (False, True)],
    ids=["stopped", "live", "postcopy"],
)  # fmt: skip
async def test_a_suspended_guest_resumes_in_a_new_qemu_and_its_memory_checks_pass(
    daemon: DaemonProcess, short_dir: Path, shm: Path, live: bool, postcopy: bool
) -> None:
    restore = ("restore", "--postcopy") if postcopy else ("restore",)
    guest_dir()
    accel = accelerator()
    ram, image = shm / "guest-ram", short_dir / "guest.img"
    first, second = short_dir / "first.serial", short_dir / "second.serial"
    args = with_cli_socket(qemu_args(ram, RAM_MIB, first, accel), short_dir / "a-cli.sock")
    async with QemuVM(args, short_dir, name="a") as vm:
        assert vm.proc is not None
        await wait_for_tick(first, 1, BOOT_TIMEOUT, vm.proc)
        flags = ("--live", "--quit") if live else ("--quit",)
        out = vm_cli(daemon, short_dir / "a-cli.sock", "save", *flags, str(image)).stdout
        assert "the VM is gone (quit)" in out
        assert ("live pass:" in out) == live
        assert vm.proc.wait(30) == 0
    last = ticks(first)[-1][0]

    fill_random(ram, RAM_MIB << 20, seed=3)  # whatever the new QEMU's RAM file holds
    args = qemu_args(ram, RAM_MIB, second, accel, incoming=True)
    async with QemuVM(with_cli_socket(args, short_dir / "b-cli.sock"), short_dir, name="b") as vm:
        assert vm.proc is not None
        out = vm_cli(daemon, short_dir / "b-cli.sock", *restore, str(image)).stdout
        assert ("(postcopy)" in out) == postcopy, out
        assert ("pages in" in out and "requests of QEMU's" in out) == postcopy, out
        assert (await vm.cmd("query-status"))["status"] == "running"
        assert (await vm.cmd("query-migrate"))["status"] == "completed"
        counter = await wait_for_tick(second, last + 1, BOOT_TIMEOUT, vm.proc)
        console = second.read_text(errors="replace")
        assert "guest: boot" not in console, console  # went on, not rebooted
        assert "CORRUPT" not in console
        assert counter > last + 1
        assert all(state == "ok" for _, state in ticks(second))
        # Nothing repeated; one tick may be split by the stop across the two consoles.
        assert last < ticks(second)[0][0] <= last + 2, console

    # A QEMU of another size is refused before anything is written.
    fill_random(ram, (RAM_MIB // 2) << 20, seed=4)
    before = ram.read_bytes()
    args = qemu_args(ram, RAM_MIB // 2, short_dir / "third.serial", accel, incoming=True)
    async with QemuVM(with_cli_socket(args, short_dir / "c-cli.sock"), short_dir, name="c") as vm:
        result = vm_cli(daemon, short_dir / "c-cli.sock", *restore, str(image), check=False)
        assert result.returncode == 1
        assert f"memory backend 'ram0' has {(RAM_MIB // 2) << 20} bytes" in result.stderr
        assert ram.read_bytes() == before
        assert (await vm.cmd("query-status"))["status"] == "inmigrate"
