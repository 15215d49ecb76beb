"""Passed fds: getfd/closefd, add-fd/remove-fd/query-fdsets, saves, restores and memory
backends through /dev/fdset/N, and no fd left behind by any of them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

import numpy as np
import pytest
from qemu.qmp import ExecuteError

from migd.migration.mapped_ram import format

from .conftest import (
    RawClient,
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    migd_threads,
    open_fds,
    parse_save,
    qmp_error,
    read_pages,
    restore,
    save,
    wait_migration,
    wait_status,
)

MiB = 1 << 20
PAGE = 4096
HEADER_END = 0x11921  # libvirt's save-image header ends here: unaligned on purpose
NO_FD = "No file descriptor supplied via SCM_RIGHTS"


async def _with_fd(client, fd: int, command: str, arguments=None):
    """Send fd as qemu.qmp does (one space byte with SCM_RIGHTS), then the command."""
    client.send_fd_scm(fd)
    return await client.execute(command, arguments)


async def _add_fd(client, fd: int, **arguments) -> dict:
    return await _with_fd(client, fd, "add-fd", arguments)


def _targets(path) -> int:
    """How many fds of this process (the test and the in-process daemon) point at path."""
    return sum(1 for entry in open_fds() if entry.endswith(f" -> {path}"))


def _memory(size: int, seed: int = 5) -> bytes:
    """Random pages with a 2 MiB zero cluster and scattered zero pages."""
    rng = np.random.default_rng(seed)
    data = bytearray(rng.integers(0, 256, size, dtype=np.uint8))
    data[2 * MiB : 4 * MiB] = bytes(2 * MiB)
    for p in rng.choice(size // PAGE, size // PAGE // 10, replace=False):
        data[p * PAGE : (p + 1) * PAGE] = bytes(PAGE)
    return bytes(data)


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)


# -- getfd / closefd -----------------------------------------------------------------------


async def test_getfd_keeps_a_passed_fd_until_closefd_closes_it(qmp, short_dir):
    path = short_dir / "named"
    baseline = open_fds()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    assert await _with_fd(qmp, fd, "getfd", {"fdname": "vm-sock"}) == {}
    os.close(fd)
    assert _targets(path) == 1  # the daemon's copy
    assert await qmp.execute("closefd", {"fdname": "vm-sock"}) == {}
    assert open_fds() == baseline


async def test_getfd_under_an_existing_name_closes_the_older_fd(qmp, short_dir):
    first, second = short_dir / "first", short_dir / "second"
    for path in (first, second):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        await _with_fd(qmp, fd, "getfd", {"fdname": "x"})
        os.close(fd)
    assert _targets(first) == 0 and _targets(second) == 1
    await qmp.execute("closefd", {"fdname": "x"})
    assert _targets(second) == 0


async def test_getfd_without_a_passed_fd_is_refused(qmp):
    assert await qmp_error(qmp, "getfd", {"fdname": "x"}) == NO_FD


async def test_closefd_of_an_unknown_name_is_refused(qmp):
    text = await qmp_error(qmp, "closefd", {"fdname": "nope"})
    assert text == "File descriptor named 'nope' not found"


async def test_getfd_with_a_name_starting_with_a_digit_is_refused_and_closes_the_fd(qmp, short_dir):
    path = short_dir / "digit"
    baseline = open_fds()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    qmp.send_fd_scm(fd)
    text = await qmp_error(qmp, "getfd", {"fdname": "1abc"})
    assert text == "Parameter 'fdname' expects a name not starting with a digit"
    os.close(fd)
    assert open_fds() == baseline


# -- add-fd / query-fdsets / remove-fd -----------------------------------------------------


async def test_add_fd_allocates_the_lowest_free_id_and_query_fdsets_lists_qemu_style(
    qmp, short_dir
):
    path = short_dir / "f"
    baseline = open_fds()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        a = await _add_fd(qmp, fd)
        b = await _add_fd(qmp, fd, opaque="second")
        c = await _add_fd(qmp, fd, **{"fdset-id": 5})
        d = await _add_fd(qmp, fd, **{"fdset-id": 5, "opaque": "rw"})
        e = await _add_fd(qmp, fd)
    finally:
        os.close(fd)
    assert [x["fdset-id"] for x in (a, b, c, d, e)] == [0, 1, 5, 5, 2]
    for x in (a, b, c, d, e):  # the fd numbers are the daemon's (this very process)
        assert os.readlink(f"/proc/self/fd/{x['fd']}") == str(path)
    assert len({x["fd"] for x in (a, b, c, d, e)}) == 5
    assert await qmp.execute("query-fdsets") == [
        {"fdset-id": 5, "fds": [{"fd": c["fd"]}, {"fd": d["fd"], "opaque": "rw"}]},
        {"fdset-id": 2, "fds": [{"fd": e["fd"]}]},
        {"fdset-id": 1, "fds": [{"fd": b["fd"], "opaque": "second"}]},
        {"fdset-id": 0, "fds": [{"fd": a["fd"]}]},
    ]
    assert await qmp.execute("remove-fd", {"fdset-id": 5, "fd": c["fd"]}) == {}
    fdsets = await qmp.execute("query-fdsets")
    assert fdsets[0] == {"fdset-id": 5, "fds": [{"fd": d["fd"], "opaque": "rw"}]}
    for fdset_id in (5, 2, 1, 0):
        assert await qmp.execute("remove-fd", {"fdset-id": fdset_id}) == {}
    assert await qmp.execute("query-fdsets") == []
    assert open_fds() == baseline


async def test_add_fd_errors_use_qemu_texts_and_never_keep_the_fd(qmp, short_dir):
    path = short_dir / "f"
    baseline = open_fds()
    assert await qmp_error(qmp, "add-fd", {"fdset-id": 1}) == NO_FD
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    qmp.send_fd_scm(fd)
    text = await qmp_error(qmp, "add-fd", {"fdset-id": -1})
    assert text == "Parameter 'fdset-id' expects a non-negative value"
    os.close(fd)
    assert _targets(path) == 0
    assert await qmp.execute("query-fdsets") == []
    assert open_fds() == baseline


async def test_remove_fd_of_an_unknown_set_or_fd_is_refused(qmp, short_dir):
    fd = os.open(short_dir / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        added = await _add_fd(qmp, fd, **{"fdset-id": 3})
    finally:
        os.close(fd)
    text = await qmp_error(qmp, "remove-fd", {"fdset-id": 42})
    assert text == "File descriptor named 'fdset-id:42' not found"
    text = await qmp_error(qmp, "remove-fd", {"fdset-id": 3, "fd": added["fd"] + 1000})
    assert text == f"File descriptor named 'fdset-id:3, fd:{added['fd'] + 1000}' not found"
    text = await qmp_error(qmp, "remove-fd", {"fdset-id": 42, "fd": added["fd"]})
    assert text == f"File descriptor named 'fdset-id:42, fd:{added['fd']}' not found"
    await qmp.execute("remove-fd", {"fdset-id": 3, "fd": added["fd"]})
    assert await qmp.execute("query-fdsets") == []


async def test_fdsets_are_shared_by_every_connection(qmp, migd_inproc, short_dir):
    fd = os.open(short_dir / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        added = await _add_fd(qmp, fd, **{"fdset-id": 7})
    finally:
        os.close(fd)
    other = await migd_inproc.client("other")
    try:
        assert await other.execute("query-fdsets") == [
            {"fdset-id": 7, "fds": [{"fd": added["fd"]}]}
        ]
        await other.execute("remove-fd", {"fdset-id": 7})
    finally:
        await other.disconnect()
    assert await qmp.execute("query-fdsets") == []


# -- saves and restores through /dev/fdset/N -----------------------------------------------


async def _fdset_of(client, fdset_id: int, path, *flag_sets: int) -> None:
    """Open path once per flag set (separate opens, not dups) and add each to the set."""
    for flags in flag_sets:
        fd = os.open(path, flags)
        try:
            await _add_fd(client, fd, **{"fdset-id": fdset_id})
        finally:
            os.close(fd)


async def test_save_and_restore_through_fdsets_keep_the_management_header(qmp, shm, short_dir):
    size = 16 * MiB
    data = _memory(size)
    (shm / "src").write_bytes(data)
    target = short_dir / "vm.sav"
    header = np.random.default_rng(1).integers(0, 256, HEADER_END, dtype=np.uint8).tobytes()
    target.write_bytes(header + b"stale bytes after the header, to be truncated" * 1000)
    baseline = open_fds()

    await add_file_backend(qmp, "ram0", shm / "src", size)
    await enable_mapped_ram(qmp, channels=4, direct_io=True)
    await _fdset_of(qmp, 1, target, os.O_WRONLY, os.O_WRONLY | os.O_DIRECT)
    info = await save(qmp, "/dev/fdset/1", offset=HEADER_END)
    assert info["status"] == "completed", info
    await qmp.execute("remove-fd", {"fdset-id": 1})
    assert await qmp.execute("query-fdsets") == []
    saved = target.read_bytes()
    assert saved[:HEADER_END] == header
    assert b"stale bytes" not in saved

    # The same save through the path gives the same bytes up to the end of the pages.
    plain = short_dir / "plain.sav"
    plain.write_bytes(header)
    assert (await save(qmp, plain, offset=HEADER_END))["status"] == "completed"
    parsed = format.parse_stream(lambda at, n: saved[at : at + n], HEADER_END, len(saved))
    pages_end = max(b.pages_offset + b.length for b in parsed.blocks)
    assert plain.read_bytes()[:pages_end] == saved[:pages_end]

    await qmp.execute("object-del", {"id": "ram0"})
    fill_random(shm / "dst", size, seed=77)
    await add_file_backend(qmp, "ram0", shm / "dst", size)
    await _fdset_of(qmp, 2, target, os.O_RDONLY, os.O_RDONLY | os.O_DIRECT)
    info = await restore(qmp, "/dev/fdset/2", offset=HEADER_END)
    assert info["status"] == "completed", info
    assert (shm / "dst").read_bytes() == data
    await qmp.execute("remove-fd", {"fdset-id": 2})
    await qmp.execute("object-del", {"id": "ram0"})
    assert open_fds() == baseline and migd_threads() == []


async def test_a_removed_fdset_lives_on_while_a_migration_holds_dups_of_it(
    qmp, shm, short_dir
):
    """QEMU's fdset lifetime: remove-fd closes the fds at once, but the set stays listed
    (with no fds) and its id stays taken until the running migration closes its dups."""
    size = 16 * MiB
    data = fill_random(shm / "src", size)
    await add_file_backend(qmp, "ram0", shm / "src", size)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    # About half a second of saving: room for the commands below while it runs.
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 32 * MiB})
    target = short_dir / "vm.sav"
    target.touch()
    await _fdset_of(qmp, 0, target, os.O_WRONLY, os.O_WRONLY | os.O_DIRECT)
    await qmp.execute("migrate", {"uri": "file:/dev/fdset/0"})
    await wait_status(qmp, "active")
    held = _targets(target)  # the two passed fds and the migration's dups of them
    await qmp.execute("remove-fd", {"fdset-id": 0})
    assert _targets(target) == held - 2  # the passed fds are closed at once
    assert await qmp.execute("query-fdsets") == [{"fdset-id": 0, "fds": []}]
    other = os.open(short_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert (await _add_fd(qmp, other))["fdset-id"] == 1  # 0 is still taken
    finally:
        os.close(other)
    assert (await wait_migration(qmp))["status"] == "completed"
    assert [entry["fdset-id"] for entry in await qmp.execute("query-fdsets")] == [1]
    assert _targets(target) == 0
    await qmp.execute("remove-fd", {"fdset-id": 1})
    assert await qmp.execute("query-fdsets") == []
    assert read_pages(target, parse_save(target).blocks[0]) == data


async def test_one_fd_serves_every_open_without_direct_io(qmp, shm, short_dir):
    size = 4 * MiB
    data = fill_random(shm / "src", size)
    await add_file_backend(qmp, "ram0", shm / "src", size)
    await enable_mapped_ram(qmp, channels=3, direct_io=False)
    target = short_dir / "vm.sav"
    target.touch()
    await _fdset_of(qmp, 0, target, os.O_WRONLY)
    assert (await save(qmp, "/dev/fdset/0"))["status"] == "completed"
    await _fdset_of(qmp, 1, target, os.O_RDONLY)
    (shm / "src").write_bytes(bytes(size))
    assert (await restore(qmp, "/dev/fdset/1"))["status"] == "completed"
    assert (shm / "src").read_bytes() == data


@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct-io"])
async def test_a_save_through_an_o_append_fd_keeps_the_layout(qmp, shm, short_dir, direct_io):
    """A management app may open the save file O_APPEND (as for a log). On Linux a
    positional write to an O_APPEND description lands at the end of the file whatever its
    offset, so every page would be written in the wrong place: the dup of a passed fd gets
    the open's flags (QEMU's qemu_dup_flags clears O_APPEND), and the save restores."""
    size = 4 * MiB
    data = _memory(size, seed=9)
    (shm / "src").write_bytes(data)
    await add_file_backend(qmp, "ram0", shm / "src", size)
    await enable_mapped_ram(qmp, channels=2, direct_io=direct_io)
    target = short_dir / "vm.sav"
    target.touch()
    appending = [os.O_WRONLY | os.O_APPEND]
    if direct_io:
        appending.append(os.O_WRONLY | os.O_APPEND | os.O_DIRECT)
    await _fdset_of(qmp, 0, target, *appending)
    assert (await save(qmp, "/dev/fdset/0"))["status"] == "completed"
    await qmp.execute("remove-fd", {"fdset-id": 0})
    assert read_pages(target, parse_save(target).blocks[0]) == data
    (shm / "src").write_bytes(bytes(size))
    assert (await restore(qmp, target))["status"] == "completed"
    assert (shm / "src").read_bytes() == data


@pytest.mark.parametrize(
    ("flag_sets", "failing_flags"),
    [
        ([os.O_WRONLY], os.O_WRONLY | os.O_DIRECT),  # no O_DIRECT twin: channels fail
        ([os.O_WRONLY | os.O_DIRECT], os.O_WRONLY | os.O_CREAT),  # no buffered fd: main
        ([os.O_RDWR, os.O_RDWR | os.O_DIRECT], os.O_WRONLY | os.O_CREAT),  # wrong mode
    ],
    ids=["missing-direct-twin", "missing-buffered-fd", "read-write-fds"],
)
async def test_save_through_an_fdset_without_the_matching_fd_fails_with_qemu_text(
    qmp, shm, short_dir, flag_sets, failing_flags
):
    size = 4 * MiB
    fill_random(shm / "src", size)
    await add_file_backend(qmp, "ram0", shm / "src", size)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    target = short_dir / "vm.sav"
    target.touch()
    await _fdset_of(qmp, 4, target, *flag_sets)
    baseline = open_fds()
    expected = f"Failed to find file descriptor with matching flags=0x{failing_flags:x}"
    try:
        await qmp.execute("migrate", {"uri": "file:/dev/fdset/4"})
    except ExecuteError as exc:  # the main channel's open: refused at once
        assert exc.error.error.desc == expected
    else:  # a multifd channel's open: the job fails
        info = await wait_migration(qmp)
        assert info["status"] == "failed" and info["error-desc"] == expected
    assert open_fds() == baseline and migd_threads() == []


async def test_a_dup_cannot_stand_in_for_the_o_direct_twin(qmp, shm, short_dir):
    """Two fds of one open file description share O_DIRECT, so the twin must be a new open."""
    size = 4 * MiB
    fill_random(shm / "src", size)
    await add_file_backend(qmp, "ram0", shm / "src", size)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    target = short_dir / "vm.sav"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    twin = os.dup(fd)
    try:
        await _add_fd(qmp, fd, **{"fdset-id": 0})
        await _add_fd(qmp, twin, **{"fdset-id": 0})
    finally:
        os.close(fd)
        os.close(twin)
    await qmp.execute("migrate", {"uri": "file:/dev/fdset/0"})
    info = await wait_migration(qmp)
    assert info["status"] == "failed"
    assert info["error-desc"] == "Failed to find file descriptor with matching flags=0x4001"


async def test_restore_through_an_fdset_without_the_o_direct_twin_is_refused(qmp, shm, short_dir):
    size = 4 * MiB
    fill_random(shm / "src", size)
    await add_file_backend(qmp, "ram0", shm / "src", size)
    await enable_mapped_ram(qmp, channels=2, direct_io=True)
    assert (await save(qmp, short_dir / "vm.sav"))["status"] == "completed"
    await _fdset_of(qmp, 0, short_dir / "vm.sav", os.O_RDONLY)
    await qmp.execute("migrate-incoming", {"uri": "file:/dev/fdset/0"})
    info = await wait_migration(qmp)
    assert info["status"] == "failed"
    assert "Failed to find file descriptor with matching flags=0x4000" in info["error-desc"]
    # it failed while opening the channels, before any page was read
    assert info["error-desc"].endswith("; no memory backend was changed")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:/dev/fdset/9", "Failed to find fdset /dev/fdset/9"),
        ("file:/dev/fdset/abc", "Could not parse fdset /dev/fdset/abc"),
        ("file:/dev/fdset/-1", "Could not parse fdset /dev/fdset/-1"),
    ],
)
async def test_a_missing_or_malformed_fdset_is_refused(qmp, shm, uri, expected):
    await add_file_backend(qmp, "ram0", shm / "src", 1 * MiB)
    await enable_mapped_ram(qmp)
    assert await qmp_error(qmp, "migrate", {"uri": uri}) == expected
    assert await qmp_error(qmp, "migrate-incoming", {"uri": uri}) == expected


# -- memory backends on passed fds ---------------------------------------------------------


async def test_memory_backend_on_a_passed_memfd_is_saved_and_restored_in_place(qmp, short_dir):
    size = 8 * MiB
    data = _memory(size, seed=11)
    memfd = os.memfd_create("vm-ram", os.MFD_CLOEXEC)
    memfd_target = os.readlink(f"/proc/self/fd/{memfd}")
    baseline = open_fds()
    try:
        os.ftruncate(memfd, size)
        os.pwrite(memfd, data, 0)
        await _add_fd(qmp, memfd, **{"fdset-id": 3, "opaque": "ram0"})
        await qmp.execute(
            "object-add",
            {
                "qom-type": "memory-backend-file",
                "id": "ram0",
                "size": size,
                "mem-path": "/dev/fdset/3",
            },
        )
        # The backend holds its own dup: the fd can go at once, as a VMM would do it. As in
        # QEMU, the set lives on, empty, while the backend's dup is open.
        await qmp.execute("remove-fd", {"fdset-id": 3})
        assert await qmp.execute("query-fdsets") == [{"fdset-id": 3, "fds": []}]
        memdev = await qmp.execute("query-memdev")
        assert memdev[0]["mem-path"] == "/dev/fdset/3" and memdev[0]["size"] == size
        await enable_mapped_ram(qmp, channels=2, direct_io=True)
        assert (await save(qmp, short_dir / "vm.sav"))["status"] == "completed"

        junk = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8).tobytes()
        os.pwrite(memfd, junk, 0)
        assert (await restore(qmp, short_dir / "vm.sav"))["status"] == "completed"
        assert os.pread(memfd, size, 0) == data
        await qmp.execute("object-del", {"id": "ram0"})
        assert await qmp.execute("query-fdsets") == []  # its last dup closed with the backend
        assert open_fds() == baseline
    finally:
        os.close(memfd)
    assert _targets(memfd_target) == 0


async def test_memory_backend_on_an_fdset_without_a_read_write_fd_is_refused(qmp, short_dir):
    path = short_dir / "ram"
    path.write_bytes(bytes(MiB))
    await _fdset_of(qmp, 0, path, os.O_RDONLY)
    args = {"qom-type": "memory-backend-file", "id": "ram0", "size": MiB}
    text = await qmp_error(qmp, "object-add", {**args, "mem-path": "/dev/fdset/0"})
    assert text == "Failed to find file descriptor with matching flags=0x2"
    text = await qmp_error(qmp, "object-add", {**args, "mem-path": "/dev/fdset/1"})
    assert text == "Failed to find fdset /dev/fdset/1"
    assert await qmp.execute("query-memdev") == []


# -- nothing left open ---------------------------------------------------------------------


def _send_unclaimed_fds(socket_path, paths, then_negotiate: bool) -> RawClient:
    """A raw client that sends fds with a space byte and no command to consume them."""
    client = RawClient(socket_path)
    fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in paths]
    try:
        socket.send_fds(client.sock, [b" "], fds)
    finally:
        for fd in fds:
            os.close(fd)
    if then_negotiate:  # a round trip proves the daemon has read the fds
        client.negotiate()
    return client


async def test_fds_no_command_consumes_are_closed_at_disconnect(migd_inproc, short_dir):
    paths = [short_dir / "a", short_dir / "b"]
    baseline = open_fds()
    client = await asyncio.to_thread(_send_unclaimed_fds, migd_inproc.socket_path, paths, True)
    try:
        assert [_targets(p) for p in paths] == [1, 1]  # pending in the daemon
    finally:
        client.close()
    await _wait_for(lambda: open_fds() == baseline)


async def test_a_new_batch_of_fds_closes_the_unconsumed_older_one(migd_inproc, short_dir):
    old, new = short_dir / "old", short_dir / "new"
    client = await asyncio.to_thread(_send_unclaimed_fds, migd_inproc.socket_path, [old], True)
    try:
        fd = os.open(new, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(socket.send_fds, client.sock, [b" "], [fd])
        finally:
            os.close(fd)
        reply = await asyncio.to_thread(client.execute, "add-fd", {"fdset-id": 0})
        assert reply["return"]["fdset-id"] == 0
        assert _targets(old) == 0 and _targets(new) == 1
        await asyncio.to_thread(client.execute, "remove-fd", {"fdset-id": 0})
    finally:
        client.close()


async def test_daemon_stop_closes_named_fds_fdsets_and_passed_memory(migd_inproc, short_dir):
    client = await migd_inproc.client()
    named, in_set = short_dir / "named", short_dir / "in-set"
    memfd = os.memfd_create("stop-ram", os.MFD_CLOEXEC)
    memfd_target = os.readlink(f"/proc/self/fd/{memfd}")
    try:
        for path, command, arguments in [
            (named, "getfd", {"fdname": "kept"}),
            (in_set, "add-fd", {"fdset-id": 0}),
        ]:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                await _with_fd(client, fd, command, arguments)
            finally:
                os.close(fd)
        os.ftruncate(memfd, MiB)
        await _add_fd(client, memfd, **{"fdset-id": 1})
        await client.execute(
            "object-add",
            {
                "qom-type": "memory-backend-file",
                "id": "ram0",
                "size": MiB,
                "mem-path": "/dev/fdset/1",
            },
        )
        # and one fd sent with no command, still pending on an open connection
        pending = short_dir / "pending"
        raw = await asyncio.to_thread(_send_unclaimed_fds, migd_inproc.socket_path, [pending], True)
        assert _targets(named) == _targets(in_set) == _targets(pending) == 1
        assert _targets(memfd_target) > 2  # the test's, the set's, the backend's (and mmap's)
        await migd_inproc.stop()
        assert _targets(named) == _targets(in_set) == _targets(pending) == 0
        assert _targets(memfd_target) == 1
        raw.close()
    finally:
        os.close(memfd)
        with contextlib.suppress(Exception):
            await client.disconnect()


async def test_a_command_takes_one_fd_of_a_batch_and_the_extras_are_closed(migd_inproc, short_dir):
    first, extra = short_dir / "first", short_dir / "extra"
    client = await asyncio.to_thread(
        _send_unclaimed_fds, migd_inproc.socket_path, [first, extra], True
    )
    try:
        reply = await asyncio.to_thread(client.execute, "add-fd", {"fdset-id": 3})
        assert reply["return"]["fdset-id"] == 3
        assert _targets(first) == 1 and _targets(extra) == 0
        await asyncio.to_thread(client.execute, "remove-fd", {"fdset-id": 3})
    finally:
        client.close()


async def test_an_opaque_note_over_the_bound_is_refused_and_its_fd_closed(qmp, short_dir):
    """add-fd's note is kept as long as the fd and sent back by every query-fdsets:
    unbounded, a few clients made it hundreds of MiB, encoded on the event loop."""
    from migd.api.fds import MAX_OPAQUE_CHARS

    path = short_dir / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await _add_fd(qmp, fd, opaque="x" * MAX_OPAQUE_CHARS)  # the most it takes
        before = _targets(path)
        text = await qmp_error_with_fd(qmp, fd, "x" * (MAX_OPAQUE_CHARS + 1))
    finally:
        os.close(fd)
    assert text == (
        f"Parameter 'opaque' is {MAX_OPAQUE_CHARS + 1} characters long: at most "
        f"{MAX_OPAQUE_CHARS}"
    )
    assert _targets(path) == before - 1  # this test's own fd closed; migd kept no new one
    [fdset] = await qmp.execute("query-fdsets")
    assert len(fdset["fds"]) == 1


async def qmp_error_with_fd(client, fd: int, opaque: str) -> str:
    from qemu.qmp import ExecuteError

    client.send_fd_scm(fd)
    try:
        await client.execute("add-fd", {"opaque": opaque})
    except ExecuteError as exc:
        return exc.error.error.desc
    raise AssertionError("add-fd accepted the note")


def test_messages_name_a_passed_fds_file_by_its_real_name(tmp_path):
    """An fdset path means nothing to a person reading an error, and nothing at all once
    the set is removed (a partial-restore mark outlives it): messages use the name the
    kernel knows the fd's file by, and keep /dev/fdset/N where the fd has none."""
    from migd.state.fdsets import file_name

    path = tmp_path / "save.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    read_end, write_end = os.pipe()
    try:
        assert file_name("/dev/fdset/4", fd) == str(path)
        assert file_name(str(path), fd) == str(path)  # a named file keeps its name
        os.unlink(path)
        assert file_name("/dev/fdset/4", fd) == f"{path} (deleted)"
        assert file_name("/dev/fdset/4", read_end) == "/dev/fdset/4"  # pipe:[N]
    finally:
        for each in (fd, read_end, write_end):
            os.close(each)


