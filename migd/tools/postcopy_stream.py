"""QEMU's migration stream as a postcopy source writes it (`migd vm restore --postcopy`).

A VM image's device state is QEMU's own precopy stream, saved with x-ignore-shared
(docs/vm-image.md): the stream header and configuration, the RAM section's block list
(each block with its guest address), the pages of the small RAM blocks QEMU keeps itself
(firmware, ROMs, ACPI tables), then the devices' sections and EOF. `split_device_state`
takes it apart; `PostcopyStream` puts it together again as QEMU's postcopy source sends
it (migration/savevm.c, ram.c; checked against a QEMU 10 postcopy migration captured
between two QEMUs, docs/postcopy.md):

    QEVM, version, configuration (the machine type, without x-ignore-shared)
    OPEN_RETURN_PATH, POSTCOPY_ADVISE (page sizes)
    RAM SECTION_START: the block list, no guest addresses (x-ignore-shared is off)
    RAM SECTION_PART: the small blocks' pages, as saved (loaded before LISTEN, as precopy)
    PACKAGED: LISTEN, the devices' sections as saved, RUN     <- the guest may run from here
    RAM SECTION_PART: the shared blocks' pages, from migd's RAM part, served on demand too
    RAM SECTION_END, EOF

Device sections carry no lengths (only the vmdescription after EOF describes them), but
they need not be parsed: they sit between the RAM end section and EOF, and EOF is the byte
before the vmdescription, whose length is known from the end of the part.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import FormatError
from ..migration.mapped_ram import format as fmt
from ..pages import PAGE_SIZE

# QEMU's migration commands (migration/savevm.h, enum qemu_vm_cmd; QEMU >= 5.0 numbering).
CMD_OPEN_RETURN_PATH = 1
CMD_POSTCOPY_ADVISE = 3
CMD_POSTCOPY_LISTEN = 4
CMD_POSTCOPY_RUN = 5
CMD_POSTCOPY_RAM_DISCARD = 6
CMD_PACKAGED = 7
CMD_SWITCHOVER_START = 11  # QEMU >= 10 sends it before the devices: nothing for us to pass on

# Return-path messages (migration/migration.h, enum mig_rp_message_type).
RP_SHUT = 1
RP_PONG = 2
RP_REQ_PAGES_ID = 3
RP_REQ_PAGES = 4

# RAM record flags (migration/ram.c RAM_SAVE_FLAG_*), in the low bits of a page offset.
FLAG_ZERO = 0x02
FLAG_MEM_SIZE = 0x04
FLAG_PAGE = 0x08
FLAG_EOS = 0x10
FLAG_CONTINUE = 0x20
FLAG_MULTIFD_FLUSH = 0x200
_FLAGS_MASK = PAGE_SIZE - 1
_KNOWN_FLAGS = FLAG_ZERO | FLAG_PAGE | FLAG_EOS | FLAG_CONTINUE | FLAG_MULTIFD_FLUSH

_BE64 = struct.Struct(">Q")
_COMMAND = struct.Struct(">BHH")
_SECTION = struct.Struct(">BI")
_FOOTER = struct.Struct(">BI")
IGNORE_SHARED = "x-ignore-shared"


@dataclass(frozen=True)
class SavedBlock:
    name: str  # QEMU's RAMBlock idstr
    length: int


@dataclass(frozen=True)
class DeviceState:
    """A saved device state taken apart."""

    machine: bytes  # the configuration section's machine type ("pc-q35-10.0")
    section_id: int  # the RAM section's id, instance and version: the destination's own
    instance: int
    version: int
    blocks: tuple[SavedBlock, ...]  # every RAM block, in QEMU's order
    records: bytes  # the small blocks' RAM records, as saved (EOS and flushes dropped)
    record_blocks: frozenset[str]  # the blocks those records name
    devices: bytes  # the devices' sections, from after the RAM end section to EOF


def _records(cur: fmt.Cursor, out: bytearray, names: set[str]) -> None:
    """Copy a RAM section's records up to its EOS into `out`; record the blocks named."""
    while True:
        start = cur.pos
        value = cur.be64()
        flags = value & _FLAGS_MASK
        if flags & ~_KNOWN_FLAGS:
            raise FormatError(
                f"RAM record with flags {flags:#x} at offset {start}: not a stream migd can "
                "pass on (compression, xbzrle or RDMA)"
            )
        if flags & FLAG_EOS:
            return
        if flags == FLAG_MULTIFD_FLUSH:
            continue
        if not flags & FLAG_CONTINUE:
            names.add(cur.str8("RAM block name"))
        if flags & FLAG_ZERO:
            cur.take(1)
        elif flags & FLAG_PAGE:
            cur.take(PAGE_SIZE)
        else:
            raise FormatError(f"RAM record with flags {flags:#x} at offset {start}")
        out += cur.read_at(start, cur.pos - start)


