"""migd as QEMU's postcopy source: a VM image's RAM streamed into a QEMU whose guest
already runs (`migd vm restore --postcopy`, docs/postcopy.md).

QEMU alone can start a guest before its RAM is back: it registers the RAM with
userfaultfd and asks its migration source for each page the guest touches first. Here
the source is this process: it writes the stream postcopy_stream.py describes into one
end of a socket pair whose other end QEMU reads (`migrate-incoming fd:`), and reads the
return path from the same socket.

One thread (`send`) writes: the prefix (the guest may run once QEMU has read it), then
the present pages of migd's RAM part in file order, 8 MiB at a time, each unit checked
against its checksum before any of its pages leaves (a damaged image stops the stream:
the guest never gets a page that does not match). Between pieces of about 1 MiB it serves
the pages QEMU asked for (the guest waits on them): their whole units, and absent pages
as zero records. No page is sent twice (QEMU cannot place a page twice). Absent pages not
asked for are never sent: QEMU punched its RAM files at POSTCOPY_ADVISE, and what it was
not sent reads as zeros once its postcopy ends. Another thread (`read_return_path`) turns
QEMU's requests into a queue for the writer.
"""

from __future__ import annotations

import contextlib
import mmap
import queue
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..io.checksums import ChecksumMismatch, mismatch_text, unit_digest
from ..io.digests import DIGEST_BYTES, UNIT_PAGES
from ..io.threads import read_fully
from ..migration.mapped_ram import format as fmt
from ..pages import PAGE_SIZE
from . import postcopy_stream as ps

CHUNK_UNITS = 8  # units read and checked at a time: 8 MiB
PIECE_PAGES = 256  # pages sent between looks at QEMU's requests: 1 MiB
_RECORD = 8 + PAGE_SIZE  # a PAGE record with CONTINUE: be64 offset|flags, the page
_RP_HEADER = struct.Struct(">HH")


class PostcopyError(Exception):
    """The stream could not go on; the text says why and what it leaves."""


@dataclass
class RamBlock:
    """One block of the image's RAM part, as the source sends it."""

    name: str  # QEMU's RAMBlock idstr, as the destination knows it
    layout: fmt.BlockLayout
    present: np.ndarray
    digests: bytes | None  # its part of the checksum table; None: the save has none
    sent: np.ndarray  # pages already sent (or being sent)

    @property
    def pages(self) -> int:
        return self.layout.pages


class SendCounters:
    """Counters the writer updates; read as a snapshot."""

    def __init__(self, blocks: Sequence[RamBlock]) -> None:
        self.bytes_total = sum(int(np.count_nonzero(b.present)) for b in blocks) * PAGE_SIZE
        self.bytes_sent = 0
        self.requests = 0  # QEMU's page requests served
        self.requested_pages = 0


