"""The TOML configuration file of `migd serve`: errors, backends, defaults, overrides."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from migd.app import config as config_module
from migd.app.config import load_config

from .conftest import RawClient, wait_for_socket
from .test_query_memdev import MIGD_MAPPING as QEMU_MEMDEV_MEMBERS

BACKEND_RAM = '[[memory-backend]]\nqom-type = "memory-backend-ram"\nid = "a"\nsize = 4096\n'

BAD_CONFIGS = [
    # (file text, key named in the error, words of the problem)
    ("socket = ", "invalid TOML", "line 1"),
    ('sokcet = "/run/x.sock"', "sokcet", "unknown key (did you mean 'socket'?)"),
    ('socket_path = "/run/x.sock"', "socket_path", "unknown key"),
    ("socket-mode = 0o1777", "socket-mode", "must be a mode from 0o000 to 0o777"),
    ('socket-mode = "rw"', "socket-mode", "must be a mode"),
    ('log-level = "loud"', "log-level", "must be 'debug', 'info', 'warning' or 'error'"),
    ('allowed-dirs = "/var/lib/migd"', "allowed-dirs", "must be an array"),
    ('allowed-dirs = ["/dev/shm", "saves"]', "allowed-dirs[1]", "must be an absolute path"),
    ("capabilities = true", "capabilities", "must be a table"),
    ('[capabilities]\nmultifd = "yes"', "capabilities.multifd", "must be true or false"),
    ("[capabilities]\nmapped_ram = true", "capabilities.mapped_ram", "did you mean 'mapped-ram'"),
    ("[capabilities]\nxbzrle-nope = true", "capabilities.xbzrle-nope", "unknown key"),
    # QEMU's capabilities and parameters, with migrate-set-*'s checks and texts
    (
        "[capabilities]\nxbzrle = true",
        "capabilities.xbzrle",
        "migd does not implement the 'xbzrle' capability",
    ),
    # Red-team, session 14: tracebacks, a relative socket bound in systemd's cwd (/), and
    # a long one whose directories were made before the start was refused.
    ('socket = "rel.sock"', "socket", "must be an absolute path, not 'rel.sock'"),
    ('socket = "/tmp/a\\u0000b.sock"', "socket", "must not hold a NUL byte"),
    ('socket = "/tmp/' + "d/" * 60 + 'q.sock"', "socket", "is longer than 107 bytes"),
    ('allowed-dirs = ["/tmp/a\\u0000"]', "allowed-dirs[0]", "must not hold a NUL byte"),
    (
        '[[memory-backend]]\nqom-type = "memory-backend-file"\nid = "m"\nsize = 4096\n'
        'mem-path = "/dev/shm/a\\u0000"',
        "memory-backend[0].mem-path",
        "must not hold a NUL byte",
    ),
    (
        "[capabilities]\nmapped-ram = true\npostcopy-ram = true",
        "capabilities",
        "Mapped-ram migration is incompatible with postcopy",
    ),
    (
        "[parameters]\nmax-cpu-throttle = 10",
        "parameters.max-cpu-throttle",
        "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial",
    ),
    (
        "[parameters]\ncpu-throttle-initial = 256",
        "parameters.cpu-throttle-initial",
        "must be an integer from 0 to 255",
    ),
    (
        '[capabilities]\nmapped-ram = true\n[parameters]\ntls-creds = "tls0"',
        "parameters.tls-creds",
        "Mapped-ram only available for non-compressed non-TLS multifd migration",
    ),
    ('[parameters]\nmode = "cpr-reboot"', "parameters.mode", "migd does not implement"),
    ("[parameters]\nmultifd-channels = 0", "parameters.multifd-channels", "between 1 and 255"),
    ("[parameters]\nmultifd-channels = 256", "parameters.multifd-channels", "between 1 and 255"),
    ("[parameters]\nmultifd-channels = 4.0", "parameters.multifd-channels", "must be an integer"),
    ("[parameters]\nmax-bandwidth = -1", "parameters.max-bandwidth", "must be 0 (unlimited)"),
    ('max-bandwidth = "2X"', "max-bandwidth", 'must be a size like 1073741824 or "1G", not \'2X\''),
    ("max-bandwidth = -1", "max-bandwidth", "must be an integer from 0 to 18446744073709551615"),
    ('[parameters]\ndirect-io = "on"', "parameters.direct-io", "must be true or false"),
    (
        '[parameters]\nzero-page-detection = "nope"',
        "parameters.zero-page-detection",
        "must be 'none', 'legacy' or 'multifd'",
    ),
    ('[memory-backend]\nid = "a"', "memory-backend", "write each one as [[memory-backend]]"),
    ('[[memory-backend]]\nid = "a"\nsize = 4096', "memory-backend[0].qom-type", "is required"),
    (
        BACKEND_RAM.replace("memory-backend-ram", "memory-backend-memfd"),
        "memory-backend[0].qom-type",
        "must be 'memory-backend-file' or 'memory-backend-ram'",
    ),
    (BACKEND_RAM.replace('"a"', '"1a"'), "memory-backend[0].id", "must be an identifier"),
    (BACKEND_RAM.replace("4096", "1000"), "memory-backend[0].size", "multiple of 4096"),
    (BACKEND_RAM.replace("4096", '"2X"'), "memory-backend[0].size", 'like 1073741824 or "1G"'),
    (BACKEND_RAM + "share = true", "memory-backend[0].share", "always private"),
    (BACKEND_RAM + 'mem-path = "/dev/shm/a"', "memory-backend[0].mem-path", "not allowed"),
    (BACKEND_RAM + "mem_path = 1", "memory-backend[0].mem_path", "did you mean 'mem-path'"),
    (
        BACKEND_RAM.replace("memory-backend-ram", "memory-backend-file"),
        "memory-backend[0].mem-path",
        "is required for memory-backend-file",
    ),
    (
        BACKEND_RAM.replace("memory-backend-ram", "memory-backend-file") + 'mem-path = "a.ram"',
        "memory-backend[0].mem-path",
        "must be an absolute path",
    ),
    (BACKEND_RAM + BACKEND_RAM, "memory-backend[1].id", "already used by memory-backend[0]"),
    (
        BACKEND_RAM
        + 'ramblock-name = "pc.ram"\n'
        + BACKEND_RAM.replace('"a"', '"b"')
        + 'ramblock-name = "pc.ram"\n',
        "memory-backend[1].ramblock-name",
        "RAM block name 'pc.ram' is already used",
    ),
]


def run_serve(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migd", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_config_error(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    """Exit code 78 (EX_CONFIG) and exactly one stderr line, starting with `prefix`;
    returns the line."""
    assert result.returncode == 78, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("text", "key", "words"), BAD_CONFIGS, ids=[key for _, key, _ in BAD_CONFIGS]
)
def test_a_bad_config_file_is_one_error_line_naming_the_key_with_exit_code_78_and_no_socket(
    short_dir, text, key, words
):
    conf = short_dir / "migd.toml"
    conf.write_text(text + "\n")
    sock = short_dir / "run" / "qmp.sock"
    result = run_serve("--config", str(conf), "--socket", str(sock))
    line = assert_config_error(result, f"migd: {conf}: {key}: ")
    assert words in line
    assert not sock.parent.exists()


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("missing", "cannot read: No such file or directory"),
        ("directory", "cannot read: Is a directory"),
        ("binary", "not UTF-8 text"),
        # Red-team, session 14: a FIFO blocked the start for ever, a file others may
        # write was read as root's configuration, deep nesting was a traceback.
        ("fifo", "not a regular file (it is a FIFO)"),
        ("writable-by-others", "refused: owned by uid 0 with mode 0666; migd reads a "
         "configuration only if root or its own user owns it and no one else may write it"),
        ("another-users", "refused: owned by uid 65534 with mode 0600; migd reads a "
         "configuration only if root or its own user owns it and no one else may write it"),
        ("in-a-directory-others-may-change", "refused: '{conf}' lies in '{dir}', writable "
         "by group or others without the sticky bit (mode 0777): another user could swap "
         "the file"),
        ("nested-too-deeply", "invalid TOML: nested too deeply"),
    ],
)
def test_an_unreadable_config_file_is_a_usage_error_before_any_socket(short_dir, setup, words):
    conf = short_dir / "migd.toml"
    if setup == "directory":
        conf.mkdir()
    elif setup == "binary":
        conf.write_bytes(b'socket = "\xff\xfe"\n')
    elif setup == "fifo":
        os.mkfifo(conf)
    elif setup == "writable-by-others":
        conf.write_text('log-level = "info"\n')
        conf.chmod(0o666)
    elif setup == "another-users":
        conf.write_text('socket-mode = 0o666\n')
        os.chown(conf, 65534, 65534)
    elif setup == "in-a-directory-others-may-change":
        (short_dir / "open").mkdir()
        (short_dir / "open").chmod(0o777)
        conf = short_dir / "open" / "migd.toml"
        conf.write_text('log-level = "info"\n')
        words = words.format(conf=conf, dir=conf.parent)
    elif setup == "nested-too-deeply":
        conf.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    sock = short_dir / "run" / "qmp.sock"
    result = run_serve("--config", str(conf), "--socket", str(sock))
    assert assert_config_error(result, f"migd: {conf}: ") == f"migd: {conf}: {words}"
    assert not sock.parent.exists()


def write_good_config(short_dir: Path, shm: Path) -> tuple[Path, Path]:
    sock = short_dir / "file.sock"
    conf = short_dir / "migd.toml"
    conf.write_text(
        f"""
