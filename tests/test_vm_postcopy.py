"""`migd vm restore --postcopy` against real QEMU processes (docs/postcopy.md).

The CLI is QEMU's migration source: it sends the image's device state repackaged for
postcopy, lets QEMU start the guest, then streams the RAM and serves the pages QEMU asks
for. What must hold: the RAM QEMU ends up with is the saved RAM byte for byte (zero pages,
which are never sent unless asked for, included); QEMU's settings are put back; a page
of the image that does not match its checksum never reaches the guest and ends the
command in an error, never in `completed`. tests/test_vm_guest.py resumes a real Linux
guest this way.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from migd.errors import FormatError
from migd.migration.mapped_ram import format as fmt
from migd.tools import postcopy_stream as ps
from migd.tools import vm_image

from .conftest import DaemonProcess, fill_random
from .qemu_vm import QemuVM, requires_qemu
from .test_vm import INCOMING, SIZE, qemu_args, status, vm_cli

MiB = 1 << 20
PAGE = 4096


async def _caps(vm: QemuVM) -> dict[str, bool]:
    return {c["capability"]: c["state"] for c in await vm.cmd("query-migrate-capabilities")}


async def _saved(daemon: DaemonProcess, setup: dict[str, Path]) -> bytes:
    """A firmware-only VM on random RAM with zero pages (a zeroed 8 MiB run and single
    pages), saved with --quit; the RAM file it had then."""
    ram, d = setup["ram"], setup["dir"]
    fill_random(ram, SIZE, seed=5)
    with open(ram, "r+b") as f:
        f.seek(32 * MiB)
        f.write(bytes(8 * MiB))
        for page in range(48 * MiB // PAGE, 56 * MiB // PAGE, 3):
            f.seek(page * PAGE)
            f.write(bytes(PAGE))
    async with QemuVM(qemu_args(ram, d / "a-cli.sock"), d, name="a"):
        vm_cli(daemon, d / "a-cli.sock", "save", "--quit", str(setup["image"]))
    return ram.read_bytes()


@requires_qemu
async def test_a_postcopy_restore_gives_qemu_the_saved_ram_byte_for_byte(
    daemon: DaemonProcess, setup: dict[str, Path]
) -> None:
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    saved = await _saved(daemon, setup)
    assert saved[32 * MiB : 40 * MiB] == bytes(8 * MiB)
    fill_random(ram, SIZE, seed=99)  # a new guest's RAM file: garbage where zeros belong
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d, name="b") as vm:
        before = await _caps(vm)
        out = vm_cli(daemon, d / "b-cli.sock", "restore", "--postcopy", "--paused", "--json",
                     str(image)).stdout  # fmt: skip
        summary = json.loads(out)
        assert summary["postcopy"] is True
        # A paused guest asks for nothing; a device state's load may (kvm-tpr-opt reads
        # the option ROM area): every request names at least one page.
        assert 0 <= summary["page-requests"] <= summary["pages-requested"], summary
        seconds = summary["seconds"]
        # The downtime ends when the guest can run, before all of its RAM is in.
        assert 0 < seconds["downtime"] < seconds["ram"], seconds
        assert (await vm.cmd("query-migrate"))["status"] == "completed"
        assert await status(vm) == "paused"
        assert ram.read_bytes() == saved
        assert await _caps(vm) == before  # postcopy-ram and the events put back
        await vm.cmd("cont")
        assert await status(vm) == "running"


@requires_qemu
async def test_a_page_that_fails_its_checksum_never_reaches_the_guest(
    daemon: DaemonProcess, setup: dict[str, Path]
) -> None:
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    saved = await _saved(daemon, setup)
    with open(image, "r+b") as f:
        header = vm_image.read_header(f.fileno(), str(image))
        size = os.fstat(f.fileno()).st_size
        parsed = fmt.parse_stream(
            lambda at, n: os.pread(f.fileno(), n, at), header.ram.offset, size
        )
        damaged = 20 * MiB + 5 * PAGE  # a page of the guest's RAM
        at = parsed.blocks[0].pages_offset + damaged + 100
        byte = os.pread(f.fileno(), 1, at)
        os.pwrite(f.fileno(), bytes([byte[0] ^ 0x40]), at)
    fill_random(ram, SIZE, seed=98)
    async with QemuVM(qemu_args(ram, d / "b-cli.sock", extra=INCOMING), d, name="b") as vm:
        result = vm_cli(daemon, d / "b-cli.sock", "restore", "--postcopy", "--paused",
                        str(image), check=False)  # fmt: skip
        assert result.returncode == 1, result.stdout
        assert "checksum mismatch" in result.stderr, result.stderr
        assert "after the guest started" in result.stderr and "quit this QEMU" in result.stderr
        assert "completed" not in result.stdout
        assert (await vm.cmd("query-migrate"))["status"] != "completed"
    unit = damaged // MiB * MiB
    got = ram.read_bytes()[unit : unit + MiB]
    assert got != saved[unit : unit + MiB]  # not sent: neither the damaged nor the saved unit
    assert got == bytes(MiB)  # a hole of the file QEMU punched


@requires_qemu
async def test_postcopy_refuses_a_mismatched_qemu_before_anything_is_written(
    daemon: DaemonProcess, setup: dict[str, Path]
) -> None:
    ram, d, image = setup["ram"], setup["dir"], setup["image"]
    await _saved(daemon, setup)
    fill_random(ram, SIZE // 2, seed=97)
    before = ram.read_bytes()
    args = qemu_args(ram, d / "b-cli.sock", size=SIZE // 2, extra=INCOMING)
    async with QemuVM(args, d, name="b") as vm:
        result = vm_cli(daemon, d / "b-cli.sock", "restore", "--postcopy", str(image),
                        check=False)  # fmt: skip
        assert result.returncode == 1
        assert f"memory backend 'ram0' has {SIZE // 2} bytes" in result.stderr
        assert await status(vm) == "inmigrate"
        assert not (await _caps(vm))["postcopy-ram"]
    assert ram.read_bytes() == before


# --- the device state taken apart (no QEMU needed) -------------------------------------------


def _device_state(*, caps: tuple[str, ...] = ("x-ignore-shared",), records: bytes = b"",
                  tail: bytes | None = None, vmdesc: bool = True) -> bytes:  # fmt: skip
    """A device state as QEMU writes one with x-ignore-shared: blocks 'ram0' (shared) and
    'pc.bios' (QEMU's own), `records` in its RAM part section, one device section."""
    out = bytearray(struct.pack(">II", fmt.QEVM_MAGIC, 3))
    out += struct.pack(">BI", fmt.VM_CONFIGURATION, 11) + b"pc-q35-10.0"
    if caps:
        name = b"configuration/capabilities"
        out += bytes([fmt.VM_SUBSECTION, len(name)]) + name + struct.pack(">II", 1, len(caps))
        for cap in caps:
            out += bytes([len(cap)]) + cap.encode()
    out += struct.pack(">BIB", fmt.VM_SECTION_START, 2, 3) + b"ram" + struct.pack(">II", 0, 4)
    blocks = [(b"ram0", 64 * MiB, 0), (b"pc.bios", 256 << 10, 0xFFFC0000)]
    out += struct.pack(">Q", sum(b[1] for b in blocks) | ps.FLAG_MEM_SIZE)
    for name, length, addr in blocks:
        out += bytes([len(name)]) + name + struct.pack(">QQ", length, addr)
    out += struct.pack(">QBI", ps.FLAG_EOS, fmt.VM_SECTION_FOOTER, 2)
    out += struct.pack(">BI", fmt.VM_SECTION_PART, 2) + records
    out += struct.pack(">QBI", ps.FLAG_EOS, fmt.VM_SECTION_FOOTER, 2)
    out += struct.pack(">BHH", fmt.VM_COMMAND, ps.CMD_SWITCHOVER_START, 0)
    out += struct.pack(">BIQBI", fmt.VM_SECTION_END, 2, ps.FLAG_EOS, fmt.VM_SECTION_FOOTER, 2)
    out += DEVICES if tail is None else tail
    out += bytes([fmt.VM_EOF])
    if vmdesc:
        desc = b'{"page_size": 4096, "devices": []}'
        out += bytes([fmt.VM_VMDESCRIPTION]) + struct.pack(">I", len(desc)) + desc
    return bytes(out)


DEVICES = struct.pack(">BIB", fmt.VM_SECTION_FULL, 0, 5) + b"timer" + bytes(39) + b"\x7e"
BIOS_PAGE = struct.pack(">Q", ps.FLAG_PAGE) + b"\x07pc.bios" + b"\xaa" * PAGE
BIOS_ZERO = struct.pack(">Q", PAGE | ps.FLAG_ZERO | ps.FLAG_CONTINUE) + b"\0"


def test_a_device_state_splits_into_blocks_records_and_devices() -> None:
    state = ps.split_device_state(_device_state(records=BIOS_PAGE + BIOS_ZERO))
    assert state.machine == b"pc-q35-10.0"
    blocks = [(b.name, b.length) for b in state.blocks]
    assert blocks == [("ram0", 64 * MiB), ("pc.bios", 256 << 10)]
    assert state.records == BIOS_PAGE + BIOS_ZERO
    assert state.record_blocks == {"pc.bios"}
    assert state.devices == DEVICES  # from the RAM end section up to EOF, not one byte more
    prefix = ps.PostcopyStream(state, "ram0").prefix()
    # No x-ignore-shared for the destination, no guest addresses in the block list.
    assert b"x-ignore-shared" not in prefix and b"configuration/" not in prefix
    assert b"\x04ram0" + struct.pack(">Q", 64 * MiB) + b"\x07pc.bios" in prefix
    # The order QEMU's postcopy source keeps: a discard before LISTEN, RUN last.
    discard = prefix.index(struct.pack(">BH", fmt.VM_COMMAND, ps.CMD_POSTCOPY_RAM_DISCARD))
    listen = prefix.index(struct.pack(">BHH", fmt.VM_COMMAND, ps.CMD_POSTCOPY_LISTEN, 0))
    assert prefix.index(BIOS_PAGE) < discard < listen < prefix.index(state.devices)
    assert prefix.endswith(struct.pack(">BHH", fmt.VM_COMMAND, ps.CMD_POSTCOPY_RUN, 0))


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"caps": ()}, "not x-ignore-shared alone"),
        ({"caps": ("x-ignore-shared", "mapped-ram")}, "not x-ignore-shared alone"),
        ({"records": struct.pack(">Q", 0x40) + b"\x04ram0"}, "flags 0x40"),
        ({"records": struct.pack(">Q", ps.FLAG_PAGE) + b"\x03vga" + bytes(PAGE)},
         "not in the list"),
        ({"tail": b""}, "no device sections"),
        ({"vmdesc": False}, "does not end with EOF and QEMU's vmdescription"),
    ],
)
def test_a_device_state_migd_cannot_pass_on_is_refused_saying_why(
    kwargs: dict[str, object], text: str
) -> None:
    with pytest.raises(FormatError, match=text):
        ps.split_device_state(_device_state(**kwargs))  # type: ignore[arg-type]


def test_a_cut_short_device_state_is_refused() -> None:
    data = _device_state(records=BIOS_PAGE)
    for cut in (4, 30, 200, 4000):
        with pytest.raises(FormatError):
            ps.split_device_state(data[:cut])
