"""Every fd of a job is the file its main fd opened; a job's file is never a backend's.

Items 1 and 2 of issue 12. A path swapped between two files while a save or restore
starts must not make the channels read or write the other file; a save to (or restore
from) a memory backend's own file is refused before anything changes.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qemu.qmp import ExecuteError

from .conftest import (
    DaemonProcess,
    RawClient,
    _mounted,
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    parse_save,
    poll_until,
    qmp_error,
    read_bitmap,
    read_pages,
    restore,
    save,
    start_daemon,
)

MiB = 1 << 20
PAGE = 4096
SIZE = 32 * MiB  # four 8 MiB save runs, 32 1 MiB restore runs: every channel gets some
CHANNELS = 4
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(None, use_errno=True)
needs_renameat2 = pytest.mark.skipif(
    not hasattr(_libc, "renameat2"), reason="no renameat2 in this libc"
)


def _exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): the two names swap files atomically, and each file
    keeps one link (a link + rename swap would leave two, which migd now refuses)."""
    if _libc.renameat2(_AT_FDCWD, bytes(a), _AT_FDCWD, bytes(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class Swapper:
    """A thread that keeps swapping two names while a job starts."""

    def __init__(self, a: Path, b: Path) -> None:
        self.a, self.b = a, b
        self.swaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            _exchange(self.a, self.b)
            self.swaps += 1

    def __enter__(self) -> Swapper:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def generation(gen: int) -> np.ndarray:
    """Memory whose every page says which generation and which page it is."""
    pages = np.zeros((SIZE // PAGE, PAGE // 8), dtype=np.uint64)
    pages[:, 0::2] = gen
    pages[:, 1::2] = np.arange(SIZE // PAGE, dtype=np.uint64)[:, None]
    return pages


def write_memory(path: Path, gen: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, generation(gen).tobytes(), 0)
    finally:
        os.close(fd)


def memory_generation(data: bytes) -> int | None:
    """The generation every page of data belongs to, or None if pages are mixed."""
    words = np.frombuffer(data, dtype=np.uint64).reshape(-1, PAGE // 8)
    gen = int(words[0, 0])
    return gen if np.array_equal(words, generation(gen)) else None


def save_generation(path: Path) -> int | None:
    """A complete save's generation, or None if its pages are not all of one save."""
    block = parse_save(path).blocks[0]
    if not read_bitmap(path, block).all():
        return None
    return memory_generation(read_pages(path, block))


def is_complete(path: Path) -> bool:
    from migd.migration.mapped_ram import format

    try:
        return bool(parse_save(path).complete)
    except format.FormatError:
        return False


@pytest.fixture
def swap_daemon(short_dir: Path):
    """A daemon process (its own GIL: the swapper runs truly alongside its opens)."""
    d = start_daemon(short_dir / "qmp.sock")
    yield d
    d.stop()
    if d.proc.stderr:
        d.proc.stderr.close()


def _setup(daemon: DaemonProcess, mem: Path) -> RawClient:
    client = RawClient(daemon.socket_path).negotiate()
    mem.write_bytes(b"")
    reply = client.execute(
        "object-add",
        {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE, "mem-path": str(mem)},
    )
    assert reply == {"return": {}}
    caps = [{"capability": c, "state": True} for c in ("mapped-ram", "multifd")]
    assert client.execute("migrate-set-capabilities", {"capabilities": caps}) == {"return": {}}
    params = {"multifd-channels": CHANNELS}
    assert client.execute("migrate-set-parameters", params) == {"return": {}}
    return client


@needs_renameat2
def test_saves_started_while_the_path_is_swapped_are_each_one_whole_save(
    swap_daemon: DaemonProcess, short_dir: Path, shm: Path
) -> None:
    client = _setup(swap_daemon, shm / "mem")
    a, b = shm / "a.sav", shm / "b.sav"
    for p in (a, b):
        p.write_bytes(b"")
        p.chmod(0o600)
    completed = 0
    for gen in range(1, 41):
        write_memory(shm / "mem", gen)
        with Swapper(a, b) as swapper:
            assert client.execute("migrate", {"uri": f"file:{a}"}) == {"return": {}}
            info = client.wait_final()
        assert swapper.swaps > 0
        if info["status"] != "completed":
            continue
        completed += 1
        gens = {p.name: save_generation(p) for p in (a, b) if is_complete(p)}
        # Every file that reads as a complete save is one whole save, and one is this one.
        assert None not in gens.values(), f"save {gen}: a complete file mixes pages: {gens}"
        assert gen in gens.values(), f"save {gen} is in neither file: {gens}"
    assert completed == 40
    client.close()


@needs_renameat2
def test_restores_started_while_the_path_is_swapped_each_read_one_file(
    swap_daemon: DaemonProcess, short_dir: Path, shm: Path
) -> None:
    client = _setup(swap_daemon, shm / "mem")
    a, b = shm / "a.sav", shm / "b.sav"
    for gen, p in ((1, a), (2, b)):
        write_memory(shm / "mem", gen)
        assert client.execute("migrate", {"uri": f"file:{p}"}) == {"return": {}}
        assert client.wait_final()["status"] == "completed"
        assert save_generation(p) == gen
    completed = 0
    for attempt in range(40):
        write_memory(shm / "mem", 99)
        with Swapper(a, b) as swapper:
            reply = client.execute("migrate-incoming", {"uri": f"file:{a}"})
            assert reply == {"return": {}}
            info = client.wait_final()
        assert swapper.swaps > 0
        if info["status"] != "completed":
            continue
        completed += 1
        got = memory_generation((shm / "mem").read_bytes())
        assert got in (1, 2), f"restore {attempt} mixed the two files (or kept old memory)"
    assert completed == 40
    client.close()


# -- item 2: a job's file is never a backend's memory file ----------------------------------


def _digest(path: Path) -> tuple[int, int, str]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_save_to_a_backends_own_file_is_refused_and_changes_nothing(qmp, shm):
    mem = shm / "ram0"
    fill_random(mem, MiB)
    await add_file_backend(qmp, "ram0", mem, MiB)
    await enable_mapped_ram(qmp)
    before = _digest(mem)
    text = await qmp_error(qmp, "migrate", {"uri": f"file:{mem}"})
    assert text == (
        f"'{mem}' is the memory file of memory backend 'ram0': a save to it would "
        "overwrite that memory"
    )
    assert _digest(mem) == before
    assert await qmp.execute("query-migrate") == {}


async def test_a_save_to_a_backends_file_through_an_fdset_is_refused(qmp, shm):
    mem = shm / "ram0"
    fill_random(mem, MiB)
    await add_file_backend(qmp, "ram0", mem, MiB)
    await enable_mapped_ram(qmp, multifd=False)
    fd = os.open(mem, os.O_WRONLY)
    qmp.send_fd_scm(fd)
    os.close(fd)
    added = await qmp.execute("add-fd", {"fdset-id": 3})
    assert added["fdset-id"] == 3
    before = _digest(mem)
    text = await qmp_error(qmp, "migrate", {"uri": "file:/dev/fdset/3"})
    assert text == (
        f"'{mem}' is the memory file of memory backend 'ram0': a save to it would "
        "overwrite that memory"
    )
    assert _digest(mem) == before


async def test_a_restore_from_the_file_a_backend_maps_is_refused_and_keeps_the_save(
    qmp, shm, short_dir
):
    fill_random(shm / "src", MiB)
    await add_file_backend(qmp, "ram0", shm / "src", MiB)
    await enable_mapped_ram(qmp)
    target = short_dir / "vm.sav"
    assert (await save(qmp, target))["status"] == "completed"
    await qmp.execute("object-del", {"id": "ram0"})
    # ram0 now maps the save file itself (its first MiB: the file is larger).
    await add_file_backend(qmp, "ram0", target, MiB)
    before, job_before = _digest(target), await qmp.execute("query-migrate")
    text = await qmp_error(qmp, "migrate-incoming", {"uri": f"file:{target}"})
    assert text == (
        f"'{target}' is the memory file of memory backend 'ram0': a restore would "
        "overwrite the save while reading it"
    )
    assert _digest(target) == before
    assert await qmp.execute("query-migrate") == job_before  # no job started
    # The save itself is still good: restored elsewhere it gives the memory back.
    await qmp.execute("object-del", {"id": "ram0"})
    await add_file_backend(qmp, "ram0", shm / "dst", MiB)
    assert (await restore(qmp, target))["status"] == "completed"
    assert (shm / "dst").read_bytes() == (shm / "src").read_bytes()


# --- a job's file and backends added or jobs started while it starts (red-team, session 12)


async def _memory_job(qmp, command: str, job: str, uri: str, **extra: Any) -> dict[str, Any]:
    """Run a memory-save / memory-restore job to its end; its query-jobs entry."""
    await qmp.execute(command, {"job-id": job, "uri": uri, **extra})
    jobs = await poll_until(
        lambda: qmp.execute("query-jobs"),
        lambda jobs: any(j["id"] == job and j["status"] == "concluded" for j in jobs),
        f"job {job} concluded",
    )
    return next(j for j in jobs if j["id"] == job)


async def _two_clients_two_backends(migd_inproc: Any, shm: Path) -> tuple[Any, Any]:
    """Clients a and b of one daemon, with 1 MiB backends m0 and m1 of different data."""
    a, b = await migd_inproc.client("a"), await migd_inproc.client("b")
    fill_random(shm / "m0", MiB, seed=1)
    fill_random(shm / "m1", MiB, seed=2)
    await add_file_backend(a, "m0", shm / "m0", MiB)
    await add_file_backend(a, "m1", shm / "m1", MiB)
    return a, b


async def test_a_save_started_while_a_restore_of_its_file_starts_is_refused(
    migd_inproc, shm, short_dir, monkeypatch
):
    """The restore reads its file's head and checksums in threads before it launches: a
    save to the same file that starts meanwhile must not write what the restore reads.
    Before session 17 the restore was refused by a second look at the running jobs; since,
    the restore holds its file (state/paths.hold_for_job) from its open, so the save is
    refused and the restore completes with the bytes it read."""
    from migd.migration.mapped_ram import restore as restore_module

    a, b = await _two_clients_two_backends(migd_inproc, shm)
    try:
        image = short_dir / "f.sav"
        assert "error" not in await _memory_job(
            a, "memory-save", "s0", f"file:{image}", backends=["m0"]
        )
        await a.execute("job-dismiss", {"id": "s0"})
        saved_m0 = (shm / "m0").read_bytes()
        (shm / "m0").write_bytes(bytes(MiB))
        reading, go_on = threading.Event(), threading.Event()
        read_checksums = restore_module.read_checksums

        def held_read_checksums(*args: Any) -> Any:
            table = read_checksums(*args)
            reading.set()
            assert go_on.wait(30)
            return table

        monkeypatch.setattr(restore_module, "read_checksums", held_read_checksums)
        restoring = asyncio.ensure_future(
            b.execute("memory-restore", {"job-id": "r", "uri": f"file:{image}", "backends": ["m0"]})
        )
        await poll_until(
            lambda: asyncio.sleep(0, reading.is_set()), bool, "restore reading checksums"
        )
        desc = await qmp_error(
            a, "memory-save", {"job-id": "s1", "uri": f"file:{image}", "backends": ["m1"]}
        )
        assert desc == (
            f"'{image}' is in use by another job that reads or writes it (another migd "
            "process's, or one of this migd's that is starting): two jobs cannot use one "
            "file while either writes it"
        )
        go_on.set()
        assert await restoring == {}
        assert "error" not in await _concluded(b, "r")
        assert (shm / "m0").read_bytes() == saved_m0
        assert "s1" not in [j["id"] for j in await a.execute("query-jobs")]
    finally:
        go_on.set()
        await a.disconnect()
        await b.disconnect()


async def _concluded(client: Any, job_id: str) -> dict[str, Any]:
    jobs = await poll_until(
        lambda: client.execute("query-jobs"),
        lambda jobs: any(j["id"] == job_id and j["status"] == "concluded" for j in jobs),
        f"job {job_id} concluded",
    )
    return next(j for j in jobs if j["id"] == job_id)


def _holds_whole_save_of(image: Path, memory: Path) -> bool:
    saved = parse_save(image)
    [block] = saved.blocks
    return bool(saved.complete) and read_pages(image, block) == memory.read_bytes()


async def test_a_file_another_request_is_creating_is_refused_until_that_one_started(
    migd_inproc, shm, short_dir, monkeypatch
):
    """Two saves name one new file: while the one that created it may still be refused
    (and remove it), the other is refused ("try again"), and the first completes. (Before:
    the other opened the file and started, the creator was refused and removed the file,
    and the other completed into a file with no name; red-team, session 15.)"""
    from migd.io import target as target_module

    a, b = await _two_clients_two_backends(migd_inproc, shm)
    try:
        image = short_dir / "f.sav"
        created, go_on = threading.Event(), threading.Event()
        open_main = target_module.FileTarget.open_main

        def held_open_main(self: Any, *args: Any) -> int:
            fd = open_main(self, *args)
            if not created.is_set():  # the first save (A) waits, its new file open
                assert self._created
                created.set()
                assert go_on.wait(30)
            return fd

        monkeypatch.setattr(target_module.FileTarget, "open_main", held_open_main)
        # Throttled: A still runs when B tries again.
        args = {"job-id": "A", "uri": f"file:{image}", "backends": ["m0"], "max-bandwidth": 262144}
        first = asyncio.ensure_future(a.execute("memory-save", args))
        await poll_until(lambda: asyncio.sleep(0, created.is_set()), bool, "A created the file")
        other = {"job-id": "B", "uri": f"file:{image}", "backends": ["m1"]}
        with pytest.raises(ExecuteError) as refused:
            await b.execute("memory-save", other)
        assert "is being created by another request of migd's" in refused.value.error.error.desc
        go_on.set()
        assert await first == {}
        # Started, the file is A's job's like any other: the engine's checks apply.
        with pytest.raises(ExecuteError) as refused:
            await b.execute("memory-save", other)
        assert "is the file of job 'A'" in refused.value.error.error.desc
        await a.execute("job-cancel", {"id": "A"})
        await _concluded(a, "A")
        assert await b.execute("memory-save", {**other, "job-id": "C"}) == {}
        assert "error" not in await _concluded(b, "C")
        assert _holds_whole_save_of(image, shm / "m1")
    finally:
        go_on.set()
        await a.disconnect()
        await b.disconnect()


async def test_a_save_refused_after_creating_its_file_leaves_it_to_the_job_that_opened_it(
    migd_inproc, shm, short_dir, monkeypatch
):
    """The other order: B opens the new file between A's create and A's claim on it, and
    starts; A, refused (B's file), must not remove it: B's save is whole in it."""
    import fcntl

    from migd.state import paths

    a, b = await _two_clients_two_backends(migd_inproc, shm)
    try:
        image = short_dir / "f.sav"
        created, go_on = threading.Event(), threading.Event()
        claim = paths._claim

        def held_claim(fd: int, kind: int) -> bool | None:
            if kind == fcntl.F_WRLCK and not created.is_set():  # A, right after its create
                created.set()
                assert go_on.wait(30)
            return claim(fd, kind)

        monkeypatch.setattr(paths, "_claim", held_claim)
        first = asyncio.ensure_future(
            a.execute("memory-save", {"job-id": "A", "uri": f"file:{image}", "backends": ["m0"]})
        )
        await poll_until(lambda: asyncio.sleep(0, created.is_set()), bool, "A created the file")
        # B opens the file A created, and starts (throttled: still running when A checks).
        args = {"job-id": "B", "uri": f"file:{image}", "backends": ["m1"], "max-bandwidth": 262144}
        assert await b.execute("memory-save", args) == {}
        go_on.set()
        with pytest.raises(ExecuteError) as refused:
            await first
        assert "is the file of job 'B'" in refused.value.error.error.desc
        assert image.exists(), "the refused save removed the running job's file"
        assert "error" not in await _concluded(b, "B")
        assert _holds_whole_save_of(image, shm / "m1")
    finally:
        go_on.set()
        await a.disconnect()
        await b.disconnect()


def test_a_file_removed_by_its_creator_just_after_the_open_is_refused(tmp_path, monkeypatch):
    """The other half of the race above: a request that opened an existing file which
    its creator, refused, removed right after this open's checks (one link then) must not
    go on with a file that has no name."""
    from migd.state import paths

    name = tmp_path / "f.sav"
    name.write_bytes(b"")
    name.chmod(0o600)
    check_trusted = paths.check_trusted

    def checked_then_removed(path: str, st: os.stat_result, owners: Any) -> None:
        check_trusted(path, st, owners)
        os.unlink(path)  # the creator's cleanup, just after this request's checks

    monkeypatch.setattr(paths, "check_trusted", checked_then_removed)
    with pytest.raises(paths.FileRefused, match="was removed while migd opened it"):
        paths.open_regular(str(name), os.O_WRONLY, create=False, owners={0})


async def test_object_add_refuses_the_file_of_a_running_job(qmp, shm, short_dir):
    fill_random(shm / "m0", 8 * MiB)
    await add_file_backend(qmp, "m0", shm / "m0", 8 * MiB)
    image = short_dir / "f.sav"
    assert "error" not in await _memory_job(qmp, "memory-save", "s0", f"file:{image}")
    before = _digest(image)
    await qmp.execute(
        "memory-restore",
        {"job-id": "r", "uri": f"file:{image}", "max-bandwidth": MiB, "multifd-channels": 1},
    )
    text = await qmp_error(
        qmp,
        "object-add",
        {"qom-type": "memory-backend-file", "id": "m1", "size": MiB, "mem-path": str(image)},
    )
    assert text == (
        f"'{image}' is the file of job 'r' (restore of '{image}'): it cannot be a memory "
        "backend's file too"
    )
    assert [b["id"] for b in await qmp.execute("query-memdev")] == ["m0"]
    await qmp.execute("job-cancel", {"id": "r"})
    assert _digest(image) == before


@pytest.mark.parametrize("alias", ["same path", "symlink"])
async def test_object_add_refuses_a_second_backend_on_one_file(qmp, shm, alias):
    data = fill_random(shm / "m0", MiB)
    await add_file_backend(qmp, "m0", shm / "m0", MiB)
    name = shm / "m0"
    if alias == "symlink":
        name = shm / "alias"
        name.symlink_to(shm / "m0")
    text = await qmp_error(
        qmp,
        "object-add",
        {"qom-type": "memory-backend-file", "id": "m1", "size": MiB, "mem-path": str(name)},
    )
    expected = f"'{name}' is already the memory file of memory backend 'm0'"
    if alias == "symlink":
        expected += f" ('{shm / 'm0'}')"
    assert text == expected + ": two backends cannot map one file"
    assert [b["id"] for b in await qmp.execute("query-memdev")] == ["m0"]
    assert (shm / "m0").read_bytes() == data


# --- one file through an overlayfs mount and through its layer (red-team, round 10b)


@pytest.fixture
def overlay(shm: Path, short_dir: Path) -> Iterator[tuple[Path, Path]]:
    """(upper layer, merged view) of an overlayfs mount whose layers are on tmpfs: a file
    of the upper layer has two names, with two devices (the overlay's, tmpfs's)."""
    for layer in ("lower", "upper", "work"):
        (shm / layer).mkdir()
    options = f"lowerdir={shm / 'lower'},upperdir={shm / 'upper'},workdir={shm / 'work'}"
    mount = ["-t", "overlay", "overlay", "-o", options]
    for merged in _mounted(short_dir / "ov", mount, "overlay"):
        yield shm / "upper", merged


@pytest.mark.parametrize("first", ["upper", "merged"])
async def test_object_add_refuses_a_second_backend_on_one_file_through_an_overlay(
    qmp, overlay, first
):
    """A backend's file named again through an overlayfs mount (a container's merged view
    of the host's layer directory): the overlay gives it its own device, and the second
    backend was added; a restore into it then overwrote the first's memory, both
    `completed`."""
    upper, merged = overlay
    data = fill_random(upper / "m0", MiB)
    names = {"upper": upper / "m0", "merged": merged / "m0"}
    second = names["merged" if first == "upper" else "upper"]
    await add_file_backend(qmp, "m0", names[first], MiB)
    text = await qmp_error(
        qmp,
        "object-add",
        {"qom-type": "memory-backend-file", "id": "m1", "size": MiB, "mem-path": str(second)},
    )
    assert text.startswith(f"'{second}' is already the memory file of memory backend 'm0'"), text
    assert [b["id"] for b in await qmp.execute("query-memdev")] == ["m0"]
    assert (upper / "m0").read_bytes() == data


async def test_a_save_into_a_backends_file_through_an_overlay_is_refused(qmp, overlay):
    """A save to the merged name of a backend's memory file, which the backend maps by its
    layer's name: it would truncate and overwrite that memory."""
    upper, merged = overlay
    fill_random(upper / "ram0", MiB)
    await add_file_backend(qmp, "ram0", upper / "ram0", MiB)
    await enable_mapped_ram(qmp)
    before = _digest(upper / "ram0")
    text = await qmp_error(qmp, "migrate", {"uri": f"file:{merged / 'ram0'}"})
    assert text.startswith(f"'{merged / 'ram0'}' is the memory file of memory backend 'ram0'")
    assert _digest(upper / "ram0") == before


async def test_a_save_into_a_running_restores_file_through_an_overlay_is_refused(qmp, overlay):
    """A memory-save to the merged name of the file a running restore reads by its layer's
    name: the two jobs' holds are locks on two inodes (the overlay's, the layer's), which
    never conflict, so only the job's file identity can tell; the save truncated the file
    the restore read."""
    upper, merged = overlay
    fill_random(upper / "m0", MiB, seed=1)
    fill_random(upper / "m1", MiB, seed=2)
    await add_file_backend(qmp, "m0", upper / "m0", MiB)
    await add_file_backend(qmp, "m1", upper / "m1", MiB)
    await enable_mapped_ram(qmp)
    image = upper / "img"
    saved = await _memory_job(qmp, "memory-save", "s", f"file:{image}", backends=["m0"])
    assert saved["status"] == "concluded" and saved.get("error") is None
    before = _digest(image)
    restore_job = {"job-id": "r", "uri": f"file:{image}", "backends": ["m0"], "max-bandwidth": 1}
    await qmp.execute("memory-restore", restore_job)  # held by its 1 byte/s until cancelled
    save_job = {"job-id": "s2", "uri": f"file:{merged / 'img'}", "backends": ["m1"]}
    text = await qmp_error(qmp, "memory-save", save_job)
    assert text.startswith(f"'{merged / 'img'}' is the file of job 'r' (restore of"), text
    await qmp.execute("job-cancel", {"id": "r"})
    assert _digest(image) == before


# --- a backend deleted while migrate / migrate-incoming starts (red-team, session 13)


@pytest.mark.parametrize("command", ["migrate", "migrate-incoming"])
async def test_a_backend_deleted_while_a_migration_starts_makes_it_refused(
    migd_inproc, shm, short_dir, monkeypatch, command
):
    """migrate and migrate-incoming take every backend, resolved before they open and read
    their file in threads: an object-del meanwhile left a closed backend in the job, which
    answered {} and then failed with "Memory backend 'm1' is closed"."""
    from migd.io import target as target_module
    from migd.migration.mapped_ram import restore as restore_module

    a, b = await migd_inproc.client("a"), await migd_inproc.client("b")
    try:
        for name, seed in (("m0", 1), ("m1", 2)):
            fill_random(shm / name, MiB, seed=seed)
            await add_file_backend(a, name, shm / name, MiB)
        await enable_mapped_ram(a)
        image = short_dir / "f.sav"
        if command == "migrate-incoming":
            assert (await save(a, image))["status"] == "completed"
        before = _digest(image) if image.exists() else None
        held, go_on = threading.Event(), threading.Event()

        def hold(function: Any) -> Any:
            def held_function(*args: Any, **kwargs: Any) -> Any:
                result = function(*args, **kwargs)
                held.set()
                assert go_on.wait(30)
                return result

            return held_function

        if command == "migrate":
            monkeypatch.setattr(
                target_module.FileTarget,
                "open_main",
                hold(target_module.FileTarget.open_main),
            )
        else:
            monkeypatch.setattr(restore_module, "parse", hold(restore_module.parse))
        starting = asyncio.ensure_future(a.execute(command, {"uri": f"file:{image}"}))
        await poll_until(lambda: asyncio.sleep(0, held.is_set()), bool, f"{command} held")
        assert await b.execute("object-del", {"id": "m1"}) == {}
        go_on.set()
        with pytest.raises(ExecuteError) as refused:
            await starting
        assert refused.value.error.error.desc == (
            "The memory backends changed while the migration started (from 'm0', 'm1' to "
            "'m0': object-add or object-del by another client); nothing was written"
        )
        status = await a.execute("query-migrate")
        assert status.get("status") in (None, "completed")  # the save of setup, or none
        if before is None:
            assert not image.exists()  # the refused save removed the file it created
        else:
            assert _digest(image) == before
        monkeypatch.undo()
        # The daemon goes on: the same command now runs on the backend left.
        if command == "migrate":
            assert (await save(a, image))["status"] == "completed"
    finally:
        go_on.set()
        await a.disconnect()
        await b.disconnect()


# --- two migd processes on one file (red-team, session 17) ----------------------------------


def _job_concluded(client: RawClient, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = next(j for j in client.ok("query-jobs") if j["id"] == job_id)
        if job["status"] == "concluded":
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.01)


def _in_use(verb: str, path: Path) -> str:
    return (
        f"'{path}' is in use by another job that {verb} it (another migd process's, or one "
        "of this migd's that is starting): two jobs cannot use one file while either writes it"
    )


def test_two_migd_processes_never_run_jobs_on_one_file_that_either_writes(
    short_dir: Path, shm: Path
) -> None:
    """Each daemon refuses a second job on a file among its own jobs; two daemons (the
    shared one and an instance, say) knew nothing of each other's. A buffered save into
    the file another migd was saving into `completed`, and as its checksums are read back
    from its file, recorded the other save's pages too: `migd verify` passed a file that
    held 561 of 2048 pages of the other VM's memory. Now a job holds its file (a save a
    write lock, a restore a read lock) from its open to its end."""
    first = start_daemon(short_dir / "a.sock")
    second = start_daemon(short_dir / "b.sock")
    try:
        a = RawClient(first.socket_path).negotiate()
        b = RawClient(second.socket_path).negotiate()
        for client, name, seed in ((a, "ma", 1), (b, "mb", 2)):
            fill_random(shm / name, 4 * MiB, seed=seed)
            client.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram0",
                                     "size": 4 * MiB, "mem-path": str(shm / name)})  # fmt: skip
        image = short_dir / "f.sav"
        # At 256 KiB/s the save runs for 16 s: it holds its file until it is cancelled.
        a.ok("memory-save", {"job-id": "s", "uri": f"file:{image}", "max-bandwidth": 1 << 18})
        reply = b.execute("memory-save", {"job-id": "s", "uri": f"file:{image}"})
        assert reply["error"]["desc"] == _in_use("reads or writes", image)
        reply = b.execute("memory-restore", {"job-id": "r", "uri": f"file:{image}"})
        assert reply["error"]["desc"] == _in_use("writes", image)
        assert b.ok("query-jobs") == []
        a.ok("job-cancel", {"id": "s"})
        assert _job_concluded(a, "s")["error"] == "Operation canceled"
        # The hold ends with the job: the other daemon saves now, and its restore, while it
        # reads the file, keeps the first daemon's save out.
        b.ok("memory-save", {"job-id": "s", "uri": f"file:{image}"})
        assert "error" not in _job_concluded(b, "s")
        b.ok("memory-restore", {"job-id": "r", "uri": f"file:{image}", "max-bandwidth": 1 << 18})
        reply = a.execute("memory-save", {"job-id": "s2", "uri": f"file:{image}"})
        assert reply["error"]["desc"] == _in_use("reads or writes", image)
        # Two restores may read one file, whichever daemons run them.
        a.ok("memory-restore", {"job-id": "r", "uri": f"file:{image}", "max-bandwidth": 1 << 18})
        a.ok("job-cancel", {"id": "r"})
        _job_concluded(a, "r")
        b.ok("job-cancel", {"id": "r"})
        _job_concluded(b, "r")
    finally:
        first.stop()
        second.stop()


def test_two_migd_processes_never_run_jobs_on_one_memory_file_that_either_writes(
    short_dir: Path, shm: Path
) -> None:
    """Two daemons with a backend on one memory file: a restore by one into it while the
    other saved it made that save a mix of old and restored memory, `completed` with
    checksums of the mix; two restores into it both `completed`, the memory a mix of the
    two files where each checked its pages in a staging buffer. Now a job holds its
    backends' files too (a restore a write lock, a save a read lock) until it ends."""
    first = start_daemon(short_dir / "a.sock")
    second = start_daemon(short_dir / "b.sock")
    try:
        a = RawClient(first.socket_path).negotiate()
        b = RawClient(second.socket_path).negotiate()
        memory = shm / "m"
        fill_random(memory, 4 * MiB, seed=1)
        for client in (a, b):
            client.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram0",
                                     "size": 4 * MiB, "mem-path": str(memory)})  # fmt: skip
        image = short_dir / "f.sav"
        a.ok("memory-save", {"job-id": "s", "uri": f"file:{image}"})
        assert "error" not in _job_concluded(a, "s")
        slow = {"max-bandwidth": 1 << 18}  # 16 s for 4 MiB: running until cancelled
        b.ok("memory-save", {"job-id": "s", "uri": f"file:{short_dir}/g.sav", **slow})
        reply = a.execute("memory-restore", {"job-id": "r", "uri": f"file:{image}"})
        in_use = (
            f"Memory backend 'ram0' file '{memory}' is in use by a job that reads or "
            "writes it (another migd process's, or one of this migd's that is starting): "
            "two jobs cannot use one file while either writes it"
        )
        assert reply["error"]["desc"] == in_use
        assert [j["id"] for j in a.ok("query-jobs")] == ["s"]
        b.ok("job-cancel", {"id": "s"})
        _job_concluded(b, "s")
        b.ok("job-dismiss", {"id": "s"})
        # The hold ends with the job: the restore runs now, and keeps the other's out.
        a.ok("memory-restore", {"job-id": "r", "uri": f"file:{image}", **slow})
        reply = b.execute("memory-restore", {"job-id": "r", "uri": f"file:{image}"})
        assert reply["error"]["desc"] == in_use
        assert b.ok("query-jobs") == []
        a.ok("job-cancel", {"id": "r"})
        _job_concluded(a, "r")
    finally:
        first.stop()
        second.stop()


def test_a_save_into_another_migd_processs_memory_file_is_refused(
    short_dir: Path, shm: Path
) -> None:
    """A daemon refuses a save into one of its own backends' files; a save of another
    daemon into it truncated and overwrote that guest RAM (the first daemon then saved
    the other's save file as its memory, `completed`). A backend now marks its file while
    it maps it (state/paths.hold_as_memory), and object-del takes the mark away."""
    first = start_daemon(short_dir / "a.sock")
    second = start_daemon(short_dir / "b.sock")
    try:
        a = RawClient(first.socket_path).negotiate()
        b = RawClient(second.socket_path).negotiate()
        guest = fill_random(shm / "ma", 4 * MiB, seed=1)
        fill_random(shm / "mb", 4 * MiB, seed=2)
        for client, name in ((a, "ma"), (b, "mb")):
            client.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram0",
                                     "size": 4 * MiB, "mem-path": str(shm / name)})  # fmt: skip
        reply = b.execute("memory-save", {"job-id": "s", "uri": f"file:{shm / 'ma'}"})
        assert reply["error"]["desc"] == (
            f"'{shm / 'ma'}' is the memory file of a memory backend of another migd "
            "process: a save to it would overwrite that memory"
        )
        assert (shm / "ma").read_bytes() == guest
        assert b.ok("query-jobs") == []
        a.ok("object-del", {"id": "ram0"})
        b.ok("memory-save", {"job-id": "s", "uri": f"file:{shm / 'ma'}"})
        assert "error" not in _job_concluded(b, "s")
    finally:
        first.stop()
        second.stop()