def test_removing_a_large_fdset_is_one_pass_not_a_comparison_of_every_pair(monkeypatch):
    """remove-fd compared each fd of the set with every other (`f not in gone`, a
    dataclass __eq__ per pair): removing 19,000 fds froze the daemon for 100 s (red-team,
    session 14). It is one pass now: no fd is compared with another at all."""
    from migd.state import fdsets

    store = fdsets.FdStore(lambda path, flags, direct: -1)
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        fds = [os.dup(null) for _ in range(300)]
    finally:
        os.close(null)
    for fd in fds:
        store.add_fd(fd, 5, None)
    comparisons = []
    monkeypatch.setattr(fdsets.FdsetFd, "__eq__", lambda a, b: comparisons.append(1) or a is b)
    store.remove_fd(5, fds[7])  # one fd
    store.remove_fd(5)  # the rest
    assert comparisons == []
    assert store.query() == []  # (that removed fds are closed: the open_fds tests above)


def test_the_room_for_passed_fds_is_counted_only_when_the_fd_table_could_be_full(monkeypatch):
    """Each passed fd checked the room for it by listing /proc/self/fd: O(fds open) per
    fd, which slowed the event loop for every client once thousands were stored (red-team,
    session 14). The fd table's size bounds the open fds, so they are counted only once
    that size passes what passed fds may use; the refusal itself is unchanged."""
    import resource

    from migd.errors import FdError
    from migd.state import fdsets

    table = fdsets._fd_table_size()
    assert table is not None and table > len(os.listdir("/proc/self/fd")) - 2
    listings = []
    counted = fdsets._open_fd_count
    monkeypatch.setattr(fdsets, "_open_fd_count", lambda: listings.append(1) or counted())

    # A limit whose reserve leaves room for the whole table: nothing to count.
    roomy = 2 * (table + fdsets.FD_RESERVE)
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (roomy, roomy))
    fdsets.check_room_for_passed_fds()
    assert listings == []

    # A limit the open fds pass: counted, and refused.
    tight = 2 * max(8, len(os.listdir("/proc/self/fd")) // 2)
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (tight, tight))
    with pytest.raises(FdError, match="Too many file descriptors"):
        fdsets.check_room_for_passed_fds()
    assert listings == [1]


