"""systemd integration: the unit files, socket activation, sd_notify, the hardening rules."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migd.app.config import load_config

from .conftest import RawClient, fill_random, rest_of_output, start_daemon, wait_for_socket
from .test_faults import F_LOOKUP, HangFS, mounted_fuse
from .test_serving import LogWatcher

UNITS = Path(__file__).resolve().parent.parent / "systemd"
MIGD_SCRIPT = Path(sys.executable).parent / "migd"
SERVE = [sys.executable, "-m", "migd", "serve"]


def unit_settings(path: Path) -> dict[str, list[str]]:
    """key -> values of a unit file (keys may repeat, so no configparser)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """Copies of the unit files whose ExecStart runs this checkout's migd script."""
    if not MIGD_SCRIPT.exists():
        pytest.skip(f"no migd script next to {sys.executable}")
    service = (UNITS / "migd.service").read_text()
    assert "ExecStart=/usr/local/bin/migd " in service
    (tmp_path / "migd.service").write_text(
        service.replace("ExecStart=/usr/local/bin/migd ", f"ExecStart={MIGD_SCRIPT} ")
    )
    shutil.copy(UNITS / "migd.socket", tmp_path / "migd.socket")
    return tmp_path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify_passes_on_the_service_and_socket_units(units):
    result = subprocess.run(
        ["systemd-analyze", "verify", "migd.service", "migd.socket"],
        cwd=units,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""  # not even a warning


def test_the_units_and_the_shipped_config_agree_on_the_socket_and_the_config_path():
    service = unit_settings(UNITS / "migd.service")
    sock = unit_settings(UNITS / "migd.socket")
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == ["/usr/local/bin/migd serve --config /etc/migd/migd.toml"]
    assert sock["ListenStream"] == ["/run/migd/migd.sock"]
    assert sock["SocketMode"] == ["0660"]
    shipped = load_config(str(UNITS / "migd.toml"))
    assert shipped.socket_path == "/run/migd/migd.sock"
    assert shipped.socket_mode == 0o660
    # The unit may write only these: allowed-dirs must not promise more.
    writable = {p.lstrip("-") for p in service["ReadWritePaths"][0].split()}
    assert set(shipped.allowed_dirs) <= writable
    assert shipped.capabilities.mapped_ram and shipped.capabilities.multifd
    assert shipped.memory_backends == []  # examples only, commented out


def test_the_service_keeps_what_memory_backends_need_under_its_hardening():
    service = unit_settings(UNITS / "migd.service")
    assert service["ProtectSystem"] == ["strict"]
    assert {"/var/lib/migd", "/dev/shm", "-/dev/hugepages"} <= set(
        service["ReadWritePaths"][0].split()
    )
    assert service["CapabilityBoundingSet"] == [""]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert service["MemoryDenyWriteExecute"] == ["yes"]
    # Stopping the service must not delete the socket that migd.socket still listens on.
    assert service["RuntimeDirectoryPreserve"] == ["yes"]


async def _qmp_version(path: Path) -> dict[str, object]:
    from qemu.qmp import QMPClient

    client = QMPClient("test")
    await client.connect(str(path))
    try:
        return await client.execute("query-version")  # type: ignore[return-value]
    finally:
        await client.disconnect()


@pytest.fixture
def notify_socket(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""
    path = short_dir / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(15)
    yield sock, str(path)
    sock.close()


def wait_notify(sock: socket.socket, wanted: str) -> str:
    """The first datagram with the line `wanted` (others, such as STATUS=, are skipped)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        msg = sock.recv(4096).decode()
        if wanted in msg.splitlines():
            return msg
    raise TimeoutError(f"no {wanted} on the notify socket")


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate"
)
async def test_socket_activation_serves_qmp_on_the_passed_socket_and_creates_no_socket(
    short_dir, notify_socket
):
    notify, notify_path = notify_socket
    passed = short_dir / "activate.sock"
    own = short_dir / "own" / "qmp.sock"  # what migd would create if not activated
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(passed),
            "-E",
            f"NOTIFY_SOCKET={notify_path}",
            *SERVE,
            "--socket",
            str(own),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while not passed.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            await asyncio.sleep(0.02)
        before = os.stat(passed)
        assert stat.S_ISSOCK(before.st_mode)
        # The first connection makes systemd-socket-activate exec migd with LISTEN_FDS=1.
        version = await asyncio.wait_for(_qmp_version(passed), 30)
        assert "qemu" in version
        wait_notify(notify, "READY=1")
        again = await asyncio.wait_for(_qmp_version(passed), 10)  # same listener, same migd
        assert again == version
        after = os.stat(passed)
        assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)
        assert not own.parent.exists()
        proc.send_signal(signal.SIGTERM)
        wait_notify(notify, "STOPPING=1")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stderr.read().decode() if proc.stderr else ""
    assert "inherited socket" in log
    # migd does not own the socket: it stays where systemd made it, untouched.
    assert os.stat(passed).st_ino == before.st_ino
    assert not own.parent.exists()


def test_ready_is_sent_once_the_socket_serves_and_stopping_on_sigterm(short_dir, notify_socket):
    notify, notify_path = notify_socket
    sock = short_dir / "qmp.sock"
    proc = subprocess.Popen(
        [*SERVE, "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "NOTIFY_SOCKET": notify_path},
    )
    try:
        ready = wait_notify(notify, "READY=1")
        assert "STATUS=serving" in ready.splitlines()
        client = RawClient(sock)  # READY=1 means connectable now, without a retry
        assert "QMP" in client.greeting
        client.close()
        proc.send_signal(signal.SIGTERM)
        wait_notify(notify, "STOPPING=1")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_without_notify_socket_migd_serves_and_sends_nothing(short_dir, notify_socket):
    notify, _ = notify_socket
    sock = short_dir / "qmp.sock"
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    proc = subprocess.Popen([*SERVE, "--socket", str(sock)], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(sock, proc, 15)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # migd has exited, so whatever it sent is queued on the datagram socket already: a
    # sentinel sent now must be the first (and only) datagram there.
    sentinel = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sentinel.sendto(b"SENTINEL=1", notify.getsockname())
    finally:
        sentinel.close()
    assert notify.recv(4096) == b"SENTINEL=1"
    notify.setblocking(False)
    with pytest.raises(BlockingIOError):
        notify.recv(4096)


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def _deny_write_execute() -> None:
    """In the child before exec: the kernel's version of MemoryDenyWriteExecute=yes."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        os._exit(99)


def _mdwe_supported() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "pass"], preexec_fn=_deny_write_execute, capture_output=True
    )
    return probe.returncode == 0


