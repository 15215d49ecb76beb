"""Staging buffers outlive their job (io/threads.py StagingPool): the next job takes them
instead of touching new memory, and they are unmapped once no job took them for a while.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from migd.io import threads
from migd.io.threads import STAGE_PAGES, Staging, StagingPool

from .conftest import add_file_backend, enable_mapped_ram, fill_random, restore, save

MiB = 1 << 20
SIZE = 24 * MiB


def is_mapped(buffer: Staging) -> bool:
    try:
        buffer.view[0]
    except ValueError:  # released: the buffer was closed (unmapped)
        return False
    return True


def test_a_buffer_given_back_is_the_next_one_taken() -> None:
    pool = StagingPool()
    first = pool.take()
    first.view[:5] = b"hello"
    pool.give([first])
    assert pool.held() == 1
    again = pool.take()
    assert again is first and is_mapped(again)
    assert pool.take() is not first  # the pool is empty: a new one
    assert len(again.view) == STAGE_PAGES * 4096


def test_the_pool_keeps_at_most_keep_buffers_and_unmaps_the_rest() -> None:
    pool = StagingPool()
    buffers = [pool.take() for _ in range(StagingPool.KEEP + 3)]
    pool.give(buffers)
    assert pool.held() == StagingPool.KEEP
    assert [is_mapped(b) for b in buffers] == [True] * StagingPool.KEEP + [False] * 3


def test_trim_unmaps_only_the_buffers_idle_for_longer_than_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = StagingPool()
    old, new = pool.take(), pool.take()
    now = time.monotonic()
    pool.give([old])
    monkeypatch.setattr(time, "monotonic", lambda: now + StagingPool.IDLE + 1)
    pool.give([new])  # given back "now", IDLE + 1 s after `old`
    pool.trim()
    assert not is_mapped(old)
    assert is_mapped(new)
    assert pool.held() == 1 and pool.take() is new


async def test_restores_reuse_the_buffers_and_an_idle_daemon_lets_them_go(
    migd_inproc, qmp, shm, short_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staged restore (into used memory) gives its channels' buffers back; the next
    takes them (no new Staging), the memory is right both times, and IDLE after the last
    job the pool is empty again."""
    monkeypatch.setattr(threads, "STAGING", StagingPool())
    made = []

    class Counted(Staging):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(threads, "Staging", Counted)
    monkeypatch.setattr(StagingPool, "IDLE", 0.2)
    data = fill_random(shm / "ram0", SIZE, seed=7)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE, share=True)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
    for fill in (b"\x11", b"\x22"):
        (shm / "ram0").write_bytes(fill * SIZE)  # used memory: the restore is staged
        info = await restore(qmp, short_dir / "save.img")
        assert info["status"] == "completed", info
        assert (shm / "ram0").read_bytes() == data
        if fill == b"\x11":
            after_first = len(made)
            assert after_first >= 2  # two per channel that read a run
            assert threads.STAGING.held() == after_first
    assert len(made) == after_first  # the second restore made none
    deadline = time.monotonic() + 30
    while threads.STAGING.held() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the trim the engine scheduled IDLE + 0.5 s after
    assert threads.STAGING.held() == 0
    assert not any(is_mapped(b) for b in made)
