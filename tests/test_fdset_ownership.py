"""fd sets and getfd names belong to the uid whose client made them (state/fdsets.py):
a client of a uid other than root's and migd's sees and uses only its own uid's, every
session of that uid shares them, and root's and migd's clients see every set, as in QEMU.

Before, they were global: `nobody`, let on the socket, listed root's sets, saved guest
RAM into the file of root's set (and restored from it), removed it, joined it, and
closed or replaced root's getfd names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from .conftest import RawClient, fill_random, wait_job_concluded
from .test_faults import OTHER_UID, THIRD_UID, _connect_as, send_with_fd

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")

MiB = 1 << 20


def add_fd(client: RawClient, fd: int, **arguments: Any) -> dict[str, Any]:
    send_with_fd(client, {"execute": "add-fd", "arguments": arguments}, fd)
    return client.recv_reply()


def getfd(client: RawClient, fd: int, name: str) -> dict[str, Any]:
    send_with_fd(client, {"execute": "getfd", "arguments": {"fdname": name}}, fd)
    return client.recv_reply()


def desc(reply: dict[str, Any]) -> str:
    assert "error" in reply, reply
    return str(reply["error"]["desc"])


def backend(client: RawClient, id: str) -> None:
    client.ok("object-add", {"qom-type": "memory-backend-ram", "id": id, "size": MiB})


def test_another_uids_client_cannot_see_or_use_roots_fd_set(open_daemon: Any, shm: Path) -> None:
    """Root's client adds a file (guest RAM, 0600) as fd set 0, opened write-only,
    read-only and read-write (a save, a restore, a mem-path would each find theirs);
    `nobody`'s client gets, for every use of set 0, the answer a set that does not exist
    gets, and the file and the set are unchanged (before: its save overwrote the file,
    its restore read it, its remove-fd closed root's fds)."""
    ram = shm / "guest.ram"
    before = fill_random(ram, MiB)
    ram.chmod(0o600)
    fds = [os.open(ram, flags) for flags in (os.O_WRONLY, os.O_RDONLY, os.O_RDWR)]
    root = RawClient(open_daemon.socket_path).negotiate()
    other = _connect_as(OTHER_UID, open_daemon.socket_path, timeout=30)
    try:
        for fd in fds:
            assert add_fd(root, fd, opaque="root's", **{"fdset-id": 0})["return"]["fdset-id"] == 0
        assert other.ok("query-fdsets") == []
        backend(other, "mine")
        for command in ("memory-save", "memory-restore"):
            reply = other.execute(
                command, {"job-id": command, "uri": "file:/dev/fdset/0", "backends": ["mine"]}
            )
            assert desc(reply) == "Failed to find fdset /dev/fdset/0", reply
        reply = other.execute("object-add", {
            "qom-type": "memory-backend-file", "id": "theirs", "size": MiB,
            "mem-path": "/dev/fdset/0", "share": True})  # fmt: skip
        assert desc(reply) == "Failed to find fdset /dev/fdset/0"
        assert desc(other.execute("remove-fd", {"fdset-id": 0})) == (
            "File descriptor named 'fdset-id:0' not found"
        )
        assert desc(other.execute("remove-fd", {"fdset-id": 0, "fd": 0})).startswith(
            "File descriptor named 'fdset-id:0, fd:"
        )
        # Joining root's set is refused (ids are one namespace: it cannot be another set).
        mine = os.open(shm, os.O_RDONLY | os.O_DIRECTORY)
        try:
            reply = add_fd(other, mine, **{"fdset-id": 0})
            assert desc(reply) == (
                f"Parameter 'fdset-id': fd set 0 is not one of uid {OTHER_UID}'s: a client of "
                "a uid other than root's and migd's adds fds only to its own uid's sets "
                "(without 'fdset-id', a new set)"
            )
            # Its own set takes the lowest free id, and only that is listed to it.
            assert add_fd(other, mine)["return"]["fdset-id"] == 1
        finally:
            os.close(mine)
        assert [s["fdset-id"] for s in other.ok("query-fdsets")] == [1]
        # Root's client sees every set, as in QEMU, and root's set is as it was.
        sets = {s["fdset-id"]: s["fds"] for s in root.ok("query-fdsets")}
        assert sorted(sets) == [0, 1] and [f["opaque"] for f in sets[0]] == ["root's"] * 3
    finally:
        other.close()
        root.close()
        for fd in fds:
            os.close(fd)
    assert ram.read_bytes() == before


def test_getfd_names_are_the_uids_own(open_daemon: Any) -> None:
    """`nobody`'s closefd of root's name is refused as a name that does not exist, and its
    getfd of the same name makes its own, replacing (closing) nothing of root's."""
    fd = os.open("/dev/null", os.O_RDONLY)
    root = RawClient(open_daemon.socket_path).negotiate()
    other = _connect_as(OTHER_UID, open_daemon.socket_path, timeout=30)
    try:
        assert getfd(root, fd, "vm") == {"return": {}}
        reply = other.execute("closefd", {"fdname": "vm"})
        assert desc(reply) == "File descriptor named 'vm' not found"
        assert getfd(other, fd, "vm") == {"return": {}}
        assert root.execute("closefd", {"fdname": "vm"}) == {"return": {}}
        assert desc(root.execute("closefd", {"fdname": "vm"})) == (
            "File descriptor named 'vm' not found"
        )
        assert other.execute("closefd", {"fdname": "vm"}) == {"return": {}}
    finally:
        other.close()
        root.close()
        os.close(fd)


def test_sessions_of_one_uid_share_its_sets_and_root_uses_them(open_daemon: Any, shm: Path) -> None:
    """As libvirt does: `nobody` adds its file on one connection and saves to it on
    another; a third uid sees none of it; root's client saves to `nobody`'s set too."""
    target = shm / "nobody.save"
    target.write_bytes(b"")
    target.chmod(0o600)
    os.chown(target, OTHER_UID, OTHER_UID)
    fd = os.open(target, os.O_WRONLY)
    first = _connect_as(OTHER_UID, open_daemon.socket_path, timeout=30)
    second = _connect_as(OTHER_UID, open_daemon.socket_path, timeout=30)
    third = _connect_as(THIRD_UID, open_daemon.socket_path, timeout=30)
    root = RawClient(open_daemon.socket_path).negotiate()
    try:
        fdset = add_fd(first, fd, opaque="nobody's")["return"]["fdset-id"]
        assert [s["fdset-id"] for s in second.ok("query-fdsets")] == [fdset]
        assert third.ok("query-fdsets") == []
        backend(second, "ram0")
        second.ok("memory-save", {"job-id": "s", "uri": f"file:/dev/fdset/{fdset}",
                                  "backends": ["ram0"]})  # fmt: skip
        assert wait_job_concluded(second, "s").get("error") is None
        backend(root, "root-ram")
        root.ok("memory-save", {"job-id": "r", "uri": f"file:/dev/fdset/{fdset}",
                                "backends": ["root-ram"]})  # fmt: skip
        assert wait_job_concluded(root, "r").get("error") is None
        assert desc(third.execute("remove-fd", {"fdset-id": fdset})) == (
            f"File descriptor named 'fdset-id:{fdset}' not found"
        )
        assert second.execute("remove-fd", {"fdset-id": fdset}) == {"return": {}}
        assert root.ok("query-fdsets") == []
    finally:
        for client in (first, second, third, root):
            client.close()
        os.close(fd)
