"""`migd vm save` / `restore` against a QEMU that lies, breaks or stops answering.

`migd vm` runs as root on the word of whatever serves the QMP socket it is given
(tests/fake_qemu.py plays that part here, no QEMU needed). Red-team, session 13: a fake
QEMU that named a root-only file as its RAM had root's migd save that file into the image
and a restore overwrite it; a silent QEMU hung the client for ever, deaf to SIGINT and
SIGTERM, with the guest stopped; malformed replies gave tracebacks, a numeric backend
id replaced a good image with an unusable one, and a guest left paused went unmentioned.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import DaemonProcess, fill_random

MiB = 1 << 20
SIZE = 8 * MiB
FAKE = Path(__file__).with_name("fake_qemu.py")


class Fake:
    """A fake QEMU process and the log of the commands it received."""

    def __init__(self, directory: Path, name: str, config: dict[str, Any]) -> None:
        self.sock = directory / f"{name}.qmp"
        self.log = directory / f"{name}.log"
        self.log.touch()
        (directory / f"{name}.json").write_text(json.dumps(config))
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), str(self.sock), str(directory / f"{name}.json"),
             str(self.log)]
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.sock.exists():  # renamed into place once it listens
            assert self.proc.poll() is None, "the fake QEMU died"
            assert time.monotonic() < deadline, "the fake QEMU never listened"
            time.sleep(0.01)

    def commands(self) -> list[str]:
        return [line[3:] for line in self.log.read_text().splitlines() if line.startswith("<- ")]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def fakes(short_dir: Path) -> Any:
    started: list[Fake] = []

    def start(config: dict[str, Any], name: str = "qemu") -> Fake:
        fake = Fake(short_dir, name, config)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.close()


def vm(daemon: DaemonProcess, fake: Fake, *args: str, **popen: Any) -> Any:
    cmd = [sys.executable, "-m", "migd", "vm", args[0], "--qmp", str(fake.sock),
           "--socket", str(daemon.socket_path), "-q", *args[1:]]  # fmt: skip
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def memdev(path: Path, id: str = "ram0", size: int = SIZE) -> dict[str, Any]:
    return {"id": id, "size": size, "share": True, "mem-path": str(path)}


def daemon_backends(daemon: DaemonProcess) -> list[Any]:
    out = subprocess.run(
        [sys.executable, "-m", "migd", "call", "--socket", str(daemon.socket_path),
         "query-memdev", "{}"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    return list(json.loads(out))


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".migd-vm-tmp")]


def test_the_fake_is_a_qemu_migd_vm_saves(daemon, fakes, short_dir, shm):
    """The baseline the refusals below are measured against: the fake maps its RAM file
    as QEMU does, and the save works."""
    fill_random(shm / "ram", SIZE)
    fake = fakes({"memdevs": [memdev(shm / "ram")]})
    result = vm(daemon, fake, "save", str(short_dir / "vm.img"))
    assert result.returncode == 0, result.stderr
    assert "stop" in fake.commands()
    assert (short_dir / "vm.img").exists()


def test_a_qemu_naming_a_file_it_does_not_map_is_refused_before_the_guest_stops(
    daemon, fakes, short_dir, shm
):
    secret = short_dir / "secret"
    secret.write_bytes(b"TOPSECRET".ljust(SIZE, b"\0"))
    secret.chmod(0o600)
    image = short_dir / "vm.img"
    image.write_bytes(b"the old image")
    fake = fakes({"memdevs": [memdev(secret)], "map_memdevs": False})
    result = vm(daemon, fake, "save", str(image))
    assert result.returncode == 1
    assert (
        f"memory backend 'ram0': QEMU (pid {fake.proc.pid}, the QMP socket's peer) does not map "
        f"'{secret}'"
    ) in result.stderr
    assert "stop" not in fake.commands()
    assert image.read_bytes() == b"the old image"
    assert daemon_backends(daemon) == [] and leftovers(short_dir) == []


def test_a_restore_into_a_file_the_qemu_does_not_map_is_refused_and_changes_nothing(
    daemon, fakes, short_dir, shm
):
    fill_random(shm / "ram", SIZE)
    saver = fakes({"memdevs": [memdev(shm / "ram")]}, name="a")
    image = short_dir / "vm.img"
    assert vm(daemon, saver, "save", str(image)).returncode == 0
    victim = short_dir / "victim"
    victim.write_bytes(b"keep me".ljust(SIZE, b"\0"))
    fake = fakes({"memdevs": [memdev(victim)], "map_memdevs": False, "state": "inmigrate"},
                 name="b")  # fmt: skip
    result = vm(daemon, fake, "restore", str(image))
    assert result.returncode == 1
    assert "does not map" in result.stderr
    assert victim.read_bytes().startswith(b"keep me")
    assert "stop" not in fake.commands()


def test_a_silent_qemu_ends_in_an_error_within_the_timeout_and_says_the_guest_is_paused(
    daemon, fakes, short_dir, shm
):
    fill_random(shm / "ram", SIZE)
    fake = fakes({"memdevs": [memdev(shm / "ram")], "overrides": {"query-migrate": {"hang": True}}})
    result = vm(daemon, fake, "save", "--qemu-timeout", "1", str(short_dir / "vm.img"))
    assert result.returncode == 1
    assert "QEMU did not answer 'query-migrate' within 1 s" in result.stderr
    # The hung QEMU cannot take the cont either: the client says so, never silently.
    assert "the VM could not be resumed" in result.stderr and "it is paused" in result.stderr
    assert "Traceback" not in result.stderr
    assert daemon_backends(daemon) == [] and leftovers(short_dir) == []
    assert not (short_dir / "vm.img").exists()


def test_sigterm_ends_a_save_waiting_on_a_silent_qemu_and_it_cleans_up(
    daemon, fakes, short_dir, shm
):
    fill_random(shm / "ram", SIZE)
    fake = fakes({"memdevs": [memdev(shm / "ram")], "overrides": {"query-migrate": {"hang": True}}})
    client = vm(daemon, fake, "save", str(short_dir / "vm.img"), popen=True)
    deadline = time.monotonic() + 60
    while "hanging on query-migrate" not in fake.log.read_text():
        assert client.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    client.send_signal(signal.SIGTERM)
    _, err = client.communicate(timeout=30)  # the default timeout is 60 s: this is the signal
    assert client.returncode == 1, err
    assert "interrupted (Ctrl-C or SIGTERM)" in err
    assert "it is paused" in err
    assert daemon_backends(daemon) == [] and leftovers(short_dir) == []


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"query-status": {"return": {}}}, "QEMU's reply to query-status has no 'status'"),
        ({"query-memdev": {"return": [{"id": 5, "size": SIZE, "share": True}]}},
         "QEMU's 'id' in its reply to query-memdev is 5, not the str QEMU sends"),
        ({"query-memdev": {"return": [{"id": "a/../b", "size": SIZE, "share": True}]}},
         "QEMU's memory backend id 'a/../b' is not an id QEMU accepts"),
        ({"query-memdev": {"return": {"id": "ram0"}}},
         "QEMU's reply to query-memdev is {'id': 'ram0'}, not the list QEMU sends"),
        ({"query-version": {"return": {"qemu": "10.0"}}},
         "QEMU's 'qemu' in its reply to query-version is '10.0', not the dict QEMU sends"),
        ({"qom-get": {"return": ["/dev/shm/x"]}}, "not the str QEMU sends"),
    ],
    ids=["no-status", "numeric-id", "path-id", "memdev-not-list", "version-str", "qom-list"],
)  # fmt: skip
def test_a_malformed_reply_is_a_clear_error_before_the_guest_stops_and_keeps_the_image(
    daemon, fakes, short_dir, shm, override, error
):
    fill_random(shm / "ram", SIZE)
    image = short_dir / "vm.img"
    image.write_bytes(b"the old image")
    fake = fakes({"memdevs": [memdev(shm / "ram")], "overrides": override})
    result = vm(daemon, fake, "save", str(image))
    assert result.returncode == 1
    assert error in result.stderr
    assert "Traceback" not in result.stderr
    assert "stop" not in fake.commands()
    assert image.read_bytes() == b"the old image"


def test_names_too_long_for_the_header_are_refused_before_the_guest_stops(
    daemon, fakes, short_dir, shm
):
    fill_random(shm / "ram", SIZE)
    fake = fakes({"memdevs": [memdev(shm / "ram")], "machine": "m" * 70000})
    result = vm(daemon, fake, "save", str(short_dir / "vm.img"))
    assert result.returncode == 1
    assert "this VM's names do not fit an image header" in result.stderr
    assert "stop" not in fake.commands()


def test_a_device_state_that_is_not_a_qemu_stream_fails_the_save_and_the_guest_runs_again(
    daemon, fakes, short_dir, shm
):
    fill_random(shm / "ram", SIZE)
    image = short_dir / "vm.img"
    image.write_bytes(b"the old image")
    fake = fakes({"memdevs": [memdev(shm / "ram")], "device_magic": "\0\0\0\0"})
    result = vm(daemon, fake, "save", str(image))
    assert result.returncode == 1
    assert "does not start as a QEMU migration stream does (b'QEVM')" in result.stderr
    assert "the save failed: the VM runs again" in result.stderr
    assert "cont" in fake.commands()
    assert image.read_bytes() == b"the old image"


def test_a_cont_that_fails_after_a_failed_save_is_said(daemon, fakes, short_dir, shm):
    fill_random(shm / "ram", SIZE)
    failing = {"migrate": {"error": "no space"}, "cont": {"error": "nope"}}
    fake = fakes({"memdevs": [memdev(shm / "ram")], "overrides": failing})
    result = vm(daemon, fake, "save", str(short_dir / "vm.img"))
    assert result.returncode == 1
    assert "the save failed, and the VM could not be resumed (QEMU: cont: nope): it is paused" in (
        result.stderr
    )


def test_resume_that_fails_after_a_good_save_says_the_image_is_saved_and_the_guest_paused(
    daemon, fakes, short_dir, shm
):
    fill_random(shm / "ram", SIZE)
    fake = fakes({"memdevs": [memdev(shm / "ram")], "overrides": {"cont": {"error": "nope"}}})
    result = vm(daemon, fake, "save", "--resume", str(short_dir / "vm.img"))
    assert result.returncode == 1
    assert "vm save completed" in result.stdout and "the VM is paused" in result.stdout
    assert "the image is saved, but the VM could not be resumed" in result.stderr
    assert (short_dir / "vm.img").exists()


def test_qemu_timeout_must_be_a_positive_number_of_seconds(daemon, fakes, short_dir, shm):
    fill_random(shm / "ram", SIZE)
    fake = fakes({"memdevs": [memdev(shm / "ram")]})
    result = vm(daemon, fake, "save", "--qemu-timeout", "0", str(short_dir / "vm.img"))
    assert result.returncode == 2
    assert "is not a number of seconds between 0 and 86400" in result.stderr
    assert fake.commands() == []



# --- damaged images (red-team, session 13) ----------------------------------------------------


def _saved_image(daemon: DaemonProcess, fakes: Any, short_dir: Path, shm: Path) -> Path:
    fill_random(shm / "ram", SIZE)
    fake = fakes({"memdevs": [memdev(shm / "ram")]}, name="saver")
    image = short_dir / "vm.img"
    assert vm(daemon, fake, "save", str(image)).returncode == 0
    return image


def _inspect(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migd", "inspect", str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_an_image_whose_ram_bitmap_is_corrupt_is_damaged_for_inspect_and_refused_by_restore(
    daemon, fakes, short_dir, shm
):
    """inspect said "migd vm restore accepts it" of an image the restore then refused."""
    from migd.tools import vm_image

    from .conftest import parse_save

    image = _saved_image(daemon, fakes, short_dir, shm)
    with open(image, "rb") as f:
        header = vm_image.read_header(f.fileno(), str(image))
    block = parse_save(image, header.ram.offset).blocks[0]
    with open(image, "r+b") as f:
        f.seek(block.bitmap_offset + 10)
        byte = f.read(1)[0]
        f.seek(block.bitmap_offset + 10)
        f.write(bytes([byte ^ 0x04]))
    result = _inspect(image)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "DAMAGED" in result.stdout
    assert "the RAM part: bitmap of ramblock" in result.stdout + result.stderr
    fill_random(shm / "ram", SIZE, seed=9)
    before = (shm / "ram").read_bytes()
    fake = fakes({"memdevs": [memdev(shm / "ram")], "state": "inmigrate"}, name="incoming")
    restored = vm(daemon, fake, "restore", str(image))
    assert restored.returncode == 1
    assert "the RAM part: bitmap of ramblock" in restored.stderr
    assert "stop" not in fake.commands()
    assert (shm / "ram").read_bytes() == before


def test_an_image_header_nested_thousands_deep_is_an_error_not_a_traceback(
    daemon, fakes, short_dir, shm
):
    import hashlib

    from migd.tools import vm_image

    image = _saved_image(daemon, fakes, short_dir, shm)
    body = b"[" * 5000 + b"]" * 5000
    head = vm_image._FIXED.pack(vm_image.MAGIC, vm_image.VERSION, len(body)) + body
    with open(image, "r+b") as f:
        f.write(head + hashlib.sha256(head).digest())  # a valid digest: only the JSON is bad
    result = _inspect(image)
    assert result.returncode == 1
    assert "the image header is malformed (nested too deeply)" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_a_ram_part_whose_checksum_table_is_not_the_one_saved_is_refused_before_writing(
    daemon, fakes, short_dir, shm
):
    """The header ties the RAM part's checksum table in by its digest. Here one page of the
    RAM part is changed and the table made to agree (the unit's checksum, the table's
    digest in the vmdescription): the RAM part alone is a valid save whose restore would
    verify, same save id, same bitmap. Only the header's table digest tells that it is not
    what was saved; unchecked, the changed page was restored into the guest."""
    import xxhash

    from migd.io.digests import UNIT_BYTES
    from migd.tools import vm_image
    from migd.tools.inspect import inspect_file

    from .conftest import parse_save

    image = _saved_image(daemon, fakes, short_dir, shm)
    with open(image, "rb") as f:
        header = vm_image.read_header(f.fileno(), str(image))
    info = inspect_file(image, header.ram.offset)
    table = info.checksums
    assert table is not None and table.table_digest == header.ram.table_digest
    block = parse_save(image, header.ram.offset).blocks[0]
    data = bytearray(image.read_bytes())
    data[block.pages_offset + 100] ^= 0x01  # a page of the first unit (all pages present)
    unit = bytes(data[block.pages_offset : block.pages_offset + UNIT_BYTES])
    at = table.table_offset  # the first block's first unit
    data[at : at + 16] = xxhash.xxh3_128_digest(unit)
    new_digest = xxhash.xxh3_128_hexdigest(bytes(data[at : at + table.table_bytes]))
    old = table.table_digest.encode()
    ram = bytes(data[header.ram.offset :])
    assert ram.count(old) == 1  # the vmdescription's entry; the header's is before the part
    data[header.ram.offset :] = ram.replace(old, new_digest.encode())
    image.write_bytes(bytes(data))
    tampered = inspect_file(image, header.ram.offset)  # the RAM part alone: a valid save
    assert tampered.complete and tampered.checksums is not None
    assert tampered.checksums.problem is None
    assert tampered.checksums.table_digest == new_digest != header.ram.table_digest
    fill_random(shm / "ram", SIZE, seed=9)
    before = (shm / "ram").read_bytes()
    fake = fakes({"memdevs": [memdev(shm / "ram")], "state": "inmigrate"}, name="incoming")
    restored = vm(daemon, fake, "restore", str(image))
    assert restored.returncode == 1, restored.stderr
    assert f"'{image}': the RAM part's checksum table is not the one saved" in restored.stderr
    assert (shm / "ram").read_bytes() == before


def test_an_image_header_whose_device_state_overlaps_the_ram_part_is_malformed() -> None:
    """A header is checked whole before its parts are read: a device state that runs into
    the RAM part (its digest then covers RAM pages, and QEMU would be handed them as device
    state) is refused as malformed, as a header digest cannot tell: it matches whatever
    the body says. One byte less is a header like any other."""
    from migd.tools import vm_image

    ram_offset = 4 * MiB
    header = vm_image.ImageHeader(
        image_id="i", created="c", qemu_version="10.0.0", machine="pc-q35-10.0",
        device=vm_image.DevicePart(vm_image.HEADER_AREA, 0, "0" * 64),
        ram=vm_image.RamPart(ram_offset, 8 * MiB, "1" * 32, "2" * 32),
        backends=[vm_image.BackendEntry("ram0", "ram0", 8 * MiB, "/dev/shm/ram")],
    )  # fmt: skip
    header.device.length = ram_offset - vm_image.HEADER_AREA  # ends where the RAM starts
    assert vm_image.decode(vm_image.encode(header), "vm.img") == header
    header.device.length += 1
    with pytest.raises(vm_image.ImageError) as info:
        vm_image.decode(vm_image.encode(header), "vm.img")
    assert str(info.value) == (
        "'vm.img': the image header is malformed (the device state overlaps the RAM part)"
    )


# --- the QMP socket's peer (red-team, session 13, second round) --------------------------------


class _Conn:
    """What Peer reads of a QMPClient: its stream writer's socket."""

    def __init__(self, sock: Any) -> None:
        class Transport:
            def get_extra_info(self, name: str) -> Any:
                return sock

        class Writer:
            transport = Transport()

        self._writer = Writer()


