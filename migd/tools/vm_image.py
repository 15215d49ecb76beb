"""The whole-VM image of `migd vm save` (docs/vm-image.md): one file, three parts.

    [0, HEADER_AREA)        the header: magic, version, JSON body, SHA-256 of both
    [HEADER_AREA, ...)      QEMU's device state: its own migration stream, written by
                            QEMU with x-ignore-shared (the shared RAM is left out)
    [ram offset, end)       migd's mapped-ram save of the guest's RAM backends, at a
                            1 MiB-aligned offset after the device state

The header is written last, after both parts are durable: a file without a valid header
is an interrupted save, never a VM to resume. It ties the parts together (the device
state's SHA-256, the RAM part's save id and the digest of its checksum table) and to the
VM they came from (QEMU's version and machine type, each backend's id and size), so that
`migd vm restore` refuses a mismatched or damaged image before it writes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"\x89MIGDVM\n"  # a high-bit byte and a newline: mangled copies are caught, as PNG's
VERSION = 1
HEADER_AREA = 64 << 10  # the header's room; the device state starts here
RAM_ALIGN = 1 << 20  # the RAM part's offset: its pages stay 1 MiB aligned for O_DIRECT
# A live save writes the RAM part before the device state exists: it leaves this much
# room for it (a hole until then; device states without shared RAM take a few MiB).
LIVE_RAM_OFFSET = 64 << 20
_FIXED = struct.Struct(">8sII")  # magic, version, length of the JSON body
DIGEST_BYTES = 32  # SHA-256 of the fixed part and the body, right after the body
_PART_MAGIC = b"QEVM"  # how both parts start: QEMU's stream, and migd's mapped-ram save


class ImageError(Exception):
    """The file is not a complete, intact VM image (the text names the file)."""


@dataclass
class DevicePart:
    offset: int
    length: int
    sha256: str


@dataclass
class RamPart:
    offset: int
    length: int
    save_id: str
    table_digest: str | None  # the digest of the RAM part's checksum table, if it has one


@dataclass
class BackendEntry:
    id: str  # QEMU's memory backend id
    block: str  # the RAM part's block of this backend
    size: int
    mem_path: str  # where it was saved from (shown, not required on restore)


@dataclass
class ImageHeader:
    image_id: str
    created: str
    qemu_version: str
    machine: str
    device: DevicePart
    ram: RamPart
    backends: list[BackendEntry] = field(default_factory=list)
    migd_version: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "image-id": self.image_id,
            "created": self.created,
            "migd-version": self.migd_version,
            "qemu": {"version": self.qemu_version, "machine": self.machine},
            "device-state": {
                "offset": self.device.offset,
                "length": self.device.length,
                "sha256": self.device.sha256,
            },
            "ram": {
                "offset": self.ram.offset,
                "length": self.ram.length,
                "save-id": self.ram.save_id,
                "table-digest": self.ram.table_digest,
            },
            "backends": [
                {"id": b.id, "block": b.block, "size": b.size, "mem-path": b.mem_path}
                for b in self.backends
            ],
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ImageHeader:
        """Raises KeyError, TypeError or ValueError for a body that lacks a member."""
        qemu, dev, ram = body["qemu"], body["device-state"], body["ram"]
        header = cls(
            image_id=_str(body["image-id"]),
            created=_str(body["created"]),
            migd_version=_str(body.get("migd-version", "")),
            qemu_version=_str(qemu["version"]),
            machine=_str(qemu["machine"]),
            device=DevicePart(_int(dev["offset"]), _int(dev["length"]), _str(dev["sha256"])),
            ram=RamPart(
                _int(ram["offset"]),
                _int(ram["length"]),
                _str(ram["save-id"]),
                None if ram.get("table-digest") is None else _str(ram["table-digest"]),
            ),
            backends=[
                BackendEntry(_str(b["id"]), _str(b["block"]), _int(b["size"]), _str(b["mem-path"]))
                for b in body["backends"]
            ],
        )
        if header.device.offset < HEADER_AREA or header.ram.offset % RAM_ALIGN:
            raise ValueError("parts out of place")
        if header.device.offset + header.device.length > header.ram.offset:
            raise ValueError("the device state overlaps the RAM part")
        if not header.backends:
            raise ValueError("no backends")
        return header


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"{value!r} is not a size")
    return value


def ram_offset(device_end: int) -> int:
    """Where the RAM part starts: the first 1 MiB boundary at or after the device state."""
    return -(-device_end // RAM_ALIGN) * RAM_ALIGN


def encode(header: ImageHeader) -> bytes:
    """The header area's bytes (HEADER_AREA long, zero padded)."""
    body = json.dumps(header.to_json(), sort_keys=True, separators=(",", ":")).encode()
    head = _FIXED.pack(MAGIC, VERSION, len(body)) + body
    data = head + hashlib.sha256(head).digest()
    if len(data) > HEADER_AREA:
        raise ValueError(f"the image header needs {len(data)} bytes, more than {HEADER_AREA}")
    return data.ljust(HEADER_AREA, b"\0")


