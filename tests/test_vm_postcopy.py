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
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from migd.errors import ChannelError, FormatError
from migd.io.checksums import ChecksumMismatch, unit_digest
from migd.io.digests import UNIT_PAGES
from migd.migration.mapped_ram import format as fmt
from migd.tools import postcopy_stream as ps
from migd.tools import vm_image
from migd.tools.postcopy import CHUNK_UNITS, PostcopyError, PostcopySource, ram_blocks

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


# --- the source's writer and return path, against a socket pair (no QEMU) --------------------


def _image_part(tmp: Path, pages: int, absent: set[int]) -> tuple[int, fmt.BlockLayout, bytes]:
    """A file with `pages` pages of random data at 1 MiB (absent ones left holes): its fd,
    the block's layout and the data the present pages hold (zeros for absent ones)."""
    rng = np.random.default_rng(7)
    data = bytearray(rng.integers(0, 256, pages * PAGE, dtype=np.uint8).tobytes())
    for page in absent:
        data[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
    path = tmp / "ram.part"
    with open(path, "wb") as f:
        for page in range(pages):
            if page not in absent:
                f.seek(MiB + page * PAGE)
                f.write(data[page * PAGE : (page + 1) * PAGE])
        f.truncate(MiB + pages * PAGE)
    layout = fmt.BlockLayout("pc.ram", pages * PAGE, 0, 0, MiB)
    return os.open(path, os.O_RDONLY), layout, bytes(data)


def _digests(data: bytes, present: np.ndarray) -> bytes:
    def source(page: int, count: int) -> bytes:
        return data[page * PAGE : (page + count) * PAGE]

    out = b""
    for unit in range(0, present.size, UNIT_PAGES):
        out += unit_digest(present[unit : unit + UNIT_PAGES], unit, source)
    return out


def _records(stream: bytes) -> list[tuple[int, int, bytes]]:
    """(flags, page, payload) of the RAM records up to EOS."""
    out, at = [], 0
    while True:
        (value,) = struct.unpack_from(">Q", stream, at)
        at += 8
        flags, offset = value & 0xFFF, value & ~0xFFF
        if flags & ps.FLAG_EOS:
            return out
        if not flags & ps.FLAG_CONTINUE:
            at += 1 + stream[at]
        size = PAGE if flags & ps.FLAG_PAGE else 1
        out.append((flags & (ps.FLAG_PAGE | ps.FLAG_ZERO), offset // PAGE, stream[at : at + size]))
        at += size


def _run_source(
    tmp: Path, absent: set[int], requests: list[tuple[int, int]], flip: int | None = None,
    units: int = 3, cut: int | None = None,
) -> tuple[bytes, bytes, ps.PostcopyStream, BaseException | None]:
    pages = units * UNIT_PAGES
    fd, layout, data = _image_part(tmp, pages, absent)
    present = np.ones(pages, dtype=bool)
    present[list(absent)] = False
    digests = _digests(data, present)
    if flip is not None:  # a byte of the file, not of the data the checksums were made of
        byte = os.pread(fd, 1, MiB + flip)
        with open(tmp / "ram.part", "r+b") as f:
            f.seek(MiB + flip)
            f.write(bytes([byte[0] ^ 1]))
    if cut is not None:  # the image cut short after the checks: `cut` bytes of pages left
        os.truncate(tmp / "ram.part", MiB + cut)
    state = ps.split_device_state(_device_state(records=BIOS_PAGE))
    stream = ps.PostcopyStream(state, "ram0")
    ours, theirs = socket.socketpair()
    blocks = ram_blocks(["ram0"], [layout], [present], [digests])
    source = PostcopySource(ours, stream, blocks, fd, str(tmp / "ram.part"))
    for start, count in requests:  # as the return-path reader queues them
        source.requests.put((0, start, count))
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(_read_all(theirs)))
    reader.start()
    error = None
    try:
        source.send()
    except BaseException as exc:  # handed to the test
        error = exc
    ours.close()
    reader.join()
    theirs.close()
    os.close(fd)
    return bytes(got), data, stream, error


def _read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 20):
        out += chunk
    return bytes(out)


def test_the_writer_sends_each_present_page_once_and_asked_for_zeros_as_zero_records(
    short_dir: Path,
) -> None:
    absent = {5, 300, 301, 700}
    # QEMU asked for an absent page twice (overlapping) and for a present page.
    got, data, stream, error = _run_source(short_dir, absent, [(300, 2), (299, 3), (600, 1)])
    assert error is None
    prefix = stream.prefix() + stream.part_start()
    assert got.startswith(prefix)
    records = _records(got[len(prefix) :])
    pages = [page for _, page, _ in records]
    assert len(pages) == len(set(pages))  # none twice: QEMU cannot place a page twice
    sent = {page: (flags, payload) for flags, page, payload in records}
    assert set(sent) == (set(range(3 * UNIT_PAGES)) - absent) | {300, 301}
    assert sent[300] == (ps.FLAG_ZERO, b"\0") and sent[301] == (ps.FLAG_ZERO, b"\0")
    for page in set(sent) - {300, 301}:
        assert sent[page] == (ps.FLAG_PAGE, data[page * PAGE : (page + 1) * PAGE]), page
    # The pages asked for come first: the whole units around them, before the rest.
    assert pages.index(300) < pages.index(0) and pages.index(600) < pages.index(0)
    assert got.endswith(stream.part_end_and_eof()[8:])


def test_a_request_larger_than_the_writers_buffer_is_served_whole(short_dir: Path) -> None:
    units = CHUNK_UNITS + 2  # one request for all of it: more than one buffer's read
    got, data, stream, error = _run_source(short_dir, {3}, [(0, units * UNIT_PAGES)], units=units)
    assert error is None
    records = _records(got[len(stream.prefix()) + 5 :])
    pages = [page for _, page, _ in records]
    assert sorted(pages) == list(range(units * UNIT_PAGES))  # every page, once
    for flags, page, payload in records:
        page_data = data[page * PAGE : (page + 1) * PAGE]
        want = (ps.FLAG_ZERO, b"\0") if page == 3 else (ps.FLAG_PAGE, page_data)
        assert (flags, payload) == want, page


def test_a_unit_that_fails_its_checksum_stops_the_writer_before_any_of_its_pages(
    short_dir: Path,
) -> None:
    flipped = UNIT_PAGES + 10  # a page of the second unit
    got, _, stream, error = _run_source(short_dir, set(), [], flip=flipped * PAGE + 7)
    assert isinstance(error, ChecksumMismatch), error
    assert "checksum mismatch in ramblock 'pc.ram'" in error.desc
    pages = [page for _, page, _ in _records_until_cut(got[len(stream.prefix()) + 5 :])]
    assert not any(UNIT_PAGES <= page < 2 * UNIT_PAGES for page in pages)
    assert stream.part_end_and_eof() not in got  # no end: QEMU never sees a whole stream


def test_an_image_cut_short_while_it_streams_ends_the_stream_naming_the_file(
    short_dir: Path,
) -> None:
    # The image was whole when checked; it is cut short inside the second buffer's read.
    units = CHUNK_UNITS + 2
    cut_page = (CHUNK_UNITS + 1) * UNIT_PAGES + 3
    got, data, stream, error = _run_source(short_dir, set(), [], units=units, cut=cut_page * PAGE)
    assert isinstance(error, ChannelError), error
    assert str(short_dir / "ram.part") in error.desc and "file ends at offset" in error.desc
    records = _records_until_cut(got[len(stream.prefix()) + 5 :])
    sent = {page: payload for _, page, payload in records}
    first_read = CHUNK_UNITS * UNIT_PAGES
    assert sorted(sent) == list(range(first_read))  # the first read's pages, then nothing
    for page, payload in sent.items():
        assert payload == data[page * PAGE : (page + 1) * PAGE], page
    assert stream.part_end_and_eof() not in got  # no end: QEMU never sees a whole stream


def _records_until_cut(stream: bytes) -> list[tuple[int, int, bytes]]:
    """The whole records of a stream cut off mid-way (no EOS)."""
    try:
        return _records(stream)
    except struct.error:
        pass
    out, at = [], 0
    while at + 8 <= len(stream):
        (value,) = struct.unpack_from(">Q", stream, at)
        flags = value & 0xFFF
        head = 8 + (0 if flags & ps.FLAG_CONTINUE else 1 + stream[at + 8])
        size = PAGE if flags & ps.FLAG_PAGE else 1
        if at + head + size > len(stream):
            break
        out.append((flags, (value & ~0xFFF) // PAGE, stream[at + head : at + head + size]))
        at += head + size
    return out


def _return_path(source: PostcopySource, messages: bytes) -> BaseException | None:
    """Feed QEMU's return path `messages`, then its end; what the reader queued last."""
    peer = source.sock
    other = source._other  # type: ignore[attr-defined]
    other.sendall(messages)
    other.shutdown(socket.SHUT_WR)
    try:
        source.read_return_path()
    except BaseException as exc:  # the test looks at it
        return exc
    finally:
        peer.close()
        other.close()
    return None


def _bare_source(short_dir: Path) -> PostcopySource:
    fd, layout, _ = _image_part(short_dir, UNIT_PAGES, set())
    os.close(fd)
    ours, theirs = socket.socketpair()
    state = ps.split_device_state(_device_state(records=BIOS_PAGE))
    blocks = ram_blocks(["ram0"], [layout], [np.ones(UNIT_PAGES, dtype=bool)], None)
    source = PostcopySource(ours, ps.PostcopyStream(state, "ram0"), blocks, -1, "x")
    source._other = theirs  # type: ignore[attr-defined]
    return source


def _rp(kind: int, body: bytes) -> bytes:
    return struct.pack(">HH", kind, len(body)) + body


def _req_id(start: int, length: int, name: bytes) -> bytes:
    return _rp(ps.RP_REQ_PAGES_ID, struct.pack(">QIB", start, length, len(name)) + name)


@pytest.mark.parametrize(
    "messages, text",
    [
        (_req_id(0, PAGE, b"vga.vram"), "unknown RAM block 'vga.vram'"),
        (_req_id(0, PAGE, b"pc.bios"), "which the device state loaded"),
        (_req_id(MiB - PAGE, 2 * PAGE, b"ram0"), "asked for bytes"),
        (_req_id(100, PAGE, b"ram0"), "asked for bytes"),
        (_rp(ps.RP_REQ_PAGES, struct.pack(">QI", 0, PAGE)), "before naming their RAM block"),
        (_rp(7, b""), "return-path message 7"),
        (_rp(ps.RP_REQ_PAGES, b"\0\0"), "return-path message 4"),
        (struct.pack(">HH", ps.RP_PONG, 4) + b"\0", "in the middle of a message"),
    ],
)
def test_what_a_qemu_asks_outside_its_blocks_ends_the_stream_saying_what(
    short_dir: Path, messages: bytes, text: str
) -> None:
    source = _bare_source(short_dir)
    error = _return_path(source, messages)
    assert isinstance(error, PostcopyError) and text in str(error), error
    queued = source.requests.get_nowait()
    assert queued is error  # the writer raises it at its next look


def test_requests_are_queued_for_the_writer_and_shut_ends_the_return_path(
    short_dir: Path,
) -> None:
    source = _bare_source(short_dir)
    messages = (
        _rp(ps.RP_PONG, b"\0\0\0\1") + _req_id(8 * PAGE, 2 * PAGE, b"ram0")
        + _rp(ps.RP_REQ_PAGES, struct.pack(">QI", 0, PAGE))
        + _rp(ps.RP_SHUT, b"\0\0\0\0")
    )  # fmt: skip
    assert _return_path(source, messages) is None
    assert source.shut == 0
    assert [source.requests.get_nowait() for _ in range(2)] == [(0, 8, 2), (0, 0, 1)]
