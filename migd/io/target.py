"""Migration addresses: `file:PATH[,offset=N]` URIs and QAPI `channels`, QEMU's rules."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import MigrationError

_OTHER_TRANSPORTS = ("unix", "tcp", "fd", "exec", "rdma", "vsock")
_OFFSET = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)")


@dataclass(frozen=True)
class FileTarget:
    """Where a save goes or a restore comes from: a path and the stream's offset in it."""

    path: str
    offset: int = 0

    def __str__(self) -> str:
        return f"file:{self.path},offset={self.offset}" if self.offset else f"file:{self.path}"


class NotSeekable(MigrationError):
    """A transport other than file: was asked for a mapped-ram migration."""


def parse_offset(text: str) -> int:
    """Decimal or 0x-hex, as QEMU's qemu_strtosz accepts without a suffix."""
    if not _OFFSET.fullmatch(text):
        raise MigrationError(f"file URI has bad offset {text}: Invalid argument")
    return int(text, 16) if text[:2].lower() == "0x" else int(text, 10)


def parse_uri(uri: str) -> FileTarget:
    """Split a migration URI; only `file:` can carry a mapped-ram stream."""
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise MigrationError(f"unknown migration protocol: {uri}")
    if scheme in _OTHER_TRANSPORTS:
        raise NotSeekable("Migration requires seekable transport (e.g. file)")
    if scheme != "file":
        raise MigrationError(f"unknown migration protocol: {uri}")
    path, comma, option = rest.partition(",")
    offset = 0
    if comma:
        if not option.startswith("offset="):
            raise MigrationError(f"file URI has bad option '{option}': only offset= is known")
        offset = parse_offset(option[len("offset=") :])
    if not path:
        raise MigrationError("file URI has no path")
    return FileTarget(path, offset)
