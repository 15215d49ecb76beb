"""Interoperability with a real QEMU: each side loads the other's mapped-ram save files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from qemu.qmp import ExecuteError

from migd.migration.mapped_ram import format

from .conftest import add_file_backend, enable_mapped_ram, wait_migration
from .qemu_vm import QemuVM, requires_qemu

pytestmark = [requires_qemu, pytest.mark.timeout(60)]

KiB, MiB = 1 << 10, 1 << 20
PAGE = format.PAGE_SIZE
SIZE = 64 * MiB + 12 * KiB  # not a multiple of 2 MiB: a partial tail after the last cluster
Q35_RAM = 128 * MiB
MIGRATION_TIMEOUT = 30.0


# -- data ----------------------------------------------------------------------------------


def mixed_data(size: int, seed: int) -> bytes:
    """Random pages, 2 MiB zero clusters (aligned and not), scattered zero pages, and
    pages that are zero but for their last byte (a zero-page detector must keep them)."""
    rng = np.random.default_rng(seed)
    pages = np.frombuffer(bytearray(rng.bytes(size)), dtype=np.uint8).reshape(-1, PAGE)
    count = pages.shape[0]
    pages[rng.choice(count, count // 16, replace=False)] = 0
    in_cluster = np.zeros(count, dtype=bool)
    for start in (8 * MiB, 20 * MiB + 3 * PAGE, size - 2 * MiB - 2 * PAGE):
        in_cluster[start // PAGE : (start + 2 * MiB) // PAGE] = True
    pages[in_cluster] = 0
    almost = rng.choice(np.flatnonzero(~in_cluster), 64, replace=False)
    pages[almost] = 0
    pages[almost, -1] = 0x5A
    pages[0, :] = 0  # first and last page zero: edges of the bitmap
    pages[-1, :] = 0
    return pages.tobytes()


def zero_pages(data: bytes) -> np.ndarray:
    return ~np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE).any(axis=1)


def garbage(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def fresh_zero_file(path: Path, size: int) -> None:
    """A sparse all-zero file (QEMU's incoming side assumes fresh RAM is zero)."""
    with open(path, "wb") as f:
        f.truncate(size)


def assert_same_bytes(actual: bytes, expected: bytes, what: str) -> None:
    """Like ==, but a failure names the first differing page instead of dumping MiBs."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} bytes, expected {len(expected)}"
    if actual == expected:
        return
    a = np.frombuffer(actual, dtype=np.uint8).reshape(-1, PAGE)
    e = np.frombuffer(expected, dtype=np.uint8).reshape(-1, PAGE)
    bad = np.flatnonzero((a != e).any(axis=1))
    zero_expected = int((~e[bad].any(axis=1)).sum())
    raise AssertionError(
        f"{what}: {bad.size} pages differ (first: page {bad[0]}; "
        f"{zero_expected} of them should be zero)"
    )


def parse(path: Path, offset: int = 0) -> format.ParsedStream:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return format.parse_stream(lambda at, n: os.pread(f.fileno(), n, at), offset, size)


def bitmap(path: Path, block: format.BlockLayout) -> np.ndarray:
    with open(path, "rb") as f:
        raw = os.pread(f.fileno(), block.bitmap_size, block.bitmap_offset)
    return format.decode_bitmap(raw, block.pages)


# -- QEMU ----------------------------------------------------------------------------------

BASE_ARGS = ("-nodefaults", "-display", "none", "-S")


def none_machine_args(mem_path: Path, size: int) -> list[str]:
    """An empty machine (-M none) whose only RAM is the memory-backend-file ram0."""
    backend = f"memory-backend-file,id=ram0,size={size},mem-path={mem_path},share=on"
    return ["-M", "none", *BASE_ARGS, "-object", backend, "-machine", "memory-backend=ram0"]


def q35_args(mem_path: Path) -> list[str]:
    """A stopped q35 PC whose guest RAM is the memory-backend-file mem0."""
    backend = f"memory-backend-file,id=mem0,size={Q35_RAM},mem-path={mem_path},share=on"
    machine = "q35,memory-backend=mem0"
    return ["-machine", machine, "-object", backend, "-m", f"{Q35_RAM // MiB}M", *BASE_ARGS]


async def qemu_load(sock_dir: Path, mem_path: Path, size: int, uri: str, channels: int) -> None:
    """QEMU -M none loads `uri` into ram0 backed by `mem_path`; quits when done."""
    async with QemuVM(
        [*none_machine_args(mem_path, size), "-incoming", "defer"], sock_dir, name="dst"
    ) as vm:
        await vm.set_mapped_ram(channels=channels)
        await vm.cmd("migrate-incoming", {"uri": uri})
        info = await vm.wait_migration(MIGRATION_TIMEOUT)
        assert info["status"] == "completed", (info, vm.log())


async def qemu_save(sock_dir: Path, args: list[str], path: Path) -> dict:
    """QEMU (stopped by -S) saves itself to `path` with multifd + mapped-ram + direct-io."""
    async with QemuVM(args, sock_dir, name="src") as vm:
        await vm.set_mapped_ram(channels=2)
        await vm.cmd("migrate", {"uri": f"file:{path}"})
        info = await vm.wait_migration(MIGRATION_TIMEOUT)
        assert info["status"] == "completed", (info, vm.log())
        return info


async def migd_save(
    qmp, shm: Path, save_path: Path, data: bytes, channels: int, offset: int | None = None
) -> None:
    (shm / "ram0").write_bytes(data)
    await add_file_backend(qmp, "ram0", shm / "ram0", len(data))
    await enable_mapped_ram(qmp, channels=channels, direct_io=True)
    uri = f"file:{save_path}" + (f",offset={offset}" if offset is not None else "")
    await qmp.execute("migrate", {"uri": uri})
    info = await wait_migration(qmp, MIGRATION_TIMEOUT)
    assert info["status"] == "completed", info


def check_migd_bitmap(path: Path, offset: int, data: bytes) -> None:
    """migd's file lists ram0 alone; a clear bit is always a zero page, and long zero
    runs (the 2 MiB clusters) are skipped (migd writes short zero runs inline)."""
    parsed = parse(path, offset)
    assert parsed.complete and [b.name for b in parsed.blocks] == ["ram0"]
    clear = ~bitmap(path, parsed.blocks[0])
    assert not (clear & ~zero_pages(data)).any(), "a page with data is marked zero"
    assert clear.sum() >= 2 * MiB // PAGE, "no 2 MiB zero cluster was skipped"


# -- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 4])
async def test_qemu_loads_a_migd_save_with_identical_bytes(qmp, shm, short_dir, channels):
    data = mixed_data(SIZE, seed=channels)
    save_path = short_dir / "save.img"
    await migd_save(qmp, shm, save_path, data, channels)

    check_migd_bitmap(save_path, 0, data)

    dst = shm / "qemu-ram0"
    fresh_zero_file(dst, SIZE)
    await qemu_load(short_dir, dst, SIZE, f"file:{save_path}", channels)
    assert_same_bytes(dst.read_bytes(), data, "QEMU's memory after loading migd's save")


async def test_qemu_loads_a_migd_save_at_an_offset_and_the_header_is_kept(qmp, shm, short_dir):
    data = mixed_data(SIZE, seed=7)
    save_path = short_dir / "save.img"
    header = garbage(4096, seed=8)
    save_path.write_bytes(header)
    await migd_save(qmp, shm, save_path, data, channels=4, offset=4096)

    with open(save_path, "rb") as f:
        assert f.read(4096) == header, "migd changed the bytes before offset=4096"
    check_migd_bitmap(save_path, 4096, data)

    dst = shm / "qemu-ram0"
    fresh_zero_file(dst, SIZE)
    await qemu_load(short_dir, dst, SIZE, f"file:{save_path},offset=4096", channels=4)
    assert_same_bytes(dst.read_bytes(), data, "QEMU's memory after loading at offset 4096")


async def test_migd_restores_a_qemu_save_and_zeroes_the_zero_pages(qmp, shm, short_dir):
    data = mixed_data(SIZE, seed=11)
    src = shm / "qemu-ram0"
    src.write_bytes(data)
    save_path = short_dir / "qemu.img"
    await qemu_save(short_dir, none_machine_args(src, SIZE), save_path)
    assert_same_bytes(src.read_bytes(), data, "QEMU's own memory file after its save")

    parsed = parse(save_path)
    assert parsed.complete and parsed.machine == "none"
    assert [b.name for b in parsed.blocks] == ["ram0"]
    # QEMU skipped the zero pages: migd must zero them itself in the old backend.
    assert (~bitmap(save_path, parsed.blocks[0]) == zero_pages(data)).all()

    (shm / "ram0").write_bytes(garbage(SIZE, seed=12))
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE)
    await enable_mapped_ram(qmp, channels=4, direct_io=True)
    await qmp.execute("migrate-incoming", {"uri": f"file:{save_path}"})
    info = await wait_migration(qmp, MIGRATION_TIMEOUT)
    assert info["status"] == "completed", info
    assert_same_bytes((shm / "ram0").read_bytes(), data, "migd's backend after the restore")


async def _q35_save(shm: Path, short_dir: Path) -> tuple[Path, bytes, list[str]]:
    """A stopped q35 machine saved by QEMU: (save file, RAM bytes, block names in file order)."""
    mem = shm / "q35-mem0"
    mem.write_bytes(mixed_data(Q35_RAM, seed=21))
    save_path = short_dir / "q35.img"
    await qemu_save(short_dir, q35_args(mem), save_path)
    ram = mem.read_bytes()  # the machine was stopped: this is exactly the saved RAM
    parsed = parse(save_path)
    assert parsed.complete and parsed.machine.startswith("pc-q35-")
    names = [b.name for b in parsed.blocks]
    # -machine memory-backend=mem0: the RAM block is named after the backend's id.
    assert "mem0" in names and len(names) > 1, names
    assert parsed.blocks[names.index("mem0")].length == Q35_RAM
    return save_path, ram, names


async def test_migd_restores_the_ram_block_of_a_q35_save_skipping_the_others(qmp, shm, short_dir):
    save_path, ram, names = await _q35_save(shm, short_dir)
    backend = shm / "guest-ram"
    backend.write_bytes(garbage(Q35_RAM, seed=22))
    await add_file_backend(qmp, "guest", backend, Q35_RAM, **{"ramblock-name": "mem0"})
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    await qmp.execute(
        "migrate-incoming", {"uri": f"file:{save_path}", "skip-unmatched-blocks": True}
    )
    info = await wait_migration(qmp, MIGRATION_TIMEOUT)
    assert info["status"] == "completed", info
    assert info["x-skipped-blocks"] == [n for n in names if n != "mem0"]
    assert info["ram"]["total"] == Q35_RAM
    assert_same_bytes(backend.read_bytes(), ram, "migd's backend after restoring q35's mem0")


async def test_migd_refuses_a_q35_save_with_unknown_blocks_and_leaves_memory_unchanged(
    qmp, shm, short_dir
):
    save_path, _ram, names = await _q35_save(shm, short_dir)
    backend = shm / "guest-ram"
    before = garbage(Q35_RAM, seed=23)
    backend.write_bytes(before)
    await add_file_backend(qmp, "guest", backend, Q35_RAM, **{"ramblock-name": "mem0"})
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    first_unknown = next(n for n in names if n != "mem0")
    expected = f'Unknown ramblock "{first_unknown}", cannot accept migration'
    try:
        await qmp.execute("migrate-incoming", {"uri": f"file:{save_path}"})
    except ExecuteError as exc:
        desc = exc.error.error.desc
    else:  # QEMU reports it from the running migration; accept that form too
        info = await wait_migration(qmp, MIGRATION_TIMEOUT)
        assert info["status"] == "failed", info
        desc = info["error-desc"]
    assert desc == expected
    assert_same_bytes(backend.read_bytes(), before, "migd's backend after a refused restore")