def _footer(cur: fmt.Cursor, section_id: int) -> None:
    mark, got = _FOOTER.unpack(cur.take(_FOOTER.size))
    if mark != fmt.VM_SECTION_FOOTER or got != section_id:
        raise FormatError(f"RAM section {section_id} has no footer at offset {cur.pos - 5}")


def _end_of_devices(data: bytes) -> int:
    """The offset of the EOF byte: right before the vmdescription, which ends the part."""
    # The vmdescription is a few KiB of JSON; its be32 length says where it starts.
    for at in range(len(data) - 5, max(-1, len(data) - (16 << 20)), -1):
        if data[at] != fmt.VM_VMDESCRIPTION:
            continue
        (size,) = struct.unpack_from(">I", data, at + 1)
        if at + 5 + size == len(data) and data[at + 5 : at + 6] == b"{":
            if at == 0 or data[at - 1] != fmt.VM_EOF:
                break
            return at - 1
    raise FormatError(
        "the device state does not end with EOF and QEMU's vmdescription: it cannot be "
        "passed on for postcopy (a QEMU that suppresses the vmdescription?)"
    )


def split_device_state(data: bytes) -> DeviceState:
    """Take a saved device state (QEMU's stream, x-ignore-shared on) apart; FormatError
    says what does not fit."""
    cur = fmt.Cursor(lambda at, n: data[at : at + n], 0, len(data))
    magic, version = cur.unpack(">II")
    if magic != fmt.QEVM_MAGIC or version != fmt.STREAM_VERSION:
        raise FormatError("the device state is not a QEMU migration stream (no QEVM header)")
    kind = cur.u8()
    if kind != fmt.VM_CONFIGURATION:
        raise FormatError("the device state has no configuration section")
    cur.pos -= 1
    machine, caps = fmt.parse_configuration(cur)
    if IGNORE_SHARED not in caps or fmt.CAP_MAPPED_RAM in caps:
        raise FormatError(
            f"the device state was saved with capabilities {list(caps)}, not x-ignore-shared "
            "alone: not a `migd vm save` image"
        )
    kind, section_id = _SECTION.unpack(cur.take(_SECTION.size))
    name = cur.str8("section name")
    instance, version = cur.unpack(">II")
    if kind != fmt.VM_SECTION_START or name != "ram":
        raise FormatError(f"the device state's first section is {name!r}, not 'ram'")
    value = cur.be64()
    if value & _FLAGS_MASK != FLAG_MEM_SIZE:
        raise FormatError("the RAM section does not start with its block list")
    total, blocks = value & ~_FLAGS_MASK, []
    listed = 0
    while listed < total:
        block = SavedBlock(cur.str8("RAM block name"), cur.be64())
        cur.be64()  # its guest address, sent with x-ignore-shared only
        if block.length <= 0 or block.length % PAGE_SIZE:
            raise FormatError(f"RAM block {block.name!r} has length {block.length}")
        blocks.append(block)
        listed += block.length
    if listed != total:
        raise FormatError(f"the RAM blocks add up to {listed} bytes, the section says {total}")
    records, names = bytearray(), set[str]()
    _records(cur, records, names)
    _footer(cur, section_id)
    while True:
        at = cur.pos
        kind = cur.u8()
        if kind == fmt.VM_COMMAND:
            command, size = struct.unpack(">HH", cur.take(4))
            if command != CMD_SWITCHOVER_START or size:
                raise FormatError(f"unexpected command {command} at offset {at}")
            continue
        if kind not in (fmt.VM_SECTION_PART, fmt.VM_SECTION_END) or cur.be32() != section_id:
            raise FormatError(f"expected a RAM section at offset {at}, found {kind:#x}")
        _records(cur, records, names)
        _footer(cur, section_id)
        if kind == fmt.VM_SECTION_END:
            break
    start, end = cur.pos, _end_of_devices(data)
    if end <= start or data[start] != fmt.VM_SECTION_FULL:
        raise FormatError(f"no device sections after the RAM end section (offset {start})")
    known = {b.name for b in blocks}
    if not names <= known:
        raise FormatError(f"RAM records name blocks not in the list: {sorted(names - known)}")
    return DeviceState(
        machine.encode(), section_id, instance, version, tuple(blocks), bytes(records),
        frozenset(names), data[start:end],
    )  # fmt: skip