socket = "{sock}"
socket-mode = 0o640
log-level = "info"
allowed-dirs = ["{shm}/", "/var/lib/migd"]

[capabilities]
multifd = true
mapped-ram = true

[parameters]
multifd-channels = 4
downtime-limit = 2000
direct-io = true
max-bandwidth = 0
zero-page-detection = "none"

[[memory-backend]]
qom-type = "memory-backend-file"
id = "vm0-ram"
size = "8M"
mem-path = "{shm}/vm0.ram"
ramblock-name = "pc.ram"

[[memory-backend]]
qom-type = "memory-backend-ram"
id = "scratch"
size = 65536
"""
    )
    return conf, sock


def start_serve(sock: Path, *args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "migd", "serve", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(sock, proc, 15)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def stop(proc: subprocess.Popen[bytes]) -> str:
    proc.terminate()
    assert proc.wait(10) == 0
    assert proc.stderr is not None
    return proc.stderr.read().decode()


def test_a_good_config_creates_its_backends_and_sets_default_capabilities_and_parameters(
    short_dir, shm
):
    conf, sock = write_good_config(short_dir, shm)
    proc = start_serve(sock, "--config", str(conf))
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o640
        assert os.stat(shm / "vm0.ram").st_size == 8 << 20
        client = RawClient(sock).negotiate()
        assert client.execute("query-memdev") == {
            "return": [
                {
                    "id": "vm0-ram",
                    "size": 8 << 20,
                    **QEMU_MEMDEV_MEMBERS,
                    "share": True,
                    "qom-type": "memory-backend-file",
                    "mem-path": f"{shm}/vm0.ram",
                    "ramblock-name": "pc.ram",
                },
                {
                    "id": "scratch",
                    "size": 65536,
                    **QEMU_MEMDEV_MEMBERS,
                    "share": False,
                    "qom-type": "memory-backend-ram",
                    "ramblock-name": "scratch",
                },
            ]
        }
        caps = client.execute("query-migrate-capabilities")["return"]
        assert {c["capability"] for c in caps if c["state"]} == {"multifd", "mapped-ram"}
        params = client.execute("query-migrate-parameters")["return"]
        assert (
            params
            | {
                "multifd-channels": 4,
                "direct-io": True,
                "max-bandwidth": 0,
                "zero-page-detection": "none",
                "downtime-limit": 2000,  # stored and reported, no effect on a save
            }
            == params
        )
        client.close()
    finally:
        log = stop(proc)
    assert "created memory backend 'vm0-ram'" in log
    assert not sock.exists()
    assert (shm / "vm0.ram").exists()  # a backend's file outlives the daemon


def test_command_line_options_override_the_socket_and_mode_of_the_file(short_dir, shm):
    conf, file_sock = write_good_config(short_dir, shm)
    cli_sock = short_dir / "cli" / "qmp.sock"
    proc = start_serve(
        cli_sock, "--config", str(conf), "--socket", str(cli_sock), "--socket-mode", "0600"
    )
    try:
        assert stat.S_IMODE(os.stat(cli_sock).st_mode) == 0o600
        assert not file_sock.exists()
        client = RawClient(cli_sock).negotiate()
        ids = [b["id"] for b in client.execute("query-memdev")["return"]]
        assert ids == ["vm0-ram", "scratch"]  # the rest of the file still applies
        client.close()
    finally:
        stop(proc)
    assert not file_sock.exists()


@pytest.mark.parametrize(("cli_level", "logged"), [(None, False), ("info", True)])
def test_the_log_level_of_the_file_applies_unless_the_command_line_sets_one(
    short_dir, cli_level, logged
):
    conf = short_dir / "migd.toml"
    conf.write_text('log-level = "error"\n')
    sock = short_dir / "qmp.sock"
    extra = ["--log-level", cli_level] if cli_level else []
    proc = start_serve(sock, "--config", str(conf), "--socket", str(sock), *extra)
    log = stop(proc)
    assert ("serving QMP on" in log) is logged


def test_a_backend_that_cannot_be_created_stops_the_start_with_exit_code_1_and_no_socket(
    short_dir, shm
):
    conf = short_dir / "migd.toml"
    conf.write_text(
        f"""
