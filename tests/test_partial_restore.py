"""A restore that does not finish leaves a mark on the memory file, and object-add says so.

A real daemon is SIGKILLed in the middle of a restore (made slow with max-bandwidth; the
kill waits for query-migrate to show progress); after a restart, object-add of that
memory file is refused with an error naming the file and the interrupted restore, and
accepted with 'x-accept-partial'. A completed restore removes the mark. On ramfs (no
user xattrs) the mark is a sidecar file in migd's state directory.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migd.errors import MigrationError
from migd.state.partial import SIDECAR_DIR, XATTR, PartialMarks

from .conftest import RawClient, fill_random, start_daemon

MiB = 1 << 20
SIZE = 32 * MiB
SLOW = 4 * MiB  # bytes/s: the restore takes seconds, the kill lands long before its end


def _setup(client: RawClient, mem: Path, **extra: Any) -> None:
    add = {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE, "mem-path": str(mem)}
    client.ok("object-add", {**add, **extra})
    caps = [{"capability": "mapped-ram", "state": True}, {"capability": "multifd", "state": True}]
    client.ok("migrate-set-capabilities", {"capabilities": caps})


def _midway(info: dict[str, Any]) -> bool:
    """Pages are moving: the mark is set. Not `transferred` > 0 alone: it counts the main
    channel's metadata too, read before the mark is set (a restore is active by then)."""
    ram = info.get("ram", {})
    return (
        info.get("status") == "active"
        and ram.get("normal", 0) > 0
        and (ram.get("transferred", 0) < SIZE // 2)
    )


def _saved_then_changed(client: RawClient, mem: Path, save: Path) -> bytes:
    """Save the backend's memory to `save`, then give it other data; return the saved."""
    saved = mem.read_bytes()
    client.ok("migrate", {"uri": f"file:{save}"})
    assert client.wait_final()["status"] == "completed"
    with open(mem, "r+b") as f:  # in place: the mapping sees it
        f.write(bytes(b ^ 0x5A for b in saved[:MiB]) * (SIZE // MiB))
    return saved


def _start_slow_restore(client: RawClient, save: Path) -> None:
    client.ok("migrate-set-parameters", {"max-bandwidth": SLOW})
    client.ok("migrate-incoming", {"uri": f"file:{save}"})
    client.poll_migrate(_midway)


def _restore_under_way(client: RawClient, mem: Path, save: Path) -> bytes:
    """A backend on `mem`, saved to `save`, changed, and a slow restore of it under way
    (its mark set); returns the saved memory."""
    _setup(client, mem)
    saved = _saved_then_changed(client, mem, save)
    _start_slow_restore(client, save)
    return saved


def _restore_then_save(client: RawClient, save: Path, again: Path) -> None:
    """A restore of `save` that completes (clearing any mark), then a save to `again`."""
    client.ok("migrate-incoming", {"uri": f"file:{save}"})
    assert client.wait_final()["status"] == "completed"
    client.ok("migrate", {"uri": f"file:{again}"})
    assert client.wait_final()["status"] == "completed"


def _mark(mem: Path) -> str | None:
    try:
        return os.getxattr(mem, XATTR).decode()
    except OSError:
        return None


def test_a_restore_killed_midway_leaves_a_mark_that_object_add_reports(short_dir: Path, shm: Path):
    sock, mem, save = short_dir / "qmp.sock", shm / "ram0", short_dir / "save.img"
    fill_random(mem, SIZE, seed=12)
    daemon = start_daemon(sock)
    try:
        client = RawClient(sock).negotiate()
        saved = _restore_under_way(client, mem, save)
        daemon.stop(signal.SIGKILL)
        client.close()
    finally:
        daemon.stop(signal.SIGKILL)
    mark = _mark(mem)
    assert mark is not None and f"restore of '{save}'" in mark, mark
    assert mem.read_bytes() != saved  # the kill did land mid-way

    daemon = start_daemon(sock)
    try:
        client = RawClient(sock).negotiate()
        add = {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE, "mem-path": str(mem)}
        reply = client.execute("object-add", add)
        desc = reply["error"]["desc"]
        assert f"Memory file '{mem}'" in desc and "interrupted restore of" in desc, desc
        assert str(save) in desc and "x-accept-partial" in desc, desc
        assert client.ok("query-memdev") == []

        _setup(client, mem, **{"x-accept-partial": True})
        assert _mark(mem) == mark  # accepted, still partial until a restore completes
        client.ok("migrate-incoming", {"uri": f"file:{save}"})
        assert client.wait_final()["status"] == "completed"
        assert _mark(mem) is None and XATTR not in os.listxattr(mem)
        assert mem.read_bytes() == saved

        client.ok("object-del", {"id": "ram0"})
        client.ok("object-add", add)  # no mark: no argument needed
        client.close()
    finally:
        daemon.stop()


def _sidecars(marks: Path, mem: Path) -> list[Path]:
    st = mem.stat()
    return sorted(marks.glob(f"{st.st_dev}-{st.st_ino}.*"))


def test_on_ramfs_a_cancelled_restore_leaves_a_sidecar_mark(
    short_dir: Path, ramfs: Path, partial_marks_dir: Path
):
    sock, mem, save = short_dir / "qmp.sock", ramfs / "ram0", short_dir / "save.img"
    with pytest.raises(OSError):
        mem.touch()
        os.setxattr(mem, "user.probe", b"1")  # the case under test: no user xattrs
    fill_random(mem, SIZE, seed=13)
    assert not (short_dir / SIDECAR_DIR).exists()
    daemon = start_daemon(sock)
    try:
        client = RawClient(sock).negotiate()
        saved = _restore_under_way(client, mem, save)
        assert [p.name.rsplit(".", 1)[1] for p in _sidecars(partial_marks_dir, mem)] == ["0"]
        assert stat.S_IMODE(partial_marks_dir.stat().st_mode) == 0o1777
        client.ok("migrate_cancel")
        info = client.wait_final()
        assert info["status"] == "cancelled" and "hold partial data" in info["error-desc"]
        assert len(_sidecars(partial_marks_dir, mem)) == 1  # a cancelled restore keeps it

        client.ok("object-del", {"id": "ram0"})
        add = {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE, "mem-path": str(mem)}
        desc = client.execute("object-add", add)["error"]["desc"]
        assert f"Memory file '{mem}'" in desc and f"interrupted restore of '{save}'" in desc

        client.ok("object-add", {**add, "x-accept-partial": True})
        client.ok("migrate-set-parameters", {"max-bandwidth": 0})
        client.ok("migrate-incoming", {"uri": f"file:{save}"})
        assert client.wait_final()["status"] == "completed"
        assert _sidecars(partial_marks_dir, mem) == []
        assert mem.read_bytes() == saved
        client.close()
    finally:
        daemon.stop()
    assert not (short_dir / SIDECAR_DIR).exists()  # nothing beside the socket


@pytest.fixture
def memory_dir(request: pytest.FixtureRequest) -> Path:
    """The filesystem fixture named by the test's parameter (shm, ramfs), set up before
    the daemons that map files there (and so torn down after they stop)."""
    path: Path = request.getfixturevalue(request.param)
    return path


@pytest.fixture
def two_daemons(short_dir: Path) -> Iterator[tuple[RawClient, RawClient]]:
    """A client of each of two migd processes whose sockets are in different directories
    (so neither finds marks kept beside the other's socket), both stopped at the end."""
    (short_dir / "a").mkdir()
    (short_dir / "b").mkdir()
    first = start_daemon(short_dir / "a" / "q.sock")
    try:
        second = start_daemon(short_dir / "b" / "q.sock")
        try:
            a = RawClient(first.socket_path).negotiate()
            b = RawClient(second.socket_path).negotiate()
            yield a, b
            a.close()
            b.close()
        finally:
            second.stop()
    finally:
        first.stop()


def test_on_ramfs_a_daemon_sees_another_daemons_mark_whatever_its_socket_dir(
    short_dir: Path, ramfs: Path, two_daemons: tuple[RawClient, RawClient]
):
    """Two daemons with a backend on one ramfs file, their sockets in different
    directories: the first's restore into it is cancelled half-way. The second kept
    no xattr to read and looked for the sidecar beside its own socket only: it saved the
    mix of old and restored pages `completed` (red-team, session 18). Both keep their
    marks in one shared directory now: the save is refused, and so is object-add."""
    mem, save, again = ramfs / "ram0", short_dir / "save.img", short_dir / "again.img"
    fill_random(mem, SIZE, seed=14)
    a, b = two_daemons
    _setup(b, mem)
    _restore_under_way(a, mem, save)
    a.ok("migrate_cancel")
    assert a.wait_final()["status"] == "cancelled"

    _assert_save_refused(b, "migrate", {"uri": f"file:{again}"}, save, again)
    b.ok("object-del", {"id": "ram0"})
    add = {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE, "mem-path": str(mem)}
    desc = b.execute("object-add", add)["error"]["desc"]
    assert f"Memory file '{mem}'" in desc and f"interrupted restore of '{save}'" in desc


def _assert_save_refused(
    client: RawClient, command: str, arguments: dict[str, Any], save: Path, again: Path
) -> None:
    """A save of backend ram0 (`command` into `again`) refused as partial data from the
    interrupted restore of `save`, nothing written."""
    desc = client.execute(command, arguments)["error"]["desc"]
    assert desc.startswith("Memory backend 'ram0' holds partial data"), desc
    assert f"interrupted restore of '{save}'" in desc
    assert not again.exists()


def _refused_then_saved_once_accepted(
    client: RawClient, mem: Path, save: Path, again: Path
) -> None:
    """Backend ram0 on `mem`, left partial by a restore of `save`: `migrate` and
    `memory-save` of it are refused naming that restore, and write nothing; added again
    accepting the mix as it is (x-accept-partial, the client's choice), it is saved."""
    for command, arguments in [
        ("migrate", {"uri": f"file:{again}"}),
        ("memory-save", {"job-id": "s", "uri": f"file:{again}", "backends": ["ram0"]}),
    ]:
        _assert_save_refused(client, command, arguments, save, again)
    client.ok("object-del", {"id": "ram0"})
    add = {"qom-type": "memory-backend-file", "id": "ram0", "size": SIZE, "mem-path": str(mem)}
    client.ok("object-add", {**add, "x-accept-partial": True})
    client.ok("migrate", {"uri": f"file:{again}"})
    assert client.wait_final()["status"] == "completed"


@pytest.mark.parametrize("memory_dir", ["shm", "ramfs"], indirect=True)
def test_a_partial_file_one_daemon_accepted_is_not_saved_once_another_left_it_partial_again(
    short_dir: Path, memory_dir: Path, two_daemons: tuple[RawClient, RawClient]
):
    """Two daemons with a backend on one memory file. The first's restore into it is
    cancelled half-way; the second adds its backend accepting that mix (x-accept-partial).
    The first then restores into the file again, and that restore too is cancelled: a new
    mix of pages nobody accepted. The second's save of it completed, as whole (red-team,
    round 10b: the acceptance was a flag on the backend, not of the mark it accepted, and
    only the restoring daemon's own backend lost it). Refused now: a backend's
    acceptance holds for the mark it accepted only."""
    mem, save, again = memory_dir / "ram0", short_dir / "save.img", short_dir / "again.img"
    fill_random(mem, SIZE, seed=16)
    a, b = two_daemons
    _restore_under_way(a, mem, save)
    a.ok("migrate_cancel")
    assert a.wait_final()["status"] == "cancelled"
    _setup(b, mem, **{"x-accept-partial": True})  # this mix, as it is, is b's choice

    _start_slow_restore(a, save)
    a.ok("migrate_cancel")
    assert a.wait_final()["status"] == "cancelled"

    _refused_then_saved_once_accepted(b, mem, save, again)  # accepted again, this mix


def test_a_private_backend_on_a_file_another_daemon_left_partial_is_not_saved_as_whole(
    short_dir: Path, shm: Path, two_daemons: tuple[RawClient, RawClient]
):
    """A `share=false` backend of one daemon on a memory file another daemon's backend
    shares: the other's restore into the file is cancelled half-way. The private mapping
    shows the file's pages wherever it has not written its own, so it holds that mix too;
    its daemon looked only at its own in-daemon mark (a restore into private memory
    leaves none on the file) and saved the mix `completed` (red-team, round 10b). Its
    file's mark is read too now, until a restore into the private memory completes."""
    mem, save, again = shm / "ram0", short_dir / "save.img", short_dir / "again.img"
    fill_random(mem, SIZE, seed=17)
    a, b = two_daemons
    _setup(b, mem, share=False)
    _restore_under_way(a, mem, save)
    a.ok("migrate_cancel")
    assert a.wait_final()["status"] == "cancelled"

    _assert_save_refused(b, "migrate", {"uri": f"file:{again}"}, save, again)

    # A restore into the private memory, completed, makes every page its own: saved.
    b.ok("migrate-incoming", {"uri": f"file:{save}"})
    assert b.wait_final()["status"] == "completed"
    b.ok("migrate", {"uri": f"file:{again}"})
    assert b.wait_final()["status"] == "completed"


def test_a_configured_backend_on_a_partial_file_stops_the_start_unless_accepted(
    short_dir: Path, shm: Path
):
    """The configuration file's backends follow object-add's rule for partial files."""
    mem = shm / "mem"
    mem.write_bytes(bytes(SIZE))
    mem.chmod(0o600)
    os.setxattr(mem, XATTR, b"restore of '/x.sav' started 2026-12-02T00:00:00Z by migd pid 1")
    sock = short_dir / "qmp.sock"
    conf = short_dir / "migd.toml"
    backend = (
        f'[[memory-backend]]\nqom-type = "memory-backend-file"\nid = "ram0"\n'
        f'size = {SIZE}\nmem-path = "{mem}"\n'
    )
    conf.write_text(backend)
    result = subprocess.run(
        [sys.executable, "-m", "migd", "serve", "--config", str(conf), "--socket", str(sock)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert f"Cannot create memory backend 'ram0': Memory file '{mem}'" in result.stderr
    assert "interrupted restore of '/x.sav'" in result.stderr
    assert not sock.exists()

    conf.write_text(backend + "x-accept-partial = true\n")
    daemon = start_daemon(sock, "--config", str(conf))
    try:
        client = RawClient(sock).negotiate()
        assert [m["id"] for m in client.ok("query-memdev")] == ["ram0"]
        client.close()
    finally:
        daemon.stop()
    assert _mark(mem) is not None  # accepted as it is: the file is still partial


def test_a_backend_a_cancelled_restore_left_partial_is_not_saved_as_whole(
    short_dir: Path, shm: Path
):
    """A restore cancelled a third of the way leaves old and restored pages mixed: a save
    of that backend completed and `migd verify` passed it, a clean-looking file of memory
    no one had (red-team, session 15). Refused now, naming the interrupted restore, and
    nothing is written; a file the client accepted as it is (x-accept-partial) may be
    saved, and so may one a restore then completed into."""
    sock, save = short_dir / "qmp.sock", short_dir / "save.img"
    mem = shm / f"migd-partial-save-{os.getpid()}"
    fill_random(mem, SIZE, seed=21)
    daemon = start_daemon(sock)
    try:
        client = RawClient(sock).negotiate()
        saved = _restore_under_way(client, mem, save)
        client.ok("migrate_cancel")
        assert client.wait_final()["status"] == "cancelled"
        client.ok("migrate-set-parameters", {"max-bandwidth": 0})

        again = short_dir / "again.img"
        _refused_then_saved_once_accepted(client, mem, save, again)
        again.unlink()

        # A completed restore clears the mark: saved like any backend.
        _restore_then_save(client, save, again)
        assert mem.read_bytes() == saved
        client.close()
    finally:
        daemon.stop()
        mem.unlink(missing_ok=True)


@pytest.mark.parametrize("kind", ["memory-backend-ram", "share=false"])
def test_memory_with_no_file_to_mark_is_not_saved_half_restored_either(
    short_dir: Path, shm: Path, kind: str
):
    """Memory a restore writes with no file of its own to carry the mark (anonymous RAM,
    a private mapping of a file): a save after a cancelled restore completed with the mix
    (review, session 15). The daemon keeps the mark for it; a completed restore clears it."""
    sock, save, again = short_dir / "qmp.sock", short_dir / "save.img", short_dir / "again.img"
    mem, private = shm / f"migd-nomark-{os.getpid()}", shm / f"migd-nomark-p-{os.getpid()}"
    fill_random(mem, SIZE, seed=3)
    daemon = start_daemon(sock)
    try:
        client = RawClient(sock).negotiate()
        _setup(client, mem)
        client.ok("migrate", {"uri": f"file:{save}"})
        assert client.wait_final()["status"] == "completed"
        client.ok("object-del", {"id": "ram0"})
        add: dict[str, Any] = {"qom-type": "memory-backend-ram", "id": "ram0", "size": SIZE}
        if kind == "share=false":
            fill_random(private, SIZE, seed=4)
            add = {**add, "qom-type": "memory-backend-file", "mem-path": str(private),
                   "share": False}  # fmt: skip
        client.ok("object-add", add)
        _start_slow_restore(client, save)
        client.ok("migrate_cancel")
        assert client.wait_final()["status"] == "cancelled"
        client.ok("migrate-set-parameters", {"max-bandwidth": 0})

        desc = client.execute("migrate", {"uri": f"file:{again}"})["error"]["desc"]
        assert desc.startswith(
            f"Memory backend 'ram0' holds partial data, from an interrupted restore of '{save}'"
        ), desc
        assert not again.exists()
        _restore_then_save(client, save, again)
        client.close()
    finally:
        daemon.stop()
        mem.unlink(missing_ok=True)
        private.unlink(missing_ok=True)


# --- whose sidecar marks a daemon trusts (state/partial.py) ---------------------------------

OTHER_UID = 65534  # nobody
_CHILD_MARKS = """
import os, sys, types
from migd.state.partial import PartialMarks
os.setgid({uid}); os.setuid({uid})
fd = os.open(sys.argv[1], os.O_RDWR)
PartialMarks(None, sys.argv[2]).set(
    types.SimpleNamespace(id="ram0", fd=fd, file_name=sys.argv[1], partial_accepted=None),
    "restore of '/x.sav' by uid {uid}",
)
"""


def _backend(mem: Path) -> Any:
    fd = os.open(mem, os.O_RDWR)
    return types.SimpleNamespace(id="ram0", fd=fd, file_name=str(mem), partial_accepted=None)


def _marks_dir(short_dir: Path) -> Path:
    short_dir.chmod(0o755)  # reachable by OTHER_UID
    return short_dir / "run" / "partial-restores"


def test_a_non_root_daemons_mark_is_seen_by_roots_and_squats_are_not_marks(
    short_dir: Path, ramfs: Path
):
    """The shared directory is root's, sticky and world-writable: a migd of another uid
    marks there under its own uid (DEV-INO.UID), and root's migd trusts that for a file of
    that uid. An entry under root's name (or the owner's) that another uid made is not a
    mark: root's migd writes its own over it."""
    marks, mem = _marks_dir(short_dir), ramfs / "m"
    mem.write_bytes(bytes(4096))
    ramfs.chmod(0o755)
    ours = PartialMarks(None, str(marks))
    backend = _backend(mem)
    try:
        ours.set(backend, "restore of '/a.sav' by root")  # makes run/ and partial-restores/
        assert stat.S_IMODE(marks.stat().st_mode) == 0o1777 and marks.stat().st_uid == 0
        ours.clear(backend)
        marks.chmod(0o700)  # as an older root migd with its socket beside it made it
        ours.set(backend, "restore of '/a.sav' by root")  # opens it to the others
        assert stat.S_IMODE(marks.stat().st_mode) == 0o1777 and marks.stat().st_uid == 0
        ours.clear(backend)
        assert list(marks.iterdir()) == []

        os.chown(mem, OTHER_UID, OTHER_UID)
        child = _CHILD_MARKS.format(uid=OTHER_UID)
        subprocess.run([sys.executable, "-c", child, str(mem), str(marks)], check=True)
        assert ours.read(backend) == f"restore of '/x.sav' by uid {OTHER_UID}"
        ours.clear(backend)  # a completed restore by root's migd removes it
        assert ours.read(backend) is None and list(marks.iterdir()) == []

        os.chown(mem, 0, 0)
        st = mem.stat()
        squat = marks / f"{st.st_dev}-{st.st_ino}.0"
        squat.write_text("restore of '/forged.sav'\n")
        os.chown(squat, OTHER_UID, OTHER_UID)
        assert ours.read(backend) is None  # not root's: forged
        ours.set(backend, "restore of '/b.sav' by root")
        assert squat.stat().st_uid == 0 and ours.read(backend) == "restore of '/b.sav' by root"
    finally:
        os.close(backend.fd)


@pytest.mark.parametrize("problem", ["owner", "mode"])
def test_a_shared_marks_directory_another_user_could_change_is_refused(
    short_dir: Path, ramfs: Path, problem: str
):
    marks, mem = _marks_dir(short_dir), ramfs / "m"
    marks.mkdir(parents=True)
    if problem == "owner":
        os.chown(marks, OTHER_UID, OTHER_UID)
        expected = f"is owned by uid {OTHER_UID}, not root or migd's (0)"
    else:
        marks.chmod(0o777)
        expected = "is writable by group or others and not sticky (mode 0777)"
    mem.write_bytes(bytes(4096))
    backend = _backend(mem)
    try:
        with pytest.raises(MigrationError) as refused:
            PartialMarks(None, str(marks)).set(backend, "restore of '/a.sav'")
        assert f"'{marks}' {expected}" in str(refused.value)
    finally:
        os.close(backend.fd)