def command(cmd: int, payload: bytes = b"") -> bytes:
    return _COMMAND.pack(fmt.VM_COMMAND, cmd, len(payload)) + payload


def _str8(name: str) -> bytes:
    raw = name.encode()
    return bytes([len(raw)]) + raw


class PostcopyStream:
    """The bytes of the stream around the pages, for one saved device state."""

    def __init__(
        self, state: DeviceState, discard_block: str, page_size_summary: int = PAGE_SIZE
    ) -> None:
        self.state = state
        self.discard_block = discard_block  # a block whose pages come after LISTEN
        self.page_size_summary = page_size_summary

    def _section(self, kind: int, body: bytes) -> bytes:
        sid = self.state.section_id
        return _SECTION.pack(kind, sid) + body + _BE64.pack(FLAG_EOS) + _FOOTER.pack(
            fmt.VM_SECTION_FOOTER, sid
        )

    def prefix(self) -> bytes:
        """Everything up to the shared blocks' pages: once QEMU has read it all, the guest
        can run (RUN, in the package)."""
        s = self.state
        out = bytearray(struct.pack(">II", fmt.QEVM_MAGIC, fmt.STREAM_VERSION))
        out += struct.pack(">BI", fmt.VM_CONFIGURATION, len(s.machine)) + s.machine
        out += command(CMD_OPEN_RETURN_PATH)
        out += command(CMD_POSTCOPY_ADVISE, struct.pack(">QQ", self.page_size_summary, PAGE_SIZE))
        head = struct.pack(">BIB", fmt.VM_SECTION_START, s.section_id, 3) + b"ram"
        head += struct.pack(">II", s.instance, s.version)
        blocks = b"".join(_str8(b.name) + _BE64.pack(b.length) for b in s.blocks)
        total = sum(b.length for b in s.blocks)
        out += head + _BE64.pack(total | FLAG_MEM_SIZE) + blocks
        out += _BE64.pack(FLAG_EOS) + _FOOTER.pack(fmt.VM_SECTION_FOOTER, s.section_id)
        if s.records:
            out += self._section(fmt.VM_SECTION_PART, s.records)
        # One discard before LISTEN, as QEMU's source always sends: QEMU 10 going from
        # ADVISE straight to LISTEN (its "rare case") leaves its postcopy state at DISCARD,
        # and loads the pages that follow as precopy, writing into RAM registered with
        # userfaultfd: its listen thread then waits on its own fault. The page discarded is
        # a hole already (ADVISE punched the block) and comes after LISTEN anyway.
        name = self.discard_block.encode()
        discard = bytes([0, len(name)]) + name + b"\0" + struct.pack(">QQ", 0, PAGE_SIZE)
        out += command(CMD_POSTCOPY_RAM_DISCARD, discard)
        package = command(CMD_POSTCOPY_LISTEN) + s.devices + command(CMD_POSTCOPY_RUN)
        out += command(CMD_PACKAGED, struct.pack(">I", len(package))) + package
        return bytes(out)

    def part_start(self) -> bytes:
        return _SECTION.pack(fmt.VM_SECTION_PART, self.state.section_id)

    def part_end_and_eof(self) -> bytes:
        """Close the open PART section, then the END section and EOF."""
        sid = self.state.section_id
        return (
            _BE64.pack(FLAG_EOS) + _FOOTER.pack(fmt.VM_SECTION_FOOTER, sid)
            + self._section(fmt.VM_SECTION_END, b"") + bytes([fmt.VM_EOF])
        )  # fmt: skip


def page_header(offset: int, name: str | None) -> bytes:
    """A PAGE record's header: the block's name unless it is the one of the record before."""
    if name is None:
        return _BE64.pack(offset | FLAG_PAGE | FLAG_CONTINUE)
    return _BE64.pack(offset | FLAG_PAGE) + _str8(name)


def zero_record(offset: int, name: str | None) -> bytes:
    if name is None:
        return _BE64.pack(offset | FLAG_ZERO | FLAG_CONTINUE) + b"\0"
    return _BE64.pack(offset | FLAG_ZERO) + _str8(name) + b"\0"