async def test_a_job_lets_go_of_its_files_before_its_end_goes_out(migd_inproc, qmp, shm, short_dir):
    """A client that acts on JOB_STATUS_CHANGE `concluded` at once (runs `migd verify`,
    starts a job of another migd on the file) must not find the job still holding its
    file or its memory file: the holds went only after the event (red-team, session 17)."""
    from migd.state.paths import written_by_a_job

    engine = migd_inproc.daemon.services.engine
    image, memory = short_dir / "f.sav", shm / "m0"
    fill_random(memory, MiB, seed=1)
    await add_file_backend(qmp, "m0", memory, MiB)
    held_at_end: dict[tuple[str, str], bool] = {}
    emit = engine.emit

    def watching_emit(name: str, data: dict[str, Any]) -> None:
        if name == "JOB_STATUS_CHANGE" and data["status"] == "concluded":
            for what, path in (("file", image), ("memory", memory)):
                fd = os.open(path, os.O_RDONLY)
                try:
                    held_at_end[data["id"], what] = written_by_a_job(fd)
                finally:
                    os.close(fd)
        emit(name, data)

    engine.emit = watching_emit
    assert "error" not in await _memory_job(qmp, "memory-save", "s", f"file:{image}")
    assert "error" not in await _memory_job(qmp, "memory-restore", "r", f"file:{image}")
    assert held_at_end == {
        ("s", "file"): False, ("s", "memory"): False,
        ("r", "file"): False, ("r", "memory"): False,
    }  # fmt: skip