def is_image(fd: int) -> bool:
    """Whether the file starts with the image magic (intact or not)."""
    return os.pread(fd, len(MAGIC), 0) == MAGIC


def is_unfinished(fd: int) -> bool:
    """Whether the file is what a `vm save` that did not finish leaves: zeros where the
    header goes (it is written last) and a part after them (QEMU's stream, or the RAM
    part a live save writes first)."""
    if os.pread(fd, len(MAGIC), 0) != bytes(len(MAGIC)):
        return False
    return any(
        os.pread(fd, len(_PART_MAGIC), at) == _PART_MAGIC
        for at in (HEADER_AREA, LIVE_RAM_OFFSET)
    )


def decode(data: bytes, path: str) -> ImageHeader:
    """The header from the file's first bytes; ImageError says what is wrong."""
    if len(data) < _FIXED.size or data[: len(MAGIC)] != MAGIC:
        if data[: len(MAGIC)].strip(b"\0") == b"" and len(data) >= len(MAGIC):
            raise ImageError(
                f"'{path}': no image header: the save that wrote it did not finish "
                "(the header is written last)"
            )
        raise ImageError(f"'{path}' is not a migd VM image (no {MAGIC!r} magic)")
    _, version, length = _FIXED.unpack_from(data)
    if version != VERSION:
        raise ImageError(
            f"'{path}': VM image format version {version}; this migd reads version {VERSION}"
        )
    end = _FIXED.size + length
    if end + DIGEST_BYTES > min(len(data), HEADER_AREA):
        raise ImageError(f"'{path}': the image header is cut short or corrupt")
    if hashlib.sha256(data[:end]).digest() != data[end : end + DIGEST_BYTES]:
        raise ImageError(f"'{path}': the image header is corrupt (its SHA-256 does not match)")
    try:
        return ImageHeader.from_json(json.loads(data[_FIXED.size : end]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"'{path}': the image header is malformed ({exc})") from None
    except RecursionError:  # valid JSON nested thousands deep (its digest made to match)
        raise ImageError(f"'{path}': the image header is malformed (nested too deeply)") from None


def read_header(fd: int, path: str) -> ImageHeader:
    """The header of the open image, checked against the file's size."""
    header = decode(os.pread(fd, HEADER_AREA, 0), path)
    size = os.fstat(fd).st_size
    ram_end = header.ram.offset + header.ram.length
    if size < ram_end:
        raise ImageError(
            f"'{path}' is cut short: {size} bytes, but its RAM part ends at {ram_end} "
            "(the file is truncated)"
        )
    return header


def device_digest(fd: int, part: DevicePart) -> str:
    """SHA-256 of the device-state part as the file holds it now."""
    hasher = hashlib.sha256()
    at, end = part.offset, part.offset + part.length
    while at < end:
        chunk = os.pread(fd, min(4 << 20, end - at), at)
        if not chunk:
            break
        hasher.update(chunk)
        at += len(chunk)
    return hasher.hexdigest()
