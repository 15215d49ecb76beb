"""Uids other than root's and migd's cannot hold migd's fds or mappings through memory
backends they never delete (state/memory.py UID_MAX_BACKENDS, OTHER_UIDS_MAX_BACKENDS;
api/memory.py's fd check) nor through fds they pass (state/fdsets.py check_room_for_fds).
Root's backends, passed fds and saves keep working."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from migd.state.memory import OTHER_UIDS_MAX_BACKENDS, UID_MAX_BACKENDS

from .conftest import RawClient, start_daemon, wait_job_concluded
from .test_faults import OTHER_UID, _connect_as, send_with_fd

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")

PAGE = 4096


def open_daemon(short_dir: Path) -> Any:
    short_dir.chmod(0o711)
    return start_daemon(short_dir / "qmp.sock", "--socket-mode", "0666")


def add_many(client: RawClient, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send every object-add before reading a reply (one round trip each took minutes)."""
    for arguments in requests:
        client.send({"execute": "object-add", "arguments": arguments})
    return [client.recv_reply() for _ in requests]


def ram(id: str) -> dict[str, Any]:
    return {"qom-type": "memory-backend-ram", "id": id, "size": PAGE}


def errors(replies: list[dict[str, Any]]) -> list[str]:
    return [reply["error"]["desc"] for reply in replies if "error" in reply]


def root_adds_and_saves(daemon: Any, shm: Path) -> None:
    """Root's client still adds a file backend and saves it."""
    root = RawClient(daemon.socket_path, timeout=60).negotiate()
    try:
        assert "return" in root.execute("object-add", {
            "qom-type": "memory-backend-file", "id": "root-ram", "size": 1 << 20,
            "mem-path": str(shm / "root-ram"), "share": True})  # fmt: skip
        assert "return" in root.execute("memory-save", {
            "job-id": "root-save", "uri": f"file:{shm / 'root.save'}",
            "backends": ["root-ram"]})  # fmt: skip
        assert wait_job_concluded(root, "root-save").get("error") is None
    finally:
        root.close()


def test_one_uid_lists_at_most_its_backends(short_dir: Path, shm: Path) -> None:
    """`nobody` adds UID_MAX_BACKENDS backends; its next is refused, naming the cap, and
    it may add one again once it deleted one; root's are not counted (before: no cap,
    and each file backend held two fds and a mapping for as long as it was listed)."""
    daemon = open_daemon(short_dir)
    try:
        other = _connect_as(OTHER_UID, daemon.socket_path, timeout=60)
        assert errors(add_many(other, [ram(f"b{i}") for i in range(UID_MAX_BACKENDS)])) == []
        [refused] = errors(add_many(other, [ram("one-more")]))
        assert f"uid {OTHER_UID} has {UID_MAX_BACKENDS} memory backends" in refused
        assert "object-del" in refused
        assert "return" in other.execute("object-del", {"id": "b0"})
        assert errors(add_many(other, [ram("one-more")])) == []
        root_adds_and_saves(daemon, shm)
    finally:
        daemon.stop()


def test_other_uids_together_list_at_most_their_backends(short_dir: Path, shm: Path) -> None:
    """Uids let on a socket open to all (a rootless container's sub-uids), each under its
    own cap, together reach OTHER_UIDS_MAX_BACKENDS: a further uid's first backend is
    refused, root's still added and saved (before: each uid's cap multiplied by as many
    uids as there are)."""
    daemon = open_daemon(short_dir)
    uids = range(100000, 100000 + OTHER_UIDS_MAX_BACKENDS // UID_MAX_BACKENDS)
    try:
        for uid in uids:
            client = _connect_as(uid, daemon.socket_path, timeout=60)
            assert (
                errors(add_many(client, [ram(f"u{uid}-{i}") for i in range(UID_MAX_BACKENDS)]))
                == []
            )
            client.close()
        late = _connect_as(uids[-1] + 1, daemon.socket_path, timeout=60)
        [refused] = errors(add_many(late, [ram("late")]))
        assert f"OTHER_UIDS_MAX_BACKENDS {OTHER_UIDS_MAX_BACKENDS}" in refused
        root_adds_and_saves(daemon, shm)
    finally:
        daemon.stop()


def limit_fds(daemon: Any, limit: int) -> None:
    subprocess.run(["prlimit", f"--pid={daemon.proc.pid}", f"--nofile={limit}:{limit}"], check=True)


def test_one_uids_passed_fds_leave_root_room_to_pass_its_own(short_dir: Path) -> None:
    """Under a low open-file limit (600), `nobody` passes one fd of its own again and
    again, with add-fd and getfd, until refused: it is refused at half of what root's may
    use, and root's add-fd and getfd are accepted (before: nobody's fds filled the cap
    passed fds share, and root's add-fd, every `migd vm save`'s, was refused "Too many
    file descriptors")."""
    daemon = open_daemon(short_dir)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        limit_fds(daemon, 600)
        other = _connect_as(OTHER_UID, daemon.socket_path, timeout=60)
        for command, arguments in (("add-fd", {}), ("getfd", {"fdname": "n"})):
            replies = []
            for i in range(600):
                named = {"fdname": f"n{i}"} if command == "getfd" else arguments
                send_with_fd(other, {"execute": command, "arguments": named}, fd)
                replies.append(other.recv_reply())
                if "error" in replies[-1]:
                    break
            [refused] = errors(replies)
            assert "passed ones of uids other than root's and migd's" in refused
        root = RawClient(daemon.socket_path, timeout=60).negotiate()
        send_with_fd(root, {"execute": "add-fd", "arguments": {}}, fd)
        assert "return" in root.recv_reply()
        send_with_fd(root, {"execute": "getfd", "arguments": {"fdname": "root"}}, fd)
        assert "return" in root.recv_reply()
        root.close()
    finally:
        os.close(fd)
        daemon.stop()


def test_one_uids_file_backends_leave_root_its_fds(short_dir: Path, shm: Path) -> None:
    """Under a low open-file limit (600), `nobody` adds file backends until refused: it is
    refused at half of what root's fds may use (state/fdsets.py), with a clear error, and
    root's object-add and save of a file work (before: nobody's backends took every fd,
    its last refusal was "Internal error: OSError: Too many open files", and root's
    object-add and save failed with "Too many open files")."""
    daemon = open_daemon(short_dir)
    mine = shm / "nobody"
    mine.mkdir()
    os.chown(mine, OTHER_UID, OTHER_UID)
    limit = 600
    try:
        limit_fds(daemon, limit)
        other = _connect_as(OTHER_UID, daemon.socket_path, timeout=60)
        files = [{
            "qom-type": "memory-backend-file", "id": f"f{i}", "size": PAGE,
            "mem-path": str(mine / f"f{i}"), "share": True} for i in range(limit)]  # fmt: skip
        refused = errors(add_many(other, files))
        assert refused
        assert all(text.startswith("Too many file descriptors: migd has") for text in refused)
        assert all("delete some with object-del" in text for text in refused)
        root_adds_and_saves(daemon, shm)
    finally:
        daemon.stop()