def _verify(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migd", "verify", str(image)], capture_output=True, text=True
    )


async def test_object_add_of_a_file_another_migd_processs_job_writes_is_refused(
    migd_inproc, qmp, shm, short_dir, monkeypatch
):
    """Another migd's object-add of a save file while the save runs: caught just after
    the save cut its file empty (write_head), it extended it to its `size`, and the save
    went on to `completed` with zeros past its end: `migd verify` and every restore refused
    it (red-team, session 18; a cut landing after the extension instead left the backend
    mapping nothing). Refused now, as is one of a memory file a restore of that other
    migd writes; the save is whole."""
    from migd.migration.mapped_ram import save as save_module

    cut, go_on = threading.Event(), threading.Event()
    truncate = save_module.truncate

    def held_truncate(fd: int, at: int, path: str) -> None:
        truncate(fd, at, path)
        cut.set()
        assert go_on.wait(30)

    monkeypatch.setattr(save_module, "truncate", held_truncate)
    fill_random(shm / "m0", 4 * MiB, seed=1)
    await add_file_backend(qmp, "m0", shm / "m0", 4 * MiB)
    image = short_dir / "f.sav"
    other = start_daemon(short_dir / "b.sock")
    try:
        b = RawClient(other.socket_path).negotiate()
        await qmp.execute("memory-save", {"job-id": "s", "uri": f"file:{image}"})
        await poll_until(lambda: asyncio.sleep(0, cut.is_set()), bool, "the save cut its file")
        assert image.stat().st_size == 0
        add = {"qom-type": "memory-backend-file", "id": "x", "size": 8 * MiB}
        reply = b.execute("object-add", {**add, "mem-path": str(image)})
        go_on.set()
        assert "error" not in await _concluded(qmp, "s")
        verified = _verify(image)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert reply.get("error", {}).get("desc") == (
            f"Memory file '{image}' is being written by a job of another migd process: it "
            "is that job's save file or memory until it ends"
        ), reply
        assert b.ok("query-memdev") == []

        # A restore of this migd's into its backend's file: that file too.
        args = {"job-id": "r", "uri": f"file:{image}", "max-bandwidth": 1 << 18}
        await qmp.execute("memory-restore", args)
        reply = b.execute("object-add", {**add, "size": 4 * MiB, "mem-path": str(shm / "m0")})
        assert reply["error"]["desc"].startswith(f"Memory file '{shm / 'm0'}' is being written")
        await qmp.execute("job-cancel", {"id": "r"})
        await _concluded(qmp, "r")
        b.close()
    finally:
        go_on.set()
        other.stop()


