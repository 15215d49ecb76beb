"""How fast migd's unit checksums are on this CPU, in 1 and 2 threads (issue 16, item 4).

A unit's checksum (migd/io/checksums.py) copies the unit's pages through the kernel
(MemoryReader.copy: process_vm_readv, which releases the GIL) a 1 MiB chunk at a time and
hashes them with xxh3-128 (xxhash's update, which holds the GIL). This measures, over
--mib of random memory in an anonymous mapping:

* copy: MemoryReader.copy alone, chunk by chunk;
* hash: xxh3-128 of an already copied 1 MiB buffer, again and again;
* unit: checksums.unit_digest through checksums.memory_source, as a channel does it;

each in 1 thread and in 2 threads (each its own MemoryReader and half the units), as GiB/s
of memory (all threads together, the median of --repeat passes) and CPU seconds per GiB.
2 threads at twice the 1-thread figure: the step does not serialise on the GIL; at the
1-thread figure: it does. Also the GIL time per MiB: the hash's seconds per MiB in one
thread. Last, a direct test of the GIL that does not depend on a free second core: a
thread repeats xxhash's update of 256 MiB while the main thread runs a Python loop, and
the same with bytes.count (which holds the GIL) as the control.

    .venv/bin/python docs/bench/checksums/hash_threads.py [--mib 512] [--repeat 5]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import xxhash

from migd.io.checksums import UNIT_BYTES, UNIT_PAGES, memory_source, unit_digest
from migd.io.zero_scan import SCAN_CHUNK_PAGES, MemoryReader, address_of
from migd.pages import PAGE_SIZE

MiB, GiB = 1 << 20, 1 << 30


def copy_units(memory: memoryview, units: range, reader: MemoryReader) -> None:
    base = address_of(memory)
    for unit in units:
        for at in range(0, UNIT_PAGES, SCAN_CHUNK_PAGES):
            reader.copy(base + (unit * UNIT_PAGES + at) * PAGE_SIZE, SCAN_CHUNK_PAGES)


def hash_units(buffer: bytes, units: range) -> None:
    for _ in units:
        hasher = xxhash.xxh3_128()
        hasher.update(buffer)
        hasher.digest()


def digest_units(memory: memoryview, units: range, reader: MemoryReader) -> None:
    block: Any = SimpleNamespace(memory=memory)  # memory_source needs only the mapping
    source = memory_source(block, reader)
    present = np.ones(UNIT_PAGES, dtype=bool)
    for unit in units:
        unit_digest(present, unit * UNIT_PAGES, source)


def timed(units: int, works: list[Callable[[range], None]]) -> tuple[float, float]:
    """Wall and CPU seconds of the `works`, one thread each, over a share of the units."""
    share = -(-units // len(works))
    workers = [
        threading.Thread(target=work, args=(range(i * share, min(units, (i + 1) * share)),))
        for i, work in enumerate(works)
    ]
    cpu, wall = time.process_time(), time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - wall, time.process_time() - cpu


def spin(stop: threading.Event) -> int:
    """Pure Python work, which runs only while this thread holds the GIL: loops done."""
    count = 0
    while not stop.is_set():
        count += 1
    return count


def probe_share(step: Callable[[range], None], units: int) -> float:
    """How much pure Python a second thread gets done while `step` runs over the units,
    as a share of what it does alone in the same time: near 1 when the step releases
    the GIL (and a second core is free), near 1/2 or less when it holds it."""

    def spun(during: Callable[[], None] | None, seconds: float) -> tuple[int, float]:
        stop, result = threading.Event(), [0]
        worker = threading.Thread(target=lambda: result.__setitem__(0, spin(stop)))
        start = time.perf_counter()
        worker.start()
        if during is None:
            time.sleep(seconds)
        else:
            during()
        stop.set()
        worker.join()
        return result[0], time.perf_counter() - start

    together, seconds = spun(lambda: step(range(units)), 0)
    alone, alone_seconds = spun(None, seconds)
    return (together / seconds) / (alone / alone_seconds)


def gil_test(big: bytes, seconds: float = 2.0) -> None:
    """Whether xxhash's update holds the GIL, whatever else runs on the machine: while a
    thread repeats one long call on `big`, the main thread counts Python loop turns and
    the gaps between them as long as 0.8 x one call. A call that holds the GIL stops the
    loop for its whole length, every time (the control, bytes.count); one that releases
    it lets the loop run on."""
    calls: dict[str, Callable[[], object]] = {
        "xxh3_128().update": lambda: xxhash.xxh3_128().update(big),
        "bytes.count (control: holds the GIL)": lambda: big.count(b"\x00\x01\x02\x03"),
    }
    for name, call in calls.items():
        started = time.perf_counter()
        call()
        one = time.perf_counter() - started
        stop = threading.Event()

        def repeat(call: Callable[[], object] = call, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                call()

        worker = threading.Thread(target=repeat)
        worker.start()
        turns = long_gaps = 0
        last = time.perf_counter()
        end = last + seconds
        while last < end:
            now = time.perf_counter()
            turns += 1
            long_gaps += now - last >= 0.8 * one
            last = now
        stop.set()
        worker.join()
        print(
            f"- {name} of {len(big) // MiB} MiB, {1e3 * one:.1f} ms a call: the main "
            f"thread's loop turned {turns / seconds / 1e6:.1f} M times a second alongside, "
            f"stopped {long_gaps} times for >= 0.8 call"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=512, help="memory to checksum (default 512)")
    p.add_argument("--repeat", type=int, default=5, help="passes; the median (default 5)")
    args = p.parse_args()
    size = args.mib * MiB
    units = size // UNIT_BYTES
    mapping = mmap.mmap(-1, size)
    memory = memoryview(mapping)
    memory[:] = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    buffer = os.urandom(UNIT_BYTES)
    readers = [MemoryReader(), MemoryReader()]
    print(f"# unit checksums: {args.mib} MiB of random memory, median of {args.repeat}")
    print(f"# load average at the start: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
    print("| step | threads | GiB/s | CPU s per GiB | x of 1 thread |")
    print("|---|---:|---:|---:|---:|")
    per_mib: dict[str, float] = {}
    for name, make in (
        ("copy (process_vm_readv)", lambda i: lambda r: copy_units(memory, r, readers[i])),
        ("hash (xxh3-128 of 1 MiB)", lambda i: lambda r: hash_units(buffer, r)),
        ("unit_digest (copy + hash)", lambda i: lambda r: digest_units(memory, r, readers[i])),
    ):
        one = 0.0
        for threads in (1, 2):
            samples = []
            for _ in range(args.repeat):
                # thread i gets reader i: each thread's copies go to its own buffer
                workers = [make(i) for i in range(threads)]
                samples.append(timed(units, workers))
            wall = statistics.median(s[0] for s in samples)
            cpu = statistics.median(s[1] for s in samples)
            gibs = size / GiB / wall
            if threads == 1:
                one = gibs
                per_mib[name] = wall / units
            print(
                f"| {name} | {threads} | {gibs:.1f} | {cpu / (size / GiB):.3f} | {gibs / one:.2f} |"
            )
        share = statistics.median(probe_share(make(0), units) for _ in range(args.repeat))
        print(f"| {name}: a pure-Python thread alongside runs at | | {share:.0%} | | |")
    print()
    for name, seconds in per_mib.items():
        print(f"- {name}: {1e6 * seconds:.0f} us per MiB in one thread")
    print()
    gil_test(os.urandom(256 * MiB))
    print(f"# load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
