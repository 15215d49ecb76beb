"""A client in another mount namespace than migd's (systemd's PrivateTmp=yes) naming a
file in a directory it sees elsewhere: refused before anything is created, naming the
path and the cause (state/peer_view.py). The client is a real process in a namespace of
its own (`unshare --mount`), with a tmpfs on the directory that migd does not see. Under
the shipped unit migd holds no capabilities and may not look into the root of a client
that holds some: it then compares the two mount tables (/proc/PID/mountinfo)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migd.state.peer_view import mount_of

from .conftest import DaemonProcess, fill_random, wait_for_socket

MiB = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")

# Runs in its own mount namespace: a tmpfs on `private` (which migd sees as the plain
# directory beneath) unless told "--no-mount", then each request through qemu.qmp; prints
# what each answered.
_CLIENT = r"""
import asyncio, json, subprocess, sys
from qemu.qmp import ExecuteError, QMPClient

sock, private, shm, mount = sys.argv[1:5]
if mount != "--no-mount":
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", private], check=True)

async def main():
    client = QMPClient("ns-client")
    await client.connect(sock)
    answers = {}
    async def ask(key, command, arguments):
        try:
            await client.execute(command, arguments)
            answers[key] = "ok"
        except ExecuteError as exc:
            answers[key] = str(exc)
    await ask("shared-backend", "object-add", {"qom-type": "memory-backend-file",
        "id": "ram0", "mem-path": shm + "/ram0", "size": 1 << 20, "share": True})
    await ask("private-backend", "object-add", {"qom-type": "memory-backend-file",
        "id": "ram1", "mem-path": private + "/ram1", "size": 1 << 20, "share": True})
    if len(sys.argv) > 5:  # a directory reached through a symlink
        await ask("linked-backend", "object-add", {"qom-type": "memory-backend-file",
            "id": "ram2", "mem-path": sys.argv[5] + "/ram2", "size": 1 << 20, "share": True})
    await ask("caps", "migrate-set-capabilities", {"capabilities": [
        {"capability": "mapped-ram", "state": True}, {"capability": "multifd", "state": True}]})
    await ask("migrate", "migrate", {"uri": "file:" + private + "/vm.sav"})
    await ask("memory-save", "memory-save", {"job-id": "s1",
        "uri": "file:" + private + "/vm2.sav"})
    await ask("migrate-incoming", "migrate-incoming", {"uri": "file:" + private + "/vm.sav"})
    await client.disconnect()
    print(json.dumps(answers))

asyncio.run(main())
"""


def _client_in_own_namespace(
    sock: Path, private: Path, shm: Path, mount: str = "--tmpfs", *linked: Path
) -> dict[str, Any]:
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _CLIENT,
         str(sock), str(private), str(shm), mount, *map(str, linked)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def assert_all_refused(answers: dict[str, str], private: Path) -> None:
    """Every request naming a file in `private` (a tmpfs only the client sees there) got
    the refusal that names the path and the cause, and nothing was created where migd
    would have put it (the directory beneath the tmpfs)."""
    cause = (
        f"the client's {private} is not migd's (migd runs in another mount namespace, e.g. "
        "systemd's PrivateTmp=yes): use a directory both see, such as /var/lib/migd, or "
        "pass the file as an fd"
    )
    assert answers["private-backend"] == f"'{private}/ram1': {cause}"
    assert answers["migrate"] == f"'{private}/vm.sav': {cause}"
    assert answers["memory-save"] == f"'{private}/vm2.sav': {cause}"
    assert answers["migrate-incoming"] == f"'{private}/vm.sav': {cause}"
    assert list(private.iterdir()) == []


def test_a_file_in_a_directory_the_client_sees_elsewhere_is_refused(
    daemon: DaemonProcess, short_dir: Path, shm: Path
) -> None:
    private = short_dir / "private"
    private.mkdir()
    fill_random(shm / "ram0", MiB)
    answers = _client_in_own_namespace(daemon.socket_path, private, shm)
    # The directory both see works from the other namespace as from migd's.
    assert answers["shared-backend"] == "ok"
    assert answers["caps"] == "ok"
    assert_all_refused(answers, private)


@pytest.fixture
def capless_daemon(short_dir: Path) -> Iterator[Path]:
    """migd as the shipped unit runs it (CapabilityBoundingSet= empty): no capabilities, so
    the root of a client holding some (this test's, root's) is closed to it (EACCES on
    /proc/PID/root). Yields its socket."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv(1)")
    sock = short_dir / "qmp.sock"
    proc = subprocess.Popen(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all",
         sys.executable, "-m", "migd", "serve", "--socket", str(sock)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    daemon = DaemonProcess(sock, proc)
    try:
        wait_for_socket(sock, proc, 15)
        yield sock
    finally:
        daemon.stop()
        if proc.stderr:
            proc.stderr.close()


def test_a_client_migd_may_not_look_into_is_refused_by_the_mount_tables(
    capless_daemon: Path, short_dir: Path, shm: Path
) -> None:
    """Its mount table puts the directory on another mount (the tmpfs) than migd's does:
    refused the same way, nothing created. The name holds a space, which the table shows
    escaped (\\040)."""
    private = short_dir / "pri vate"
    private.mkdir()
    fill_random(shm / "ram0", MiB)
    answers = _client_in_own_namespace(capless_daemon, private, shm)
    assert answers["shared-backend"] == "ok"
    assert_all_refused(answers, private)


def test_a_client_in_another_namespace_with_the_same_mounts_is_served(
    capless_daemon: Path, short_dir: Path, shm: Path
) -> None:
    """A namespace of its own whose mounts are copies of migd's (`unshare --mount`, no mount
    over the directory; the copies' mount ids differ): not refused, by the mount tables
    either; the file is where both see it. So for a directory named through a symlink to
    another mount (as /var/run -> /run): both tables agree on the name as given."""
    private = short_dir / "private"
    private.mkdir()
    link = short_dir / "link"
    link.symlink_to(shm)
    fill_random(shm / "ram0", MiB)
    answers = _client_in_own_namespace(capless_daemon, private, shm, "--no-mount", link)
    assert answers["shared-backend"] == "ok"
    assert answers["private-backend"] == "ok"
    assert answers["linked-backend"] == "ok"
    assert (private / "ram1").exists()
    assert (shm / "ram2").exists()


def test_the_mount_holding_a_name_is_the_last_listed_on_the_longest_point() -> None:
    """Several mounts on one point: the last listed is on top; names come unescaped."""
    table = (
        b"21 1 8:1 / / rw - ext4 /dev/vda rw\n"
        b"22 21 0:30 / /srv/a\\040b rw - tmpfs tmpfs rw\n"
        b"23 21 8:1 /tmp/systemd-private-x/tmp /srv/a\\040b rw - ext4 /dev/vda rw\n"
        b"24 21 0:31 / /srv/a rw - tmpfs tmpfs rw\n"
    )
    assert mount_of(table, "/srv/a b/c") == (b"8:1", b"/tmp/systemd-private-x/tmp/c")
    assert mount_of(table, "/srv/a b") == (b"8:1", b"/tmp/systemd-private-x/tmp")
    assert mount_of(table, "/srv/a") == (b"0:31", b"/")
    assert mount_of(table, "/srv/ab") == (b"8:1", b"/srv/ab")
