"""The zero scan, which reads memory through the kernel (process_vm_readv), against a
plain numpy reference: every zero run of at least min_run pages is found, nothing else."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from migd.io.zero_scan import (
    MIN_SKIP_PAGES,
    MemoryFault,
    MemoryReader,
    runs_to_write,
    touch_pages,
    zero_pages,
)

PAGE = 4096


def reference(pages: np.ndarray, min_run: int) -> np.ndarray:
    """True for the pages of every all-zero run of at least min_run pages."""
    zero = ~pages.any(axis=1)
    out = np.zeros(zero.size, dtype=bool)
    start = None
    for i, z in enumerate([*zero.tolist(), False]):
        if z and start is None:
            start = i
        elif not z and start is not None:
            if i - start >= min_run:
                out[start:i] = True
            start = None
    return out


@pytest.mark.parametrize("seed", range(12))
def test_zero_scan_finds_exactly_the_long_zero_runs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 3000))
    min_run = int(rng.choice([1, 3, 8, 64, MIN_SKIP_PAGES]))
    pages = rng.integers(0, 256, (count, PAGE), dtype=np.uint8)
    pages[:, :8] |= 1  # first words non-zero unless a page is cleared below
    for _ in range(int(rng.integers(0, 12))):  # zero runs of any length, anywhere
        a = int(rng.integers(0, count))
        pages[a : a + int(rng.integers(1, 2 * min_run + 300))] = 0
    for _ in range(int(rng.integers(0, 6))):  # zero first word, data further on
        a = int(rng.integers(0, count))
        pages[a : a + int(rng.integers(1, 3 * min_run + 10)), :8] = 0
    pages[rng.random(count) < 0.3] = 0  # scattered zero pages
    found = zero_pages(memoryview(bytearray(pages.tobytes())), min_run, MemoryReader())
    assert found.tolist() == reference(pages, min_run).tolist()
    assert runs_to_write(found, min_run) == runs_to_write(reference(pages, min_run), min_run)


@pytest.mark.parametrize("pages", [0, 1, 256, 1024])
def test_memory_without_zero_samples_is_written_whole(pages: int) -> None:
    """The short cut for memory whose sampled words are all non-zero (a busy guest's):
    no zero page, and one write of the whole run."""
    data = np.full((pages, PAGE // 8), 0x0101010101010101, dtype=np.uint64)
    found = zero_pages(memoryview(bytearray(data.tobytes())), MIN_SKIP_PAGES, MemoryReader())
    assert found.size == pages and not found.any()
    assert runs_to_write(found) == ([(0, pages)] if pages else [])


def test_a_page_past_the_end_of_a_cut_file_is_a_memory_fault_not_sigbus(
    tmp_path: Path,
) -> None:
    """Scanning and populating run in this test's own process: SIGBUS would kill it."""
    path = tmp_path / "mem"
    path.write_bytes(bytes(4 << 20))
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, 4 << 20, flags=mmap.MAP_SHARED)
    try:
        view = memoryview(mm)
        assert zero_pages(view).all()
        os.ftruncate(fd, 1 << 20)
        with pytest.raises(MemoryFault):
            zero_pages(view)
        with pytest.raises(MemoryFault):
            touch_pages(view[2 << 20 :])
        touch_pages(view[: 1 << 20])  # what is left is still there
        view.release()
    finally:
        mm.close()
        os.close(fd)


def test_where_process_vm_readv_is_refused_the_scan_still_works_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A seccomp filter (systemd 252's @system-service) answers EPERM: saves go on."""
    import ctypes
    import errno

    from migd.io import zero_scan as channels

    def refused(*args: object) -> int:
        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(channels, "_process_vm_readv", refused)
    monkeypatch.setattr(channels, "_kernel_reads_refused", False)
    pages = np.random.default_rng(3).integers(1, 256, (4 * MIN_SKIP_PAGES, PAGE), dtype=np.uint8)
    pages[MIN_SKIP_PAGES : 3 * MIN_SKIP_PAGES] = 0
    found = zero_pages(memoryview(bytearray(pages.tobytes())))
    assert found.tolist() == reference(pages, MIN_SKIP_PAGES).tolist()
    assert "process_vm_readv is refused" in caplog.text


def test_the_service_unit_allows_process_vm_readv() -> None:
    from .test_systemd import UNITS, unit_settings

    filters = unit_settings(UNITS / "migd.service")["SystemCallFilter"]
    assert "@system-service" in filters and "process_vm_readv" in filters