def test_a_socket_whose_listener_exited_is_not_taken_for_any_process_with_its_pid(short_dir):
    """SO_PEERCRED keeps the pid of the process that listened after it exited: a listener
    of `nobody`'s forked a server and exited, and once a root QEMU got that pid number,
    that QEMU's maps vouched for its root-only RAM file. The peer is pinned by a pidfd."""
    import socket as socket_module

    from migd.tools.qemu_peer import Peer

    path = short_dir / "listener.sock"
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
    )
    listener = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert listener.stdout is not None and listener.stdin is not None
    assert listener.stdout.readline() == "ready\n"
    client = socket_module.socket(socket_module.AF_UNIX)
    client.connect(str(path))
    try:
        alive = Peer(_Conn(client))
        assert alive.pid == listener.pid and alive.alive()
        pidfds = alive.pidfd is not None  # SO_PEERPIDFD: Linux 6.5
        alive.close()
        listener.stdin.write("\n")
        listener.stdin.flush()
        listener.wait(30)  # exited and reaped: its pid may be anyone's now
        gone = Peer(_Conn(client))
        assert gone.pid == listener.pid  # what SO_PEERCRED still says
        assert not gone.alive()
        # Told by the kernel (a pidfd of the exited listener, or ESRCH), not by /proc/PID,
        # which a process that got the pid number since would fill again.
        assert gone.exited or gone.pidfd is not None or not pidfds
        gone.close()
    finally:
        client.close()
        if listener.poll() is None:
            listener.kill()
            listener.wait()