def test_save_and_restore_work_without_writable_executable_memory(short_dir, shm):
    """MemoryDenyWriteExecute=yes in migd.service: CPython, numpy, uvloop and ctypes cope."""
    if not _mdwe_supported():
        pytest.skip("the kernel has no PR_SET_MDWE (Linux 6.3+)")
    sock = short_dir / "qmp.sock"
    ram = shm / "vm.ram"
    size = 8 << 20
    data = os.urandom(size // 2) + bytes(size // 2)
    ram.write_bytes(data)
    proc = subprocess.Popen(
        [*SERVE, "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_deny_write_execute,
    )
    try:
        wait_for_socket(sock, proc, 15)
        client = RawClient(sock).negotiate()
        caps = [{"capability": c, "state": True} for c in ("multifd", "mapped-ram")]
        assert client.execute("migrate-set-capabilities", {"capabilities": caps}) == {"return": {}}
        client.execute("migrate-set-parameters", {"multifd-channels": 2})
        add = {"qom-type": "memory-backend-file", "id": "ram", "size": size}
        client.execute("object-add", {**add, "mem-path": str(ram)})
        client.execute("migrate", {"uri": f"file:{short_dir / 'vm.save'}"})
        assert client.wait_final()["status"] == "completed"
        ram.write_bytes(bytes(size))
        client.execute("migrate-incoming", {"uri": f"file:{short_dir / 'vm.save'}"})
        assert client.wait_final()["status"] == "completed"
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ram.read_bytes() == data


# --- per-instance units: migd@.service and migd@.socket -----------------------------------

TEMPLATE_EXEC = (
    "/usr/local/bin/migd serve --config /etc/migd/instances/%i.toml --socket /run/migd/%i.sock"
)
# What an instance may differ in from the shared service; every other setting (the whole
# hardening) must be the same, so that the two cannot drift apart.
INSTANCE_DIFFERS = {"Description", "ExecStart", "StateDirectory", "ReadWritePaths", "Also"}


@pytest.fixture
def template_units(tmp_path: Path) -> Path:
    """Copies of the template units whose ExecStart runs this checkout's migd script."""
    if not MIGD_SCRIPT.exists():
        pytest.skip(f"no migd script next to {sys.executable}")
    service = (UNITS / "migd@.service").read_text()
    assert "ExecStart=/usr/local/bin/migd " in service
    (tmp_path / "migd@.service").write_text(
        service.replace("ExecStart=/usr/local/bin/migd ", f"ExecStart={MIGD_SCRIPT} ")
    )
    shutil.copy(UNITS / "migd@.socket", tmp_path / "migd@.socket")
    return tmp_path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("instance", ["vm1", "vm-2.db_x", r"a\x2fb"])
def test_systemd_analyze_verify_passes_on_instances_of_the_template_units(template_units, instance):
    result = subprocess.run(
        ["systemd-analyze", "verify", f"migd@{instance}.service", f"migd@{instance}.socket"],
        cwd=template_units,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""  # not even a warning


def test_an_instance_has_its_own_socket_config_and_state_and_the_shared_hardening():
    shared = unit_settings(UNITS / "migd.service")
    service = unit_settings(UNITS / "migd@.service")
    sock = unit_settings(UNITS / "migd@.socket")
    assert service["ExecStart"] == [TEMPLATE_EXEC]
    assert sock["ListenStream"] == ["/run/migd/%i.sock"]  # where --socket points too
    assert sock["SocketMode"] == ["0660"] and sock["Accept"] == ["no"]
    assert sock["RemoveOnStop"] == ["no"]
    assert service["StateDirectory"] == ["migd/%i"]
    # Not /var/lib/migd: an instance writes its own state directory, not its neighbours'.
    assert service["ReadWritePaths"] == ["/dev/shm -/dev/hugepages"]
    assert service["Also"] == ["migd@%i.socket"]
    # Stopping one instance must not delete /run/migd with the other daemons' sockets.
    assert service["RuntimeDirectory"] == ["migd"]
    assert service["RuntimeDirectoryPreserve"] == ["yes"]
    for key in set(shared) | set(service):
        if key not in INSTANCE_DIFFERS:
            assert service.get(key) == shared.get(key), key


def _instance_command(instance: str, confdir: Path, rundir: Path) -> list[str]:
    """The template's ExecStart for `instance`, with /etc/migd/instances and /run/migd
    moved into the test's directories (systemd's %i is the instance name)."""
    (line,) = unit_settings(UNITS / "migd@.service")["ExecStart"]
    # This checkout's migd: the venv's script imports the package it was installed
    # from, which in a git worktree sharing the venv is another checkout's.
    line = line.replace("%i", instance).replace("/usr/local/bin/migd", f"{sys.executable} -m migd")
    line = line.replace("/etc/migd/instances/", f"{confdir}/").replace("/run/migd/", f"{rundir}/")
    return line.split()


def _instance_socket(instance: str, rundir: Path) -> Path:
    (listen,) = unit_settings(UNITS / "migd@.socket")["ListenStream"]
    return Path(listen.replace("%i", instance).replace("/run/migd/", f"{rundir}/"))


def _write_instance_config(confdir: Path, instance: str, state: Path, mem: Path) -> None:
    """An instance's own configuration: its directories and one backend named ram0 (the
    same id in every instance: they are separate daemons)."""
    (confdir / f"{instance}.toml").write_text(
        f'allowed-dirs = ["{state}", "{mem.parent}"]\n'
        "[capabilities]\nmultifd = true\nmapped-ram = true\n"
        "[parameters]\nmultifd-channels = 2\n"
        "[[memory-backend]]\n"
        f'qom-type = "memory-backend-file"\nid = "ram0"\nsize = "4M"\nmem-path = "{mem}"\n'
    )


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate"
)
def test_two_socket_activated_instances_serve_their_own_sockets_without_interfering(short_dir, shm):
    confdir, rundir = short_dir / "etc", short_dir / "run"
    confdir.mkdir()
    rundir.mkdir()
    names = ("vm-a", "vm-b")
    data, procs, socks = {}, {}, {}
    for seed, name in enumerate(names, 1):
        state = short_dir / name
        state.mkdir()
        data[name] = fill_random(shm / name, 4 << 20, seed=seed)
        _write_instance_config(confdir, name, state, shm / name)
        socks[name] = _instance_socket(name, rundir)
        assert socks[name] == rundir / f"{name}.sock"
        procs[name] = subprocess.Popen(
            ["systemd-socket-activate", "-l", str(socks[name]),
             *_instance_command(name, confdir, rundir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
    try:
        for name in names:
            deadline = time.monotonic() + 15
            while not socks[name].exists():
                assert procs[name].poll() is None, procs[name].stderr.read()
                assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
                time.sleep(0.02)
        # The first connection starts each instance's migd on its own passed socket.
        clients = {name: RawClient(socks[name], timeout=30).negotiate() for name in names}
        for name, client in clients.items():
            memdevs = client.ok("query-memdev")
            assert [(m["id"], m["size"]) for m in memdevs] == [("ram0", 4 << 20)], name
        # Both save their ram0 at once, each into its own state directory.
        for name, client in clients.items():
            client.ok("migrate", {"uri": f"file:{short_dir / name / 'ram.sav'}"})
        for name, client in clients.items():
            info = client.wait_final()
            assert info["status"] == "completed", (name, info)
            assert [j["id"] for j in client.ok("query-jobs")] == []  # migrate's job is gone
            (shm / name).write_bytes(bytes(4 << 20))
        # One instance stops; the other keeps serving and restores its own file.
        clients["vm-b"].close()
        procs["vm-b"].send_signal(signal.SIGTERM)
        assert procs["vm-b"].wait(10) == 0
        assert socks["vm-b"].exists()  # systemd's socket (here systemd-socket-activate's)
        client = clients["vm-a"]
        client.ok("migrate-incoming", {"uri": f"file:{short_dir / 'vm-a' / 'ram.sav'}"})
        assert client.wait_final()["status"] == "completed"
        assert (shm / "vm-a").read_bytes() == data["vm-a"]
        assert (shm / "vm-b").read_bytes() == bytes(4 << 20)  # vm-b's memory untouched
        # vm-a's save was never written into vm-b's directory, nor the other way round.
        assert sorted(p.name for p in (short_dir / "vm-b").iterdir()) == ["ram.sav"]
        assert sorted(p.name for p in (short_dir / "vm-a").iterdir()) == ["ram.sav"]
        client.close()
        procs["vm-a"].send_signal(signal.SIGTERM)
        assert procs["vm-a"].wait(10) == 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name, proc in procs.items():
        log = proc.stderr.read().decode() if proc.stderr else ""
        assert "inherited socket" in log, (name, log)
        assert str(confdir / f"{name}.toml") in " ".join(proc.args), proc.args


def test_an_instance_without_its_configuration_exits_78_naming_the_file(short_dir):
    confdir, rundir = short_dir / "etc", short_dir / "run"
    result = subprocess.run(
        _instance_command("nothere", confdir, rundir), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 78  # EX_CONFIG, in RestartPreventExitStatus=: no retry
    assert f"{confdir}/nothere.toml: cannot read" in result.stderr, result.stderr
    assert not rundir.exists()  # no socket made before the configuration was read


def _serve_with_fd3(
    fd3: int | None, listen_fds: str, short_dir: Path
) -> subprocess.CompletedProcess[str]:
    """migd serve as systemd starts it: fd 3 passed, LISTEN_PID its own pid."""

    def put_at_3() -> None:
        if fd3 is not None:
            os.dup2(fd3, 3)
        else:  # nothing passed at 3 after all
            with contextlib.suppress(OSError):
                os.close(3)

    return subprocess.run(
        ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS="$0" exec "$@"', listen_fds, *SERVE,
         "--socket", str(short_dir / "own.sock")],
        preexec_fn=put_at_3, pass_fds=() if fd3 is None else (3,), capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["tcp", "unix-datagram", "not-listening", "regular-file",
                                  "two-sockets", "not-a-number", "fd-3-closed"])  # fmt: skip
def test_a_passed_socket_that_is_not_a_listening_unix_stream_is_refused(short_dir, kind):
    """A TCP socket (a wrong ListenStream= in a drop-in) was served: root's QMP on the
    network; a datagram socket left a migd that served no one; a file or LISTEN_FDS=abc
    gave a traceback (red-team, session 14). Each is one line and exit 2 now, before
    anything is served or created. LISTEN_FDS=1 with fd 3 closed was called "not a
    socket": the event loop's own epoll fd had taken number 3 (red-team, session 17)."""
    made: list[Any] = []
    listen_fds = "1"
    if kind == "tcp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        made.append(sock)
    elif kind == "unix-datagram":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(short_dir / "dgram.sock"))
        made.append(sock)
    elif kind == "not-listening":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(short_dir / "idle.sock"))
        made.append(sock)
    elif kind == "two-sockets":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(short_dir / "one.sock"))
        sock.listen()
        made.append(sock)
        listen_fds = "2"
    elif kind == "not-a-number":
        listen_fds = "abc"
    if kind == "regular-file":
        fd = os.open(short_dir / "file", os.O_RDWR | os.O_CREAT, 0o600)
    else:
        fd = made[0].fileno() if made else None
    try:
        result = _serve_with_fd3(fd, listen_fds, short_dir)
    finally:
        for sock in made:
            sock.close()
        if kind == "regular-file":
            os.close(fd)
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr
    expected = {
        "tcp": "is AF_INET SOCK_STREAM", "unix-datagram": "is AF_UNIX SOCK_DGRAM",
        "not-listening": "not listening", "regular-file": "is not a socket",
        "two-sockets": "passed 2 sockets", "not-a-number": "LISTEN_FDS='abc'",
        "fd-3-closed": "fd 3 is not open: migd was not started by systemd's socket",
    }[kind]  # fmt: skip
    assert expected in result.stderr, result.stderr
    assert "serving QMP" not in result.stderr
    assert not (short_dir / "own.sock").exists()


def test_sighup_is_logged_and_ignored_not_fatal(short_dir):
    """SIGHUP (a reload request, or the terminal migd was started from closing) killed
    migd mid-job with its socket left behind (red-team, session 14)."""
    d = start_daemon(short_dir / "qmp.sock")
    try:
        d.proc.send_signal(signal.SIGHUP)
        client = RawClient(d.socket_path).negotiate()  # still serving, on the same socket
        assert "qemu" in client.execute("query-version")["return"]
        client.close()
        assert d.proc.poll() is None
    finally:
        d.stop()
    err = d.proc.stderr.read().decode() if d.proc.stderr else ""
    assert "SIGHUP ignored" in err
    assert not (short_dir / "qmp.sock").exists()


def _read_log_until(proc: subprocess.Popen[bytes], text: str) -> str:
    """migd's stderr up to the first line holding `text`; AssertionError at its end (the
    daemon exited without logging it)."""
    assert proc.stderr is not None
    seen = []
    for raw in proc.stderr:
        seen.append(raw.decode())
        if text in seen[-1]:
            return "".join(seen)
    raise AssertionError(f"migd exited ({proc.wait()}) without logging {text!r}: {seen}")


def test_sigusr1_and_sigusr2_during_a_save_are_logged_and_ignored(short_dir):
    """SIGUSR1 or SIGUSR2 (a log-rotation or reload script written for other daemons)
    killed migd by their default action, mid-save, without a log line, its socket left
    behind (red-team, round 10c). Each is logged and ignored now; the save runs on."""
    d = start_daemon(short_dir / "qmp.sock")
    try:
        client = RawClient(d.socket_path).negotiate()
        client.ok("object-add", {"qom-type": "memory-backend-ram", "id": "r", "size": 64 << 20})
        caps = [{"capability": "mapped-ram", "state": True}]
        client.ok("migrate-set-capabilities", {"capabilities": caps})
        client.ok("migrate-set-parameters", {"max-bandwidth": 1 << 20})  # 64 s: still running
        client.ok("migrate", {"uri": f"file:{short_dir / 'save.img'}"})
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
            d.proc.send_signal(sig)
            _read_log_until(d.proc, f"{sig.name} ignored")
        assert client.ok("query-migrate")["status"] in ("setup", "active")  # not cut off
        client.ok("migrate_cancel")
        client.close()
    finally:
        assert d.stop() == 0
    assert not (short_dir / "qmp.sock").exists()


@pytest.mark.parametrize("kind", ["mode-0666", "abstract"])
def test_a_passed_socket_open_to_others_is_warned_about_whatever_socket_mode_says(short_dir, kind):
    """Under socket activation the socket's mode is systemd's (SocketMode=), and
    migd.toml's socket-mode is not used; the warning that others control migd read
    socket-mode alone, so a drop-in's SocketMode=0666, or an abstract socket
    (ListenStream=@migd, which every local user may connect to), was not mentioned
    (red-team, round 10c)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if kind == "abstract":
        listener.bind(f"\0migd-test-{os.getpid()}-{short_dir.name}")
    else:
        listener.bind(str(short_dir / "open.sock"))
        os.chmod(short_dir / "open.sock", 0o666)
    listener.listen()
    fd = listener.fileno()
    proc = subprocess.Popen(
        ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", *SERVE,
         "--socket", str(short_dir / "own.sock")],
        preexec_fn=lambda: os.dup2(fd, 3), pass_fds=(3,),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        log = _read_log_until(proc, "serving QMP on inherited socket")
        proc.send_signal(signal.SIGTERM)  # handled after the start's own log lines
        rest = rest_of_output(proc, 30)[1].decode()
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log + rest
    mode = "0777" if kind == "abstract" else "0666"
    assert f"socket mode {mode} lets other users control migd" in log + rest, log + rest
    assert "make migd open any file it can open" in log + rest


@pytest.mark.parametrize("journal", [True, False], ids=["stderr-is-the-journal", "another"])
def test_under_journald_each_line_carries_its_syslog_priority(short_dir, journal):
    """systemd connects stderr to journald and names that stream in JOURNAL_STREAM;
    journald reads a "<N>" prefix as a line's priority. migd wrote none, so every line,
    errors too, was stored at info priority and `journalctl -p warning` showed nothing
    (red-team, round 10c). With stderr the journal: "<4>" for a warning, "<6>" for info,
    "<3>" for a configuration error, and no timestamp (the journal has its own); with
    JOURNAL_STREAM naming another stream (a redirected child), the plain lines."""
    log_path, other = short_dir / "journal", short_dir / "other"
    other.write_text("")
    sock = short_dir / "qmp.sock"
    with open(log_path, "w+") as log:
        named = os.fstat(log.fileno()) if journal else os.stat(other)
        env = {**os.environ, "JOURNAL_STREAM": f"{named.st_dev}:{named.st_ino}"}
        proc = subprocess.Popen(
            [*SERVE, "--socket", str(sock), "--socket-mode", "0666"],
            stdout=subprocess.DEVNULL, stderr=log, env=env,
        )  # fmt: skip
        try:
            wait_for_socket(sock, proc, 15)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        bad = subprocess.run(
            [*SERVE, "--config", str(short_dir / "missing.toml")],
            stdout=subprocess.DEVNULL, stderr=log, env=env, timeout=30,
        )  # fmt: skip
        assert bad.returncode == 78
    lines = log_path.read_text().splitlines()
    warning = next(line for line in lines if "lets other users control migd" in line)
    serving = next(line for line in lines if "serving QMP on" in line)
    refused = next(line for line in lines if "missing.toml: cannot read" in line)
    if journal:
        assert warning.startswith("<4>WARNING migd.app.daemon: socket mode 0666"), warning
        assert serving.startswith("<6>INFO migd.app.daemon: migd "), serving
        assert refused.startswith("<3>migd: "), refused
    else:
        assert re.match(r"\d{4}-\d\d-\d\d [\d:,]+ WARNING migd.app.daemon: ", warning), warning
        assert refused.startswith("migd: "), refused


def test_an_unreachable_notify_socket_is_logged_and_migd_serves(short_dir):
    """NOTIFY_SOCKET naming nothing (a unit's wrong sandboxing, a stale environment): migd
    serves and says it could not send READY=1, naming the address (before: sdnotify
    swallowed the error and nothing was logged)."""
    sock = short_dir / "qmp.sock"
    missing = str(short_dir / "no-such-notify-socket")
    proc = subprocess.Popen(
        [*SERVE, "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "NOTIFY_SOCKET": missing},
    )
    try:
        wait_for_socket(sock, proc, 15)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    text = err.decode()
    assert f"cannot send READY=1 to systemd at NOTIFY_SOCKET='{missing}': No such file" in text
    assert "cannot send STOPPING=1" in text and "Traceback" not in text


class HeldLookupFS(HangFS):
    """HangFS that says when its held LOOKUP (of a name starting with "hung") came."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        super().__init__(backing, mountpoint)
        self.held = threading.Event()

    def _handle(self, op: int, node: int, body: memoryview) -> bytes:
        if op == F_LOOKUP and bytes(body).startswith(b"hung"):
            self.held.set()
        return super()._handle(op, node, body)


def test_sigterm_while_the_configured_backends_are_made_stops_without_ready(
    short_dir, notify_socket
):
    """SIGTERM while `migd serve` still makes the configuration file's backends (here one
    whose mem-path's LOOKUP a FUSE server holds): migd stops, exit 0, and never sends
    READY=1, nor listens (before: READY=1, then STOPPING=1, as if it had served)."""
    notify, notify_path = notify_socket
    for fs in mounted_fuse(short_dir, "held", HeldLookupFS):
        conf = short_dir / "migd.toml"
        conf.write_text(
            "[[memory-backend]]\n"
            'qom-type = "memory-backend-file"\nid = "ram0"\nsize = "1M"\n'
            f'mem-path = "{fs.mountpoint / "hung-ram0"}"\n'
        )
        sock = short_dir / "qmp.sock"
        proc = subprocess.Popen(
            [*SERVE, "--config", str(conf), "--socket", str(sock)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
        )
        log = LogWatcher(proc)
        try:
            assert fs.held.wait(15), "the backend's mem-path was never looked up"
            proc.send_signal(signal.SIGTERM)
            log.wait_for(b"SIGTERM received: stopping", 15)  # handled while it waits
            fs.release.set()
            assert proc.wait(15) == 0
        finally:
            fs.release.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        notify.setblocking(False)
        sent = []
        with contextlib.suppress(BlockingIOError):
            while True:
                sent.append(notify.recv(4096).decode())
        assert not any("READY=1" in msg.splitlines() for msg in sent), sent
        assert not sock.exists()
        assert b"stopped before serving" in log.all()
