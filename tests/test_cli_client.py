"""The client commands `migd save`, `restore`, `status` and `call`, against a real daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from migd.errors import MigrationError
from migd.io.target import parse_uri
from migd.tools.client import parse_offset, parse_size, probe_direct_io
from migd.tools.inspect import inspect_file

from .conftest import RawClient, fill_random, rest_of_output, start_daemon

MiB = 1 << 20
SUMMARY = re.compile(r"^(save|restore) completed: .* in [\d.]+ s, [\d.]+ GiB/s ", re.MULTILINE)
PROGRESS_LINE = re.compile(r"^save \d+% [\d.]+ (B|KiB|MiB|GiB)/[\d.]+ (MiB|GiB) [\d.]+ GiB/s$")


def migd(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migd", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def memdevs(socket_path: Path) -> list[str]:
    client = RawClient(socket_path).negotiate()
    try:
        return [m["id"] for m in client.execute("query-memdev")["return"]]
    finally:
        client.close()


def query_migrate(socket_path: Path) -> dict:
    client = RawClient(socket_path).negotiate()
    try:
        return client.execute("query-migrate")["return"]
    finally:
        client.close()


def with_zeros(path: Path, size: int, seed: int) -> bytes:
    """Random data with a zero MiB in the middle, so that both page kinds occur."""
    data = bytearray(fill_random(path, size, seed))
    data[2 * MiB : 3 * MiB] = bytes(MiB)
    path.write_bytes(data)
    return bytes(data)


# --- save / restore -------------------------------------------------------------------


def test_save_then_restore_with_mem_path_gives_identical_bytes(daemon, shm, short_dir):
    data = with_zeros(shm / "src", 16 * MiB, seed=1)
    image = short_dir / "save.img"
    saved = migd("save", image, "--socket", daemon.socket_path, "--mem-path", shm / "src",
                 "--size", "16M", "--channels", "3")  # fmt: skip
    assert saved.returncode == 0, saved.stderr
    assert SUMMARY.search(saved.stdout) and str(image) in saved.stdout, saved.stdout
    assert memdevs(daemon.socket_path) == []  # the temporary backend is gone again

    # No --size: a restore takes the size and the block name from the file.
    (shm / "dst").write_bytes(os.urandom(16 * MiB))  # old contents must all be replaced
    restored = migd("restore", image, "--socket", daemon.socket_path, "--mem-path", shm / "dst")
    assert restored.returncode == 0, restored.stderr
    assert SUMMARY.search(restored.stdout), restored.stdout
    assert (shm / "dst").read_bytes() == data
    assert memdevs(daemon.socket_path) == []


def test_save_into_a_relative_path_lands_where_the_client_runs(daemon, shm, short_dir):
    fill_random(shm / "src", MiB)
    result = subprocess.run(
        [sys.executable, "-m", "migd", "save", "rel.img", "--socket", str(daemon.socket_path),
         "--mem-path", str(shm / "src"), "--no-direct-io"],
        capture_output=True, text=True, timeout=60, cwd=short_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (short_dir / "rel.img").stat().st_size > MiB


def test_save_of_existing_backends_named_with_backend(daemon, shm, short_dir):
    data = fill_random(shm / "a", 2 * MiB)
    client = RawClient(daemon.socket_path).negotiate()
    client.execute("object-add", {"qom-type": "memory-backend-file", "id": "a", "size": 2 * MiB,
                                  "mem-path": str(shm / "a"), "share": True})  # fmt: skip
    client.close()
    result = migd("save", short_dir / "a.img", "--socket", daemon.socket_path, "--backend", "a")
    assert result.returncode == 0, result.stderr
    (shm / "a").write_bytes(bytes(2 * MiB))
    result = migd("restore", short_dir / "a.img", "--socket", daemon.socket_path, "--backend", "a")
    assert result.returncode == 0, result.stderr
    assert (shm / "a").read_bytes() == data
    assert memdevs(daemon.socket_path) == ["a"]  # not ours: left in place


def test_save_refuses_when_migd_has_backends_beyond_those_named(daemon, shm, short_dir):
    fill_random(shm / "a", MiB)
    client = RawClient(daemon.socket_path).negotiate()
    client.execute("object-add", {"qom-type": "memory-backend-file", "id": "a", "size": MiB,
                                  "mem-path": str(shm / "a"), "share": True})  # fmt: skip
    client.close()
    fill_random(shm / "b", MiB)
    result = migd("save", short_dir / "x.img", "--socket", daemon.socket_path,
                  "--mem-path", shm / "b")  # fmt: skip
    assert result.returncode == 1
    assert "migd saves every memory backend" in result.stderr and "'a'" in result.stderr
    assert memdevs(daemon.socket_path) == ["a"]  # the one it added is removed again
    result = migd("save", short_dir / "x.img", "--socket", daemon.socket_path, "--backend", "zz")
    assert result.returncode == 1 and "no memory backend 'zz'" in result.stderr


def test_save_without_a_terminal_prints_plain_progress_lines_at_most_once_a_second(
    daemon, shm, short_dir
):
    fill_random(shm / "src", 24 * MiB)
    started = time.monotonic()
    result = migd("save", short_dir / "slow.img", "--socket", daemon.socket_path,
                  "--mem-path", shm / "src", "--max-bandwidth", "8M")  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("save ")]
    assert len(lines) >= 2, result.stderr
    assert all(PROGRESS_LINE.match(line) for line in lines), lines
    assert len(lines) <= elapsed + 1
    percents = [int(line.split()[1].rstrip("%")) for line in lines]
    assert percents == sorted(percents) and percents[0] >= 0 and percents[-1] <= 100
    assert "\r" not in result.stderr  # no bar when stderr is not a terminal
    assert SUMMARY.search(result.stdout)


def test_quiet_save_prints_only_the_summary(daemon, shm, short_dir):
    fill_random(shm / "src", 8 * MiB)
    result = migd("save", short_dir / "q.img", "--socket", daemon.socket_path,
                  "--mem-path", shm / "src", "--max-bandwidth", "4M", "-q")  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert SUMMARY.search(result.stdout)


def test_save_into_a_missing_directory_exits_1_with_the_daemons_error(daemon, shm, short_dir):
    fill_random(shm / "src", MiB)
    target = short_dir / "no-such-dir" / "save.img"
    result = migd("save", target, "--socket", daemon.socket_path, "--mem-path", shm / "src")
    assert result.returncode == 1
    assert f"Could not create '{target}': No such file or directory" in result.stderr
    assert memdevs(daemon.socket_path) == []


def test_restore_of_an_incomplete_file_exits_1_and_says_so(daemon, shm, short_dir):
    fill_random(shm / "src", 2 * MiB)
    image = short_dir / "save.img"
    assert migd("save", image, "--socket", daemon.socket_path, "--mem-path", shm / "src",
                "--id", "ram0").returncode == 0  # fmt: skip
    last_end = max(b.end for b in inspect_file(image).blocks)
    os.truncate(image, last_end + 13 + 9)  # in the middle of the RAM end section
    result = migd("restore", image, "--socket", daemon.socket_path, "--mem-path", shm / "dst",
                  "--size", "2M", "--id", "ram0")  # fmt: skip
    assert result.returncode == 1
    assert "save file is incomplete" in result.stderr


@pytest.mark.parametrize("hang_up", [False, True], ids=["ctrl-c", "terminal-gone"])
def test_ctrl_c_during_a_save_cancels_it_and_exits_1(daemon, shm, short_dir, hang_up):
    """Ctrl-C, and a terminal or ssh session that goes away (SIGHUP, then EIO on every
    write to it): the save is cancelled and its backend removed. On SIGHUP the client
    died at once, leaving both in the daemon (red-team, session 14)."""
    fill_random(shm / "src", 64 * MiB)
    master, terminal = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "migd", "save", str(short_dir / "c.img"), "--socket",
         str(daemon.socket_path), "--mem-path", str(shm / "src"), "--max-bandwidth", "16M"],
        stdout=subprocess.PIPE, stderr=terminal if hang_up else subprocess.PIPE, text=True,
    )  # fmt: skip
    os.close(terminal)
    try:
        deadline = time.monotonic() + 20
        while query_migrate(daemon.socket_path).get("status") != "active":
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        if hang_up:
            os.close(master)  # the terminal is gone: writes to it fail with EIO
            master = -1
        proc.send_signal(signal.SIGHUP if hang_up else signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    if not hang_up:
        assert "cancelling the save" in err and "save cancelled" in err
    assert query_migrate(daemon.socket_path)["status"] == "cancelled"
    assert memdevs(daemon.socket_path) == []
    assert migd("inspect", short_dir / "c.img").returncode == 1  # never taken for complete


def test_save_into_a_filesystem_without_o_direct_turns_direct_io_off(daemon, shm, ramfs):
    assert probe_direct_io(str(ramfs / "x.img"), for_write=True) is False
    assert list(ramfs.iterdir()) == []  # the probe cleans up after itself
    fill_random(shm / "src", 2 * MiB)
    result = migd("save", ramfs / "x.img", "--socket", daemon.socket_path,
                  "--mem-path", shm / "src")  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_direct_io_probe_says_yes_on_a_disk_filesystem_and_leaves_nothing(short_dir):
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(short_dir)], capture_output=True,
                        text=True).stdout.strip()  # fmt: skip
    if fs not in ("ext2/ext3", "ext4", "xfs", "btrfs"):
        pytest.skip(f"{short_dir} is on {fs}, not a disk filesystem")
    assert probe_direct_io(str(short_dir / "x.img"), for_write=True) is True
    assert list(short_dir.iterdir()) == []
    (short_dir / "y.img").write_bytes(bytes(8192))
    assert probe_direct_io(str(short_dir / "y.img"), for_write=False) is True


def test_the_direct_io_probe_never_writes_through_a_link_swapped_in(short_dir, monkeypatch):
    """The save's probe created its scratch file, closed it and opened the name again with
    O_DIRECT: another user who swapped a link in between (any directory they may write)
    had 4 KiB of zeros written over any file root could write (red-team, session 14)."""
    victim = short_dir / "victim"
    victim.write_bytes(b"x" * 8192)
    real_open = os.open
    swapped = []

    def open_then_swap(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if isinstance(path, str) and ".migd-direct-io-probe-" in path and flags & os.O_CREAT:
            os.unlink(path)  # the attacker's move, as soon as the probe exists
            os.symlink(victim, path)
            swapped.append(path)
        return fd

    monkeypatch.setattr(os, "open", open_then_swap)
    probe_direct_io(str(short_dir / "x.img"), for_write=True)
    monkeypatch.undo()
    assert swapped and victim.read_bytes() == b"x" * 8192
    assert os.path.islink(swapped[0])  # not the probe's to remove: it is not its file


def test_the_read_probe_opens_no_device(short_dir):
    """A restore's probe reads the file named: a device there is not opened at all
    (its open alone may act); the daemon then words the refusal."""
    assert probe_direct_io("/dev/null", for_write=False) is False
    os.mkfifo(short_dir / "fifo")
    assert probe_direct_io(str(short_dir / "fifo"), for_write=False) is False


# --- status / call --------------------------------------------------------------------


def test_status_before_and_after_a_save(daemon, shm, short_dir):
    result = migd("status", "--socket", daemon.socket_path)
    assert result.returncode == 0 and "no migration has run" in result.stdout
    assert json.loads(migd("status", "--socket", daemon.socket_path, "--json").stdout) == {}
    fill_random(shm / "src", 4 * MiB)
    assert migd("save", short_dir / "s.img", "--socket", daemon.socket_path,
                "--mem-path", shm / "src").returncode == 0  # fmt: skip
    result = migd("status", "--socket", daemon.socket_path)
    assert result.returncode == 0
    assert "status:       completed" in result.stdout
    assert "progress:     100% (4.0 MiB of 4.0 MiB)" in result.stdout
    info = json.loads(migd("status", "--socket", daemon.socket_path, "--json").stdout)
    assert info["status"] == "completed" and info["ram"]["total"] == 4 * MiB


def test_restore_of_a_foreign_file_exits_1_with_the_daemons_error(daemon, shm, short_dir):
    fill_random(shm / "src", MiB)
    image = short_dir / "bad.img"
    image.write_bytes(b"not a save file")
    result = migd("restore", image, "--socket", daemon.socket_path, "--mem-path", shm / "src",
                  "--size", "1M", "--block-name", "x")  # fmt: skip
    assert result.returncode == 1 and "Not a migration stream" in result.stderr
    assert memdevs(daemon.socket_path) == []


def test_status_shows_the_error_of_a_failed_save(daemon, shm, short_dir, ramfs):
    fill_random(shm / "src", 4 * MiB)
    # direct-io forced on where O_DIRECT is refused: the save starts, then fails.
    client = RawClient(daemon.socket_path).negotiate()
    client.execute("object-add", {"qom-type": "memory-backend-file", "id": "a", "size": 4 * MiB,
                                  "mem-path": str(shm / "src"), "share": True})  # fmt: skip
    caps = [{"capability": c, "state": True} for c in ("mapped-ram", "multifd")]
    client.execute("migrate-set-capabilities", {"capabilities": caps})
    client.execute("migrate-set-parameters", {"direct-io": True})
    client.execute("migrate", {"uri": f"file:{ramfs}/x.img"})
    deadline = time.monotonic() + 20
    while client.execute("query-migrate")["return"]["status"] not in ("failed", "completed"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client.close()
    result = migd("status", "--socket", daemon.socket_path)
    assert result.returncode == 0
    assert "status:       failed" in result.stdout
    assert "error:        " in result.stdout and "O_DIRECT" in result.stdout


def test_call_query_version_prints_the_json_result(daemon):
    result = migd("call", "--socket", daemon.socket_path, "query-version", "{}")
    assert result.returncode == 0, result.stderr
    version = json.loads(result.stdout)
    assert set(version) == {"qemu", "package"} and version["package"].startswith("migd ")
    # The arguments are optional.
    result = migd("call", "--socket", daemon.socket_path, "query-memdev")
    assert result.returncode == 0 and json.loads(result.stdout) == []


def test_call_of_a_failing_command_prints_class_and_text_and_exits_1(daemon):
    result = migd("call", "--socket", daemon.socket_path, "no-such-command", "{}")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == (
        "error: CommandNotFound: The command no-such-command has not been found"
    )
    result = migd("call", "--socket", daemon.socket_path, "object-del", '{"id": "nope"}')
    assert result.returncode == 1 and result.stderr.startswith("error: GenericError: ")


# --- usage errors and no daemon -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["call", "query-version", "{not json"], "not valid JSON"),
        (["call", "query-version", "[1, 2]"], "must be a JSON object"),
        (["save", "x.img", "--size", "12Q"], "is not a size"),
        (["save", "x.img", "--channels", "0"], "out of range 1..255"),
        (["save", "x.img", "--offset", "-5"], "'-5' is not an offset (a size as in a file: URI"),
        (["save", "x.img", "--bogus"], "unrecognized arguments"),
        (["save"], "required: FILE"),
        (["save", "x.img", "--size", "1M"], "--size, --id and --block-name go with --mem-path"),
        (["inspect"], "required: FILE"),
    ],
)
def test_usage_errors_exit_2(short_dir, args, text):
    if args[0] != "inspect":
        args = [*args, "--socket", short_dir / "any.sock"]
    result = migd(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert text in result.stderr


@pytest.mark.parametrize(
    "args",
    [["status"], ["call", "query-version"], ["save", "x.img"], ["restore", "x.img"]],
)
def test_no_daemon_exits_2_naming_the_socket_and_suggesting_migd_serve(short_dir, args):
    sock = short_dir / "absent.sock"
    result = migd(*args, "--socket", sock)
    assert result.returncode == 2
    assert f"cannot connect to migd at {sock}" in result.stderr
    assert "migd serve" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_socket_nothing_listens_on_is_said_to_be_so_not_taken_for_no_daemon(short_dir):
    """The socket file of a migd that is stopping (its listener closes first, its file
    goes last) or was killed: "is the daemon running?" hid that the file is there and
    nothing listens (red-team, round 10c)."""
    sock = short_dir / "left.sock"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(sock))  # bound, not listening: as a closed listener leaves the file
    try:
        result = migd("status", "--socket", sock)
    finally:
        left.close()
    assert result.returncode == 2
    assert (
        f"cannot connect to migd at {sock}: Connection refused: the socket is there but "
        "nothing listens on it (a migd stopping, or one that was killed and left it)"
        in result.stderr
    ), result.stderr
    assert f"start one with: migd serve --socket {sock}" in result.stderr


def test_without_socket_the_client_uses_the_default_socket(short_dir):
    runtime = short_dir / "rt"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    expected = "/run/migd/migd.sock" if os.geteuid() == 0 else f"{runtime}/migd/migd.sock"
    if os.path.exists(expected):
        pytest.skip(f"a migd may be running on {expected}")
    result = subprocess.run([sys.executable, "-m", "migd", "status"], capture_output=True,
                            text=True, timeout=30, env=env)  # fmt: skip
    assert result.returncode == 2
    assert f"cannot connect to migd at {expected}" in result.stderr


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("512K", 512 << 10), ("64M", 64 << 20), ("2G", 2 << 30), ("1GiB", 1 << 30)],
)
def test_sizes_take_binary_suffixes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["1_000", "7 ", "-5", "-0", "0x", "0x-1", "12q", "1.5"])
def test_the_client_refuses_an_offset_exactly_when_a_file_uri_would(text):
    with pytest.raises(MigrationError, match="bad offset"):
        parse_uri(f"file:/x.img,offset={text}")
    with pytest.raises(ValueError, match=f"'{re.escape(text)}' is not an offset"):
        parse_offset(text)


@pytest.mark.parametrize(
    ("text", "value"), [("+5", 5), (" 7", 7), ("12k", 12 << 10), ("1.5k", 1536)]
)
def test_the_client_takes_an_offset_exactly_when_a_file_uri_does(text, value):
    assert parse_uri(f"file:/x.img,offset={text}").offset == value
    assert parse_offset(text) == value


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("4096", 4096), ("0x11921", 0x11921)])
def test_the_client_reads_an_offset_as_a_file_uri_does(text, value):
    assert parse_offset(text) == parse_uri(f"file:/x.img,offset={text}").offset == value


def test_save_with_mem_path_names_the_block_ram0_so_a_qmp_restore_into_ram0_works(
    daemon, shm, short_dir
):
    data = with_zeros(shm / "src", 8 * MiB, seed=7)
    image = short_dir / "save.img"
    saved = migd("save", image, "--socket", daemon.socket_path, "--mem-path", shm / "src")
    assert saved.returncode == 0, saved.stderr
    assert "block 'ram0'" in saved.stdout, saved.stdout  # printed: what a restore must match
    assert [b.name for b in inspect_file(str(image)).blocks] == ["ram0"]

    # QEMU's usual backend id, restored over QMP alone: the block names must match.
    client = RawClient(daemon.socket_path).negotiate()
    try:
        reply = client.execute("object-add", {"qom-type": "memory-backend-file", "id": "ram0",
                                              "size": 8 * MiB, "mem-path": str(shm / "dst"),
                                              "share": True})  # fmt: skip
        assert reply == {"return": {}}, reply
        caps = [{"capability": "mapped-ram", "state": True}]
        assert "return" in client.execute("migrate-set-capabilities", {"capabilities": caps})
        reply = client.execute("migrate-incoming", {"uri": f"file:{image}"})
        assert reply == {"return": {}}, reply
        deadline = time.monotonic() + 30
        while (info := client.execute("query-migrate")["return"])["status"] not in (
            "completed", "failed", "cancelled"
        ):  # fmt: skip
            assert time.monotonic() < deadline, info
        assert info["status"] == "completed", info
    finally:
        client.close()
    assert (shm / "dst").read_bytes() == data


def test_the_save_help_documents_the_default_backend_id():
    result = migd("save", "--help")
    assert "default ram0" in result.stdout, result.stdout


@pytest.mark.parametrize("silent_after", ["greeting", "capabilities"])
def test_a_server_that_goes_silent_is_given_up_on(short_dir, monkeypatch, capsys, silent_after):
    """A server that greets and then never answers (hung, or not migd) held `migd status`,
    `jobs`, `save` and `call` for ever (red-team, session 14): each answer has a limit."""
    import socket as socket_module
    import threading

    from migd.app.cli import main
    from migd.tools import client as client_module

    path = short_dir / "silent.sock"
    server = socket_module.socket(socket_module.AF_UNIX)
    server.bind(str(path))
    server.listen()
    stop = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10},'
                         b' "package": ""}, "capabilities": []}}\r\n')  # fmt: skip
            request = conn.recv(65536)  # qmp_capabilities (sent with no newline)
            if silent_after == "capabilities" and request:
                reply = {"return": {}}
                if "id" in json.loads(request):
                    reply["id"] = json.loads(request)["id"]
                conn.sendall(json.dumps(reply).encode() + b"\r\n")
            stop.wait(30)  # silent, the connection open, until the test ends

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    # Long enough for the "capabilities" server's prompt reply under any load, so that it
    # is the query that goes unanswered, not the negotiation.
    monkeypatch.setattr(client_module, "ANSWER_TIMEOUT", 3.0)
    try:
        code = main(["status", "--socket", str(path)])
    finally:
        stop.set()
        thread.join(10)
        server.close()
    err = capsys.readouterr().err
    assert code in (1, 2) and "within 3 s" in err, err
    expected = "does not speak QMP" if silent_after == "greeting" else "migd did not answer"
    assert expected in err, err


@pytest.mark.parametrize("as_job", [False, True], ids=["migrate", "job"])
def test_the_daemon_killed_during_a_save_is_said_plainly_and_exits_1(shm, short_dir, as_job):
    """migd SIGKILLed while `migd save` follows its save: exit 1 and "lost the connection
    to migd: migd closed it (it stopped or was killed)", with no cleanup call attempted
    on the dead connection (before: qemu.qmp's "QMPClient is disconnecting. Call
    disconnect() to return to IDLE state." and a warning that object-del failed)."""
    fill_random(shm / "src", 64 * MiB)
    sock = short_dir / "m.sock"
    daemon = start_daemon(sock).proc
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "migd", "save", str(short_dir / "c.img"), "--socket",
             str(sock), "--mem-path", str(shm / "src"), "--max-bandwidth", "4M",
             *(["--job-id", "j1"] if as_job else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stderr is not None
        first = proc.stderr.readline()  # its first progress line: the save runs
        assert first.startswith("save "), first
        daemon.kill()
        daemon.wait()
        _, err = rest_of_output(proc, 60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert proc.returncode == 1, err
    assert "lost the connection to migd: migd closed it (it stopped or was killed)" in err, err
    assert "QMPClient" not in err and "warning" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["jobs", "status", "save"])
def test_a_listener_that_greets_with_garbage_is_named_not_taken_for_a_missing_daemon(
    short_dir, command
):
    """Another program on the socket answering bytes that are not a QMP greeting: exit 2,
    "answered, but not as migd's QMP server does" (before: "cannot connect to migd ...:
    'utf-16-be' codec can't decode byte 0x0a ... is the daemon running? start it")."""
    path = short_dir / "g.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"\x00\xffnot json\n")
            conn.recv(100)  # until the client hangs up

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        extra = [short_dir / "x.img", "--size", "1M", "--mem-path", short_dir / "m"]
        proc = migd(command, *(extra if command == "save" else []), "--socket", path)
    finally:
        listener.close()
    server.join(30)
    assert proc.returncode == 2, proc.stderr
    assert f"{path} answered, but not as migd's QMP server does: " in proc.stderr, proc.stderr
    assert "is the daemon running" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (short_dir / "x.img").exists()


@pytest.fixture
def stopped_daemon(short_dir):
    """A migd stopped by SIGSTOP (waitpid says so), continued and ended after the test."""
    d = start_daemon(short_dir / "m.sock")
    try:
        yield d
    finally:
        d.proc.send_signal(signal.SIGCONT)
        d.stop()


def _stop_process(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    _, status = os.waitpid(pid, os.WUNTRACED)  # returns once the kernel has stopped it
    assert os.WIFSTOPPED(status)


def test_status_of_a_stopped_migd_says_it_is_stopped_and_how_to_continue_it(
    stopped_daemon, capsys, monkeypatch
):
    """A migd stopped by SIGSTOP still has its connections accepted by the kernel:
    `migd status` waited the whole ANSWER_TIMEOUT and then said "the server accepts
    connections but does not speak QMP" (red-team, round 10c). It says the process is
    stopped, names it and how to continue it, without waiting the timeout out."""
    from migd.app.cli import main
    from migd.tools import client as client_module

    pid = stopped_daemon.pid
    _stop_process(pid)
    monkeypatch.setattr(client_module, "ANSWER_TIMEOUT", 20.0)  # the bug: waited it out
    code = main(["status", "--socket", str(stopped_daemon.socket_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"does not answer: its process (pid {pid}, " in err, err
    assert f"is stopped (SIGSTOP, SIGTSTP or a job control stop): `kill -CONT {pid}`" in err
    assert "does not speak QMP" not in err


async def test_a_migd_stopped_during_a_session_is_named_as_stopped(stopped_daemon, monkeypatch):
    """The same once connected: a command's answer waited for, then "is it hung?"."""
    from migd.tools import client as client_module

    client = await client_module.connect(str(stopped_daemon.socket_path))
    try:
        _stop_process(stopped_daemon.pid)
        monkeypatch.setattr(client_module, "ANSWER_TIMEOUT", 20.0)
        with pytest.raises(client_module.ClientError) as caught:
            await client_module.execute(client, "query-migrate")
    finally:
        stopped_daemon.proc.send_signal(signal.SIGCONT)
        await client_module.disconnect(client)
    text = str(caught.value)
    assert text.startswith("query-migrate: migd does not answer: its process (pid "), text
    assert f"`kill -CONT {stopped_daemon.pid}`" in text