class PostcopySource:
    def __init__(
        self,
        sock: socket.socket,
        stream: ps.PostcopyStream,
        blocks: Sequence[RamBlock],
        fd: int,
        path: str,
    ) -> None:
        self.sock, self.stream, self.blocks = sock, stream, list(blocks)
        self.fd, self.path = fd, path
        self.by_name = {b.name: i for i, b in enumerate(self.blocks)}
        self.other_blocks = {b.name for b in stream.state.blocks} - set(self.by_name)
        self.requests: queue.SimpleQueue[tuple[int, int, int] | BaseException] = (
            queue.SimpleQueue()
        )
        self.counters = SendCounters(self.blocks)
        self.shut: int | None = None  # QEMU's SHUT value: 0 all good
        self.cancel = threading.Event()
        self._buffer = mmap.mmap(-1, CHUNK_UNITS * UNIT_PAGES * PAGE_SIZE)  # aligned: O_DIRECT
        self._view = memoryview(self._buffer)
        self._last_block: str | None = None  # the block of the last record sent

    # -- the writer ----------------------------------------------------------------------

    def send(self) -> None:
        """Write the whole stream; raises PostcopyError, ChecksumMismatch or OSError."""
        try:
            self.sock.sendall(self.stream.prefix())
            self.sock.sendall(self.stream.part_start())
            for index, block in enumerate(self.blocks):
                units = -(-block.pages // UNIT_PAGES)
                for first in range(0, units, CHUNK_UNITS):
                    self._check_cancel()
                    self._serve_requests()
                    self._send_units(index, first, min(first + CHUNK_UNITS, units))
            self._serve_requests()
            self.sock.sendall(self.stream.part_end_and_eof())
        finally:
            # A traceback may still hold views of the buffer: then it goes with them.
            with contextlib.suppress(BufferError):
                self._view.release()
                self._buffer.close()

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise PostcopyError("the restore was interrupted before all of the RAM was sent")

    def _serve_requests(self) -> None:
        while True:
            try:
                item = self.requests.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, BaseException):
                raise item
            index, start, count = item
            block = self.blocks[index]
            self.counters.requests += 1
            self.counters.requested_pages += count
            first_unit, end_unit = start // UNIT_PAGES, -(-(start + count) // UNIT_PAGES)
            for unit in range(first_unit, end_unit, CHUNK_UNITS):  # the buffer's size at most
                last = min(unit + CHUNK_UNITS, end_unit)
                self._send_units(index, unit, last, piece_requests=False)
            # Absent pages asked for: zeros (their slots in the file hold no data).
            zeros = [p for p in range(start, start + count) if not block.sent[p]]
            for page in zeros:
                block.sent[page] = True
                self.sock.sendall(ps.zero_record(page * PAGE_SIZE, self._name_for(block.name)))

    def _name_for(self, name: str) -> str | None:
        """The block's name for a record's header, or None when the last record's was it."""
        if self._last_block == name:
            return None
        self._last_block = name
        return name

    def _send_units(
        self, index: int, first_unit: int, end_unit: int, piece_requests: bool = True
    ) -> None:
        """Read, check and send the present pages of units [first_unit, end_unit) not sent
        yet; between pieces, serve requests (unless serving one)."""
        block = self.blocks[index]
        first = first_unit * UNIT_PAGES
        end = min(end_unit * UNIT_PAGES, block.pages)
        todo = block.present[first:end] & ~block.sent[first:end]
        where = np.flatnonzero(todo)
        if not where.size:
            return
        # Pages already sent of these units are in the file too: read the span whole,
        # since a unit is checked whole.
        present = np.flatnonzero(block.present[first:end])
        lo, hi = int(present[0]), int(present[-1]) + 1
        data = self._view[: (end - first) * PAGE_SIZE]
        read_fully(
            self.fd,
            data[lo * PAGE_SIZE : hi * PAGE_SIZE],
            block.layout.pages_offset + (first + lo) * PAGE_SIZE,
            self.path,
        )
        if block.digests is not None:
            self._check_units(block, first_unit, end_unit, data, first)
        block.sent[first + where] = True  # before sending: a request meanwhile skips them
        pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        for at in range(0, where.size, PIECE_PAGES):
            piece = where[at : at + PIECE_PAGES]
            self._send_pages(block, first, piece, pages)
            if piece_requests:
                self._serve_requests()

    def _check_units(
        self, block: RamBlock, first_unit: int, end_unit: int, data: memoryview, first: int
    ) -> None:
        assert block.digests is not None

        def source(page: int, count: int) -> memoryview:
            return data[(page - first) * PAGE_SIZE : (page - first + count) * PAGE_SIZE]

        for unit in range(first_unit, end_unit):
            start = unit * UNIT_PAGES
            unit_present = block.present[start : min(start + UNIT_PAGES, block.pages)]
            at = unit * DIGEST_BYTES
            if unit_digest(unit_present, start, source) != block.digests[at : at + DIGEST_BYTES]:
                raise ChecksumMismatch(
                    mismatch_text(
                        self.path, block.layout.name, block.layout.pages_offset, block.pages, unit
                    )
                )

    def _send_pages(
        self, block: RamBlock, first: int, piece: np.ndarray, pages: np.ndarray
    ) -> None:
        """PAGE records for pages `first + piece` (indexes into `pages`), one send."""
        head = ps.page_header((first + int(piece[0])) * PAGE_SIZE, self._name_for(block.name))
        rest = piece[1:]
        records = np.empty((rest.size, _RECORD), dtype=np.uint8)
        offsets = (first + rest.astype(np.uint64)) * PAGE_SIZE
        flags = ps.FLAG_PAGE | ps.FLAG_CONTINUE
        records[:, :8] = (offsets | flags).astype(">u8").view(np.uint8).reshape(-1, 8)
        records[:, 8:] = pages[rest]
        self.sock.sendall(head)
        self.sock.sendall(pages[int(piece[0])])
        if rest.size:
            self.sock.sendall(records.data)
        self.counters.bytes_sent += piece.size * PAGE_SIZE

    # -- the return path -------------------------------------------------------------------

    def read_return_path(self) -> None:
        """QEMU's messages until it shuts the return path; requests go to the writer."""
        current: int | None = None
        try:
            while True:
                head = self._recv(_RP_HEADER.size, allow_end=True)
                if head is None:
                    return
                kind, size = _RP_HEADER.unpack(head)
                body = self._recv(size) if size else b""
                assert body is not None
                if kind == ps.RP_SHUT:
                    self.shut = struct.unpack(">I", body)[0] if len(body) == 4 else -1
                    return
                if kind == ps.RP_PONG:
                    continue
                if kind not in (ps.RP_REQ_PAGES_ID, ps.RP_REQ_PAGES) or size < 12:
                    raise PostcopyError(f"QEMU sent return-path message {kind} ({size} bytes)")
                start, length = struct.unpack_from(">QI", body)
                if kind == ps.RP_REQ_PAGES_ID:
                    name = body[13 : 13 + body[12]].decode(errors="replace")
                    if name in self.other_blocks:
                        raise PostcopyError(
                            f"QEMU asked for a page of RAM block '{name}', which the device "
                            "state loaded before the guest started"
                        )
                    current = self.by_name.get(name)
                    if current is None:
                        raise PostcopyError(f"QEMU asked for pages of unknown RAM block '{name}'")
                if current is None:
                    raise PostcopyError("QEMU asked for pages before naming their RAM block")
                block = self.blocks[current]
                size_bytes = block.pages * PAGE_SIZE
                if start % PAGE_SIZE or length % PAGE_SIZE or start + length > size_bytes:
                    raise PostcopyError(
                        f"QEMU asked for bytes {start:#x}+{length:#x} of RAM block "
                        f"'{block.name}' ({size_bytes:#x} bytes)"
                    )
                if length:
                    self.requests.put((current, start // PAGE_SIZE, length // PAGE_SIZE))
        except BaseException as exc:
            self.requests.put(exc)  # the writer raises it
            raise

    def _recv(self, n: int, allow_end: bool = False) -> bytes | None:
        data = bytearray()
        while len(data) < n:
            got = self.sock.recv(n - len(data))
            if not got:
                if allow_end and not data:
                    return None
                raise PostcopyError("QEMU closed the return path in the middle of a message")
            data += got
        return bytes(data)


def ram_blocks(
    names: Sequence[str],
    layouts: Sequence[fmt.BlockLayout],
    bitmaps: Sequence[np.ndarray],
    digests: Sequence[bytes] | None,
) -> list[RamBlock]:
    return [
        RamBlock(name, layout, present, None if digests is None else digests[i],
                 np.zeros(layout.pages, dtype=bool))
        for i, (name, layout, present) in enumerate(zip(names, layouts, bitmaps, strict=True))
    ]  # fmt: skip

