"""What a checksum is: the algorithm, the 1 MiB unit it covers, its size, and the digest
of a table. Apart from io/checksums.py (the threads that compute them, numpy's arrays), so
that reading a file's checksum table (`migd inspect`, `migd vm restore`'s checks of an
image) loads neither: a client's start-up counts in a restore's downtime."""

from __future__ import annotations

import xxhash

from ..pages import PAGE_SIZE

ALGORITHM = "xxh3-128"
UNIT_BYTES = 1 << 20
UNIT_PAGES = UNIT_BYTES // PAGE_SIZE
DIGEST_BYTES = 16


def unit_count(pages: int) -> int:
    return -(-pages // UNIT_PAGES)


def digest(data: bytes | memoryview) -> bytes:
    """The algorithm's digest of bytes (a table's checksum of checksums, say)."""
    return xxhash.xxh3_128_digest(data)
