"""Every example runs end to end (at a small size)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DaemonProcess, RawClient
from .qemu_vm import requires_qemu

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, timeout: float = 120) -> tuple[int, str, int]:
    """Run examples/NAME with this interpreter: (exit code, stdout + stderr, pid)."""
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / name), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{name} did not finish within {timeout} s:\n{out}")
    return proc.returncode, out, proc.pid


def supports_o_direct(directory: Path) -> bool:
    probe = directory / ".o_direct_probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    probe.unlink()
    return True


def test_demo_saves_and_restores_identical_memory():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--size-mib", "32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restored memory is identical to the saved memory" in result.stdout
    assert "GiB/s" in result.stdout


# -- management_app.py ---------------------------------------------------------------------


def test_management_app_with_its_own_migd_saves_and_restores_through_fd_sets(short_dir):
    code, out, _ = run_example(
        "management_app.py", "--spawn", "--size-mib", "8", "--dir", str(short_dir)
    )
    assert code == 0, out
    assert "started migd" in out and "stopped migd: exit code 0" in out
    assert "object-add vm-ram: 8 MiB on /dev/fdset/" in out
    if supports_o_direct(short_dir):  # both fds of each set, and direct-io on
        assert "add-fd save file O_WRONLY|O_DIRECT" in out
        assert "add-fd save file O_RDONLY|O_DIRECT" in out
        assert "direct-io=True" in out
    assert "migrate file:/dev/fdset/" in out and ",offset=4096" in out
    assert out.count("event MIGRATION: completed") == 2  # the save and the restore
    assert "header intact; the migration stream starts with b'QEVM'" in out
    assert "restored memory is identical to the saved memory (sha256 as in the header)" in out
    assert "header still intact after the restore: True" in out
    assert out.rstrip().endswith("done")
    assert list(short_dir.iterdir()) == []  # its temporary save directory is gone


def test_management_app_against_a_running_migd_leaves_no_fd_set_or_backend(
    daemon: DaemonProcess, short_dir
):
    code, out, _ = run_example(
        "management_app.py", str(daemon.socket_path), "--size-mib", "4", "--dir", str(short_dir)
    )
    assert code == 0, out
    assert "started migd" not in out
    assert "restored memory is identical" in out
    client = RawClient(daemon.socket_path).negotiate()
    try:
        assert client.execute("query-fdsets") == {"return": []}
        assert client.execute("query-memdev") == {"return": []}
    finally:
        client.close()


def test_management_app_that_fails_leaves_nothing_behind_in_a_running_migd(
    daemon: DaemonProcess, small_ext4
):
    # 32 MiB of memory (24 MiB of it non-zero) do not fit on the 24 MiB filesystem
    code, out, _ = run_example(
        "management_app.py", str(daemon.socket_path), "--size-mib", "32", "--dir", str(small_ext4)
    )
    assert code == 1, out
    assert "FAILED: migrate failed" in out
    client = RawClient(daemon.socket_path).negotiate()
    try:
        assert client.execute("query-fdsets") == {"return": []}
        assert client.execute("query-memdev") == {"return": []}
    finally:
        client.close()


def test_management_app_refuses_a_migd_that_has_memory_backends_of_its_own(
    daemon: DaemonProcess, shm, short_dir
):
    client = RawClient(daemon.socket_path).negotiate()
    try:
        backend = {"qom-type": "memory-backend-file", "id": "other", "size": 1 << 20}
        reply = client.execute("object-add", {**backend, "mem-path": str(shm / "other")})
        assert reply == {"return": {}}
        code, out, _ = run_example(
            "management_app.py", str(daemon.socket_path), "--dir", str(short_dir)
        )
        assert code == 1, out
        assert "this migd already has memory backends" in out
        assert [m["id"] for m in client.execute("query-memdev")["return"]] == ["other"]
    finally:
        client.close()


def test_management_app_needs_a_socket_or_spawn():
    code, out, _ = run_example("management_app.py")
    assert code == 2 and "give either a socket path or --spawn" in out


# -- save_restore_shm.py -------------------------------------------------------------------


def test_save_restore_shm_round_trips_a_region_and_cleans_up(daemon: DaemonProcess):
    code, out, pid = run_example("save_restore_shm.py", str(daemon.socket_path))
    assert code == 0, out
    assert "migrate: completed" in out
    assert "migrate-incoming: completed" in out
    assert "restored region is identical" in out
    assert not Path(f"/dev/shm/migd-example-{pid}").exists()
    assert not Path(f"/tmp/migd-example-{pid}.sav").exists()


# -- qemu_walkthrough.py -------------------------------------------------------------------


@requires_qemu
def test_qemu_walkthrough_runs_every_step_with_identical_bytes(short_dir):
    code, out, _ = run_example(
        "qemu_walkthrough.py", "--ram-mib", "32", "--dir", str(short_dir), timeout=240
    )
    assert code == 0, out
    for number in range(1, 8):
        assert f"\n[{number}] " in out, f"step {number} missing:\n{out}"
    assert "the guest ran and is stopped (paused)" in out
    # QEMU's full save lists the q35 blocks; migd restored ram0 and skipped the rest
    assert "machine:       pc-q35-" in out and "skipped ['" in out and "pc.bios" in out
    assert "OK: migd's copy of the RAM from QEMU's save is byte for byte" in out
    assert "OK: vm2's RAM is byte for byte" in out
    assert "machine:       none" in out  # migd's own file
    assert "OK: migd's restore into vm3-ram is byte for byte" in out
    assert "OK: vm3's RAM after loading the device state is byte for byte" in out
    assert "vm3 continues: running" in out
    assert "Machine type received is 'none' and local is 'pc-q35-" in out
    assert "OK: vm5's RAM is byte for byte" in out
    assert out.count("OK: ") == 5
    assert out.rstrip().endswith("all steps passed")
    assert list(short_dir.iterdir()) == []  # its temporary directory is gone


@requires_qemu
@pytest.mark.parametrize(
    "flag", [None, "--live", "--postcopy"], ids=["stopped", "live", "postcopy"]
)
def test_vm_suspend_resume_suspends_and_resumes_a_firmware_guest(
    daemon: DaemonProcess, flag: str | None
) -> None:
    """Firmware only here (tests/test_vm_guest.py runs a Linux guest); against a running
    migd, which it leaves without backends or jobs."""
    live = flag == "--live"
    code, out, _ = run_example(
        "vm_suspend_resume.py", "--size-mib", "64", "--socket", str(daemon.socket_path),
        *([flag] if flag else []),
    )  # fmt: skip
    assert code == 0, out
    save = "==> migd vm save --live --quit" if live else "==> migd vm save --quit"
    assert save in out and "(stop -> image durable)" in out
    assert ("while the guest ran" in out) == live
    restore = "==> migd vm restore --postcopy" if flag == "--postcopy" else "==> migd vm restore"
    assert restore in out and "the new QEMU is running" in out
    assert re.search(r"downtime \d+\.\d+ s \(command -> running\): start-up 0\.\d+ s", out), out
    assert ("its RAM all in" in out) == (flag == "--postcopy"), out
    assert out.rstrip().endswith("==> done")
    client = RawClient(daemon.socket_path).negotiate()
    assert client.ok("query-memdev") == [] and client.ok("query-jobs") == []
    client.close()
