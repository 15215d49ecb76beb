"""A client in another mount namespace than migd's (systemd's PrivateTmp=yes) naming a
file in a directory it sees elsewhere: refused before anything is created, naming the
path and the cause (state/peer_view.py). The client is a real process in a namespace of
its own (`unshare --mount`), with a tmpfs on the directory that migd does not see."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import DaemonProcess, fill_random, wait_for_socket

MiB = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")

# Runs in its own mount namespace: a tmpfs on `private` (which migd sees as the plain
# directory beneath), then each request through qemu.qmp; prints what each answered.
_CLIENT = r"""
import asyncio, json, subprocess, sys
from qemu.qmp import ExecuteError, QMPClient

sock, private, shm = sys.argv[1:4]
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


def _client_in_own_namespace(sock: Path, private: Path, shm: Path) -> dict[str, Any]:
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _CLIENT,
         str(sock), str(private), str(shm)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


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
    cause = (
        f"the client's {private} is not migd's (migd runs in another mount namespace, e.g. "
        "systemd's PrivateTmp=yes): use a directory both see, such as /var/lib/migd, or "
        "pass the file as an fd"
    )
    assert answers["private-backend"] == f"'{private}/ram1': {cause}"
    assert answers["migrate"] == f"'{private}/vm.sav': {cause}"
    assert answers["memory-save"] == f"'{private}/vm2.sav': {cause}"
    assert answers["migrate-incoming"] == f"'{private}/vm.sav': {cause}"
    # Nothing created where migd would have put it (the directory beneath the tmpfs).
    assert list(private.iterdir()) == []


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv(1)")
def test_a_client_migd_may_not_look_into_is_served_as_before(short_dir: Path, shm: Path) -> None:
    """migd without capabilities (the shipped unit's CapabilityBoundingSet=) may not look
    into the root of a client that holds some (EACCES on /proc/PID/root): the name is used
    as before, never refused for it; the file lands in migd's view of the directory."""
    sock = short_dir / "qmp.sock"
    proc = subprocess.Popen(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all",
         sys.executable, "-m", "migd", "serve", "--socket", str(sock)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    daemon = DaemonProcess(sock, proc)
    try:
        wait_for_socket(sock, proc, 15)
        private = short_dir / "private"
        private.mkdir()
        fill_random(shm / "ram0", MiB)
        answers = _client_in_own_namespace(sock, private, shm)
        assert answers["private-backend"] == "ok"
        assert (private / "ram1").exists()  # in migd's view: the client never sees it
    finally:
        daemon.stop()
        if proc.stderr:
            proc.stderr.close()