[[memory-backend]]
qom-type = "memory-backend-ram"
id = "first"
size = 4096

[[memory-backend]]
qom-type = "memory-backend-file"
id = "broken"
size = 4096
mem-path = "{shm}/no/such/dir/ram"
"""
    )
    sock = short_dir / "qmp.sock"
    result = run_serve("--config", str(conf), "--socket", str(sock))
    assert result.returncode == 1
    cause = f"can't open backing store {shm}/no/such/dir/ram for guest RAM"
    # Named as the file's own errors are: the file and the key (red-team, round 10c).
    where = f"{conf}: memory-backend[1]: "
    assert f"{where}Cannot create memory backend 'broken': {cause}" in result.stderr
    assert not sock.exists()


def test_allowed_dirs_that_cannot_hold_files_are_warned_about_at_the_start(
    short_dir, readonly_dir
):
    """An allowed directory that does not exist (a typo), is a file, or is read-only (a
    directory added to allowed-dirs but not to the unit's ReadWritePaths=, under
    ProtectSystem=strict) started migd without a word: each client's save failed later
    (red-team, round 10c). Each is a warning at the start; migd still serves."""
    missing, a_file = short_dir / "no-such-dir", short_dir / "file"
    a_file.write_bytes(b"")
    conf = short_dir / "migd.toml"
    conf.write_text(f'allowed-dirs = ["{missing}", "{a_file}", "{readonly_dir}", "{short_dir}"]\n')
    conf.chmod(0o600)
    sock = short_dir / "qmp.sock"
    log = stop(start_serve(sock, "--config", str(conf), "--socket", str(sock)))
    assert f"allowed-dirs: '{missing}' cannot be used: No such file or directory" in log, log
    assert f"allowed-dirs: '{a_file}' is not a directory" in log
    assert f"allowed-dirs: '{readonly_dir}' is on a read-only mount here" in log
    assert f"allowed-dirs: '{short_dir}'" not in log


@pytest.mark.parametrize("option", ["--config", "--socket", "--log-level"])
def test_an_option_of_serve_given_twice_is_a_usage_error(short_dir, option):
    """`--config A --config B` (a drop-in's ExecStart= adding one to the unit's) read B
    alone, silently (red-team, round 10c): the operator editing A saw nothing change."""
    values = {
        "--config": [str(short_dir / "a.toml"), str(short_dir / "b.toml")],
        "--socket": [str(short_dir / "a.sock"), str(short_dir / "b.sock")],
        "--log-level": ["info", "debug"],
    }[option]
    result = run_serve(option, values[0], option, values[1], "--config", str(short_dir / "x"))
    assert result.returncode == 2, result.stderr
    assert f"migd serve: error: {option} given twice: give it once" in result.stderr
    assert list(short_dir.iterdir()) == []


def test_without_config_option_the_default_file_is_read_when_it_exists(tmp_path, monkeypatch):
    default = tmp_path / "migd.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(default))
    assert load_config().parameters.multifd_channels is None
    default.write_text("[parameters]\nmultifd-channels = 7\n")
    assert load_config().parameters.multifd_channels == 7
    assert load_config(log_level="debug").log_level == "debug"


def test_an_explicit_config_file_that_is_missing_is_an_error_even_if_the_default_exists(
    tmp_path, monkeypatch
):
    default = tmp_path / "migd.toml"
    default.write_text("")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(default))
    with pytest.raises(config_module.ConfigError, match="cannot read"):
        load_config(str(tmp_path / "other.toml"))


def test_python_callers_may_still_build_a_config_by_field_name():
    conf = config_module.Config(socket_path="/run/x.sock", socket_mode=0o660)
    assert (conf.socket_path, conf.socket_mode, conf.allowed_dirs) == ("/run/x.sock", 0o660, [])


def test_allowed_dirs_are_loaded_normalised(tmp_path):
    conf = tmp_path / "migd.toml"
    conf.write_text('allowed-dirs = ["/var/lib/migd/", "/dev//shm"]\n')
    assert load_config(str(conf)).allowed_dirs == ["/var/lib/migd", "/dev/shm"]


def test_sizes_accept_bytes_and_binary_suffixes(tmp_path):
    conf = tmp_path / "migd.toml"
    sizes = ["8192", '"64K"', '"512M"', '"2G"', '"1GiB"', '"1t"']
    conf.write_text(
        "".join(
            f'[[memory-backend]]\nqom-type = "memory-backend-ram"\nid = "b{i}"\nsize = {s}\n'
            for i, s in enumerate(sizes)
        )
    )
    got = [b.size for b in load_config(str(conf)).memory_backends]
    assert got == [8192, 64 << 10, 512 << 20, 2 << 30, 1 << 30, 1 << 40]


def test_a_socket_path_too_long_is_refused_before_any_directory_is_made(short_dir):
    """`--socket` (as an instance's unit passes it) longer than a UNIX socket path holds:
    the start failed with exit 1, so systemd retried it, and left the directories it had
    made on the way (red-team, session 14)."""
    sock = short_dir / "new" / ("x" * 120) / "qmp.sock"
    result = run_serve("--socket", str(sock))
    assert result.returncode == 78, result.stderr
    assert "is longer than 107 bytes" in result.stderr
    assert not (short_dir / "new").exists()


def test_the_top_level_max_bandwidth_takes_a_size_as_object_adds_size_does(short_dir):
    """max-bandwidth = "1G" (QEMU's size syntax, as a backend's size takes it): migd starts
    with all jobs capped at 1 GiB/s (before: exit 78, "max-bandwidth: must be an integer").
    [parameters] max-bandwidth stays an integer, as migrate-set-parameters takes it."""
    sock = short_dir / "run" / "qmp.sock"
    conf = short_dir / "migd.toml"
    conf.write_text('max-bandwidth = "1G"\n')
    proc = start_serve(sock, "--config", str(conf), "--socket", str(sock))
    log = stop(proc)
    assert "all jobs' page I/O together capped at 1073741824 bytes/s (max-bandwidth)" in log
