"""Mutated real save files: a restore completes exactly as the file says, or is refused.

A real migd save (two blocks, random and zero pages) is mutated by hypothesis: byte
flips, insertions and deletions in the stream head, truncations, and fields overwritten
with boundary values. migrate-incoming of the result must either be refused with a clear
error (and no backend changes), fail with a clear error, or complete with the backends
holding exactly what the mutated file says. It never crashes or hangs the daemon, and
never leaks an fd or a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError

from migd.migration.mapped_ram import format

from .conftest import add_file_backend, enable_mapped_ram, migd_threads, open_fds, save

MiB = 1 << 20
PAGE = 4096
BACKENDS = {"ram0": 2 * MiB, "ram1": 256 << 10}
PYDANTIC_WORDS = ("validation error", "pydantic", "Input should be", "Field required")
FINAL = {"completed", "failed", "cancelled"}


def _memory(size: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    data = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    for page in rng.choice(size // PAGE, size // PAGE // 4, replace=False):
        data[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)  # zero pages: clear bits
    return bytes(data)


def _fields(raw: bytes) -> list[tuple[str, int, int]]:
    """(name, offset, width) of every fixed-size field of the stream (format.md)."""
    size = len(raw)
    parsed = format.parse_stream(lambda at, n: raw[at : at + n], 0, size)
    out = [("magic", 0, 4), ("version", 4, 4), ("config", 8, 1), ("machine-len", 9, 4)]
    at = 13 + struct.unpack_from(">I", raw, 9)[0]
    out += [("subsection", at, 1), ("subsection-len", at + 1, 1)]
    at += 2 + raw[at + 1]
    out += [("subsection-version", at, 4), ("caps-count", at + 4, 4), ("cap-len", at + 8, 1)]
    at += 9 + raw[at + 8]
    out += [("section-start", at, 1), ("section-id", at + 1, 4), ("idstr-len", at + 5, 1)]
    at += 6 + raw[at + 5]
    out += [("instance", at, 4), ("section-version", at + 4, 4), ("mem-size", at + 8, 8)]
    for i, block in enumerate(parsed.blocks):
        name_at = block.header_offset - 8 - 1 - len(block.name.encode())
        h = block.header_offset
        out += [
            (f"block{i}-name-len", name_at, 1),
            (f"block{i}-length", h - 8, 8),
            (f"block{i}-header-version", h, 4),
            (f"block{i}-page-size", h + 4, 8),
            (f"block{i}-bitmap-offset", h + 12, 8),
            (f"block{i}-pages-offset", h + 20, 8),
            (f"block{i}-bitmap", block.bitmap_offset, 8),
        ]
    last = parsed.blocks[-1].end
    out += [("start-eos", last, 8), ("start-footer", last + 8, 1), ("start-footer-id", last + 9, 4)]
    end = last + 13
    out += [
        ("end-section", end, 1),
        ("end-section-id", end + 1, 4),
        ("end-eos", end + 5, 8),
        ("end-footer", end + 13, 1),
        ("end-footer-id", end + 14, 4),
        ("eof", end + 18, 1),
        ("vmdesc", end + 19, 1),
        ("vmdesc-len", end + 20, 4),
    ]
    return [(n, o, w) for n, o, w in out if o + w <= size]


def _boundaries(width: int, original: int, file_size: int) -> list[int]:
    top = (1 << (8 * width)) - 1
    values = {0, 1, 2, top, top - 1, top >> 1, (top >> 1) + 1, original + 1, original - 1}
    values |= {PAGE - 1, PAGE, PAGE + 1, MiB, file_size - 1, file_size, file_size + 1}
    values |= {original ^ (1 << bit) for bit in range(0, 8 * width, 7)}
    return sorted(v for v in values if 0 <= v <= top)


@st.composite
def mutations(draw: st.DrawFn, raw: bytes, fields: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(raw)
    hot = sorted({o + k for _, o, w in fields for k in range(w)})  # bytes inside fields
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "field", "flip", "insert", "delete", "truncate"]))
        if kind == "field":
            _name, at, width = draw(st.sampled_from(fields))
            if at + width > len(data):
                continue
            original = int.from_bytes(data[at : at + width], "big")
            value = draw(st.sampled_from(_boundaries(width, original, len(data))))
            data[at : at + width] = value.to_bytes(width, "big")
        elif kind == "flip" and data:
            at = draw(st.sampled_from(hot) | st.integers(0, len(data) - 1))
            if at < len(data):
                data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            at = draw(st.integers(0, min(len(data), 200)))
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            at = draw(st.integers(0, min(len(data), 200)))
            del data[at : at + draw(st.integers(1, 16))]
        else:
            cut = draw(st.sampled_from([o for _, o, _ in fields]) | st.integers(0, len(data)))
            del data[cut:]
    return bytes(data)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_memory(raw: bytes) -> dict[str, bytes]:
    """What a restore of `raw` must leave in each block: the file's page where its bit is
    set, zeros elsewhere. Read straight from the bytes, not through migd's restore path."""
    parsed = format.parse_stream(lambda at, n: raw[at : at + n], 0, len(raw))
    out = {}
    for block in parsed.blocks:
        bits = np.unpackbits(
            np.frombuffer(raw, np.uint8, (block.pages + 7) // 8, block.bitmap_offset),
            count=block.pages,
            bitorder="little",
        )
        memory = bytearray(block.length)
        for page in np.flatnonzero(bits).tolist():
            at = block.pages_offset + page * PAGE
            memory[page * PAGE : (page + 1) * PAGE] = raw[at : at + PAGE].ljust(PAGE, b"\0")
        out[block.name] = bytes(memory)
    return out


class Bench:
    def __init__(self, qmp: Any, shm: Path, where: Path, raw: bytes) -> None:
        self.qmp, self.shm, self.where, self.raw = qmp, shm, where, raw
        self.fields = _fields(raw)
        self.memory = {id: (shm / id).read_bytes() for id in BACKENDS}
        self.fds: set[str] = set()

    def reset_memory(self) -> None:
        for id, data in self.memory.items():
            if (self.shm / id).read_bytes() != data:
                (self.shm / id).write_bytes(data)  # in place: the mapping sees it

    async def wait_final(self, timeout: float = 20.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            info = await self.qmp.execute("query-migrate")
            if info.get("status") in FINAL:
                return info
            assert asyncio.get_running_loop().time() < deadline, f"restore hangs: {info}"
            await asyncio.sleep(0.005)


@pytest.fixture
async def bench(qmp, shm, short_dir):
    """Two backends saved by migd; the backends then hold other data, so that a restore
    that does anything shows."""
    for seed, (id, size) in enumerate(BACKENDS.items()):
        (shm / id).write_bytes(_memory(size, seed + 30))
        await add_file_backend(qmp, id, shm / id, size)
    await enable_mapped_ram(qmp, channels=2)
    assert (await save(qmp, short_dir / "good.img"))["status"] == "completed"
    raw = (short_dir / "good.img").read_bytes()
    for seed, (id, size) in enumerate(BACKENDS.items()):
        (shm / id).write_bytes(_memory(size, seed + 40))
    b = Bench(qmp, shm, short_dir, raw)
    b.fds = open_fds()
    return b


def check_desc(desc: str, path: Path) -> None:
    assert desc.strip() and "Internal error" not in desc and "Traceback" not in desc, desc
    assert not any(word in desc for word in PYDANTIC_WORDS), desc
    assert str(path) in desc or desc.startswith(("Unknown ramblock", "Length mismatch")), desc


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_a_mutated_save_file_is_restored_exactly_or_refused_clearly(bench, data):
    raw = data.draw(mutations(bench.raw, bench.fields), label="file")
    target = bench.where / "mutated.img"
    target.write_bytes(raw)
    bench.reset_memory()
    before = {id: _digest(bench.shm / id) for id in BACKENDS}
    last = await bench.qmp.execute("query-migrate")
    try:
        await bench.qmp.execute("migrate-incoming", {"uri": f"file:{target}"})
    except ExecuteError as exc:
        check_desc(exc.error.error.desc, target)
        assert {id: _digest(bench.shm / id) for id in BACKENDS} == before
        assert await bench.qmp.execute("query-migrate") == last  # nothing started
    else:
        info = await bench.wait_final()
        if info["status"] == "completed":
            expected = expected_memory(raw)
            for name, memory in expected.items():
                assert (bench.shm / name).read_bytes() == memory, name
        else:
            assert info["status"] == "failed", info
            desc = info["error-desc"]
            check_desc(desc, target)
            if desc.endswith("no memory backend was changed"):
                assert {id: _digest(bench.shm / id) for id in BACKENDS} == before
            else:
                assert "hold partial data" in desc, desc
    assert (await bench.qmp.execute("query-version"))["package"].startswith("migd ")
    assert open_fds() == bench.fds and migd_threads() == []


async def test_the_unmutated_file_restores_exactly(bench):
    """The oracle of the fuzz agrees with a plain restore of the real file."""
    await bench.qmp.execute("migrate-incoming", {"uri": f"file:{bench.where / 'good.img'}"})
    assert (await bench.wait_final())["status"] == "completed"
    expected = expected_memory(bench.raw)
    assert set(expected) == set(BACKENDS)
    for seed, (name, size) in enumerate(BACKENDS.items()):
        assert expected[name] == _memory(size, seed + 30)
        assert (bench.shm / name).read_bytes() == expected[name]
    assert os.path.getsize(bench.where / "good.img") == len(bench.raw)