def test_the_dups_an_fdset_hands_out_are_close_on_exec(tmp_path):
    """Every fd migd opens is close-on-exec (plain_open), and so is every dup of a passed
    fd, whatever that fd's own flag (QEMU dups with F_DUPFD_CLOEXEC too): the dups are a
    guest's RAM file and save file, read-write, and any program started while a job or
    backend holds one (by a process that uses migd as a library) would inherit it."""
    import fcntl

    from migd.state.fdsets import FdStore

    store = FdStore(lambda path, flags, direct: -1)
    passed = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT, 0o600)  # inheritable
    os.set_inheritable(passed, True)
    store.add_fd(passed, 3, None)
    dup = store.open_path("/dev/fdset/3", os.O_RDWR, False)
    try:
        assert dup != passed and os.path.samestat(os.fstat(dup), os.fstat(passed))
        assert fcntl.fcntl(dup, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        store.close_dup(dup)
        store.close_all()


@pytest.mark.parametrize("command", ["migrate", "migrate-incoming"])
async def test_a_pipe_passed_as_the_file_is_refused_at_once_naming_it(qmp, shm, command):
    """A mapped-ram file puts every page at its own offset, which a pipe does not have:
    refused before anything starts, saying what it is (before, a save through a pipe was
    accepted and failed later with "Could not truncate ... Invalid argument")."""
    size = 1 * MiB
    fill_random(shm / "src", size)
    await add_file_backend(qmp, "ram0", shm / "src", size)
    await enable_mapped_ram(qmp, channels=1, direct_io=False)
    read_end, write_end = os.pipe()
    ours = write_end if command == "migrate" else read_end
    try:
        await _add_fd(qmp, ours, **{"fdset-id": 3})
        baseline = open_fds()
        desc = await qmp_error(qmp, command, {"uri": "file:/dev/fdset/3"})
        assert desc == "'/dev/fdset/3' is not a regular file (it is a FIFO)"
        assert open_fds() == baseline  # the dup is closed, the set keeps its fd
        assert [s["fdset-id"] for s in await qmp.execute("query-fdsets")] == [3]
        assert (await qmp.execute("query-migrate")).get("status") in (None, "none")
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_one_memfd_passed_twice_is_not_two_backends(qmp):
    """A VMM's memfd passed in two fd sets, the second time through a new open of it (its
    own open file description): a second backend on it would take a restore's pages over
    the first's memory. Refused, as two names of one file are (red-team, round 10b: checked,
    it was refused already; no test passed one memfd twice)."""
    memfd = os.memfd_create("twice", os.MFD_CLOEXEC)
    again = os.open(f"/proc/self/fd/{memfd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        os.ftruncate(memfd, MiB)
        await _add_fd(qmp, memfd, **{"fdset-id": 1})
        await _add_fd(qmp, again, **{"fdset-id": 2})
        add = {"qom-type": "memory-backend-file", "size": MiB}
        await qmp.execute("object-add", {**add, "id": "m0", "mem-path": "/dev/fdset/1"})
        text = await qmp_error(qmp, "object-add", {**add, "id": "m1", "mem-path": "/dev/fdset/2"})
        assert "is already the memory file of memory backend 'm0'" in text, text
        assert text.endswith(": two backends cannot map one file")
        assert [b["id"] for b in await qmp.execute("query-memdev")] == ["m0"]
    finally:
        os.close(again)
        os.close(memfd)