def test_two_migd_processes_on_one_file_through_an_overlay_and_its_layer_never_share_a_job(
    short_dir: Path, overlay: tuple[Path, Path]
) -> None:
    """Two daemons, one naming a file by its overlayfs name and the other by its layer's
    name: their jobs' holds (OFD locks) were taken on two inodes, the overlay's and the
    layer's, and never met: a restore by one into the memory file both map ran beside the
    other's save of it, and a restore from a file beside the other's save into it (the
    mixes the holds are there to refuse). Now a job on overlayfs holds its layer's file.
    The saves start first: a restore running first would have marked the memory file
    partial, which refuses a save of it before its holds are looked at."""
    upper, merged = overlay
    first = start_daemon(short_dir / "a.sock")
    second = start_daemon(short_dir / "b.sock")
    try:
        a = RawClient(first.socket_path).negotiate()
        b = RawClient(second.socket_path).negotiate()
        fill_random(upper / "m", 4 * MiB, seed=1)
        for client, name in ((a, upper / "m"), (b, merged / "m")):
            client.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram0",
                                     "size": 4 * MiB, "mem-path": str(name)})  # fmt: skip
        image = short_dir / "f.sav"
        a.ok("memory-save", {"job-id": "s", "uri": f"file:{image}"})
        assert "error" not in _job_concluded(a, "s")
        slow = {"max-bandwidth": 1 << 18}  # 16 s for 4 MiB: running until cancelled
        b.ok("memory-save", {"job-id": "s", "uri": f"file:{short_dir}/g.sav", **slow})
        reply = a.execute("memory-restore", {"job-id": "r", "uri": f"file:{image}"})
        assert reply.get("error", {}).get("desc", "").startswith(
            f"Memory backend 'ram0' file '{upper / 'm'}' is in use by a job that reads or "
            "writes it"
        ), reply
        b.ok("job-cancel", {"id": "s"})
        _job_concluded(b, "s")

        # A save into the file by its merged name, slow; a restore from it by its
        # layer's name in the other daemon.
        b.ok("object-del", {"id": "ram0"})
        a.ok("object-del", {"id": "ram0"})
        fill_random(upper / "n", 4 * MiB, seed=2)
        b.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram1",
                            "size": 4 * MiB, "mem-path": str(upper / "n")})  # fmt: skip
        b.ok("memory-save", {"job-id": "t", "uri": f"file:{merged / 'h.sav'}", **slow})
        a.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram1",
                            "size": 4 * MiB, "mem-path": str(short_dir / "n2")})  # fmt: skip
        reply = a.execute("memory-restore", {"job-id": "u", "uri": f"file:{upper / 'h.sav'}"})
        assert reply.get("error", {}).get("desc") == _in_use("writes", upper / "h.sav"), reply
        b.ok("job-cancel", {"id": "t"})
        _job_concluded(b, "t")
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("backend_by", ["upper", "merged"])
def test_a_save_into_another_migd_processs_memory_file_by_its_other_name_is_refused(
    short_dir: Path, overlay: tuple[Path, Path], backend_by: str
) -> None:
    """A save by one daemon into the memory file another daemon's backend maps, the two
    naming it by its overlayfs name and by its layer's: the backend's mark (an OFD lock)
    was on one inode and the save looked on the other, and the save truncated and
    overwrote that memory. The mark and the look are on the layer's file too now."""
    upper, merged = overlay
    names = {"upper": upper / "m", "merged": merged / "m"}
    saved_by = names["merged" if backend_by == "upper" else "upper"]
    first = start_daemon(short_dir / "a.sock")
    second = start_daemon(short_dir / "b.sock")
    try:
        a = RawClient(first.socket_path).negotiate()
        b = RawClient(second.socket_path).negotiate()
        data = fill_random(upper / "m", 4 * MiB, seed=1)
        a.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram0",
                            "size": 4 * MiB, "mem-path": str(names[backend_by])})  # fmt: skip
        fill_random(short_dir / "n", MiB, seed=2)
        b.ok("object-add", {"qom-type": "memory-backend-file", "id": "ram1",
                            "size": MiB, "mem-path": str(short_dir / "n")})  # fmt: skip
        reply = b.execute("memory-save", {"job-id": "s", "uri": f"file:{saved_by}"})
        assert reply.get("error", {}).get("desc") == (
            f"'{saved_by}' is the memory file of a memory backend of another migd process: "
            "a save to it would overwrite that memory"
        ), reply
        assert (upper / "m").read_bytes() == data
    finally:
        first.stop()
        second.stop()