def test_a_restore_that_failed_half_way_is_retried_with_accept_partial(
    daemon, fakes, short_dir, shm
):
    """A failed restore leaves the RAM file marked partial, and `migd vm restore` could
    not say it accepts that: every retry was refused (red-team, session 13)."""
    from migd.tools import vm_image

    from .conftest import parse_save

    image = _saved_image(daemon, fakes, short_dir, shm)
    good = image.read_bytes()
    with open(image, "rb") as f:
        header = vm_image.read_header(f.fileno(), str(image))
    block = parse_save(image, header.ram.offset).blocks[0]
    bad = bytearray(good)
    bad[block.pages_offset + 5 * MiB] ^= 0xFF  # a page of the RAM part's sixth MiB
    (short_dir / "bad.img").write_bytes(bytes(bad))
    fake = fakes({"memdevs": [memdev(shm / "ram")], "state": "inmigrate"}, name="incoming")
    failed = vm(daemon, fake, "restore", str(short_dir / "bad.img"))
    assert failed.returncode == 1 and "checksum mismatch" in failed.stderr
    # The files are passed to migd as fds: the errors name them, not /dev/fdset/N.
    assert f"'{short_dir / 'bad.img'}'" in failed.stderr
    assert "/dev/fdset/" not in failed.stderr
    again = vm(daemon, fake, "restore", str(image))
    assert again.returncode == 1
    assert "`migd vm restore --accept-partial` restores into it anyway" in again.stderr
    assert f"Memory file '{shm / 'ram'}' was left partial" in again.stderr
    assert f"restore of '{short_dir / 'bad.img'}' started" in again.stderr
    accepted = vm(daemon, fake, "restore", "--accept-partial", "--paused", str(image))
    assert accepted.returncode == 0, accepted.stderr
    assert daemon_backends(daemon) == []
