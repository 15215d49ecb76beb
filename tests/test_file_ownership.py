"""Files another local user planted are never used; files migd creates are 0600.

Item 13 of issue 12: an existing save file, restore file or mem-path must be owned by
migd's uid or the client's (SO_PEERCRED), writable by nobody else, with one link; fd-
passed files are exempt. Item 16 (first part): `file:DIR/new/` is refused, not made a
file `new`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from migd.api.memory import create_backend
from migd.app.config import BackendConfig
from migd.errors import MigdError
from migd.state.paths import PathPolicy

from .conftest import (
    DaemonProcess,
    InProcessDaemon,
    RawClient,
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    qmp_error,
    save,
    start_daemon,
    wait_for_socket,
)

MiB = 1 << 20
OTHER_UID = 65534  # nobody


def _state(path: Path) -> tuple[Any, ...]:
    st = path.stat()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return st.st_uid, st.st_mode, st.st_nlink, st.st_size, st.st_mtime_ns, digest


def _other_owner(path: Path) -> str:
    os.chown(path, OTHER_UID, OTHER_UID)
    return (
        f"'{path}' is owned by uid {OTHER_UID}: migd uses an existing file only if it "
        f"belongs to migd's or the client's uid ({os.geteuid()})"
    )


def _world_writable(path: Path) -> str:
    path.chmod(0o666)
    return (
        f"'{path}' is writable by group or others (mode 0666): migd uses an existing file "
        "only if no other user can write it"
    )


def _group_writable(path: Path) -> str:
    path.chmod(0o620)
    return (
        f"'{path}' is writable by group or others (mode 0620): migd uses an existing file "
        "only if no other user can write it"
    )


def _hard_linked(path: Path) -> str:
    os.link(path, path.with_name(path.name + ".link"))
    return (
        f"'{path}' has 2 hard links: migd uses an existing file only if it has exactly one"
    )


PLANTS: dict[str, Callable[[Path], str]] = {
    "other-owner": _other_owner,
    "world-writable": _world_writable,
    "group-writable": _group_writable,
    "hard-link": _hard_linked,
}


@pytest.fixture
async def ready(qmp, shm):
    fill_random(shm / "ram0", MiB)
    await add_file_backend(qmp, "ram0", shm / "ram0", MiB)
    await enable_mapped_ram(qmp)
    return qmp


@pytest.mark.parametrize("plant", PLANTS)
async def test_a_planted_save_target_is_refused_and_unchanged(ready, shm, short_dir, plant):
    target = short_dir / "vm.sav"
    target.write_bytes(b"planted")
    target.chmod(0o600)
    expected = PLANTS[plant](target)
    before, memory = _state(target), _state(shm / "ram0")
    assert await qmp_error(ready, "migrate", {"uri": f"file:{target}"}) == expected
    assert _state(target) == before and _state(shm / "ram0") == memory
    assert await ready.execute("query-migrate") == {}


@pytest.mark.parametrize("plant", PLANTS)
async def test_a_planted_restore_file_is_refused_and_memory_unchanged(
    ready, shm, short_dir, plant
):
    target = short_dir / "vm.sav"
    assert (await save(ready, target))["status"] == "completed"
    fill_random(shm / "ram0", MiB, seed=2)
    expected = PLANTS[plant](target)
    before, memory = _state(target), _state(shm / "ram0")
    assert await qmp_error(ready, "migrate-incoming", {"uri": f"file:{target}"}) == expected
    assert _state(target) == before and _state(shm / "ram0") == memory


@pytest.mark.parametrize("plant", PLANTS)
async def test_a_planted_mem_path_is_refused_and_unchanged(qmp, shm, plant):
    path = shm / "ram1"
    fill_random(path, MiB)
    path.chmod(0o600)
    expected = PLANTS[plant](path)
    before = _state(path)
    arguments = {
        "qom-type": "memory-backend-file",
        "id": "ram1",
        "size": MiB,
        "mem-path": str(path),
    }
    assert await qmp_error(qmp, "object-add", arguments) == expected
    assert _state(path) == before
    assert await qmp.execute("query-memdev") == []


@pytest.mark.parametrize("plant", ["other-owner", "hard-link"])
def test_a_planted_mem_path_of_the_configuration_is_refused(shm, plant):
    path = shm / "ram0"
    fill_random(path, MiB)
    path.chmod(0o600)
    expected = PLANTS[plant](path)
    before = _state(path)
    spec = BackendConfig(qom_type="memory-backend-file", id="ram0", size=MiB, mem_path=str(path))
    with pytest.raises(MigdError) as refused:
        create_backend(spec, PathPolicy())
    assert refused.value.desc == expected
    assert _state(path) == before


async def test_files_migd_creates_are_0600_whatever_the_umask(ready, shm, short_dir):
    old = os.umask(0)
    try:
        assert (await save(ready, short_dir / "vm.sav"))["status"] == "completed"
        await add_file_backend(ready, "ram1", shm / "new", MiB)
    finally:
        os.umask(old)
    assert (short_dir / "vm.sav").stat().st_mode & 0o777 == 0o600
    assert (shm / "new").stat().st_mode & 0o777 == 0o600


async def test_an_fd_passed_file_is_exempt(qmp, shm):
    path = shm / "theirs"
    path.write_bytes(b"")
    os.chown(path, OTHER_UID, OTHER_UID)
    path.chmod(0o666)
    fd = os.open(path, os.O_RDWR)
    qmp.send_fd_scm(fd)
    os.close(fd)
    await qmp.execute("add-fd", {"fdset-id": 7})
    await add_file_backend(qmp, "ram0", "/dev/fdset/7", MiB)
    assert [b["id"] for b in await qmp.execute("query-memdev")] == ["ram0"]


# -- the client's own files: SO_PEERCRED ---------------------------------------------------


def _connect_as(uid: int, path: Path) -> RawClient:
    """A client whose peer credentials are uid's: SO_PEERCRED records them at connect."""
    os.seteuid(uid)
    try:
        return RawClient(path).negotiate()
    finally:
        os.seteuid(0)


def test_a_file_of_the_clients_own_uid_is_accepted_and_anothers_is_not(open_daemon, shm):
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    mine, theirs = shm / "mine", shm / "theirs"
    for path, uid in ((mine, OTHER_UID), (theirs, 1234)):
        path.write_bytes(b"")
        path.chmod(0o600)
        os.chown(path, uid, uid)
    client = _connect_as(OTHER_UID, open_daemon.socket_path)
    try:
        add = {"qom-type": "memory-backend-file", "size": MiB}
        assert client.execute("object-add", {**add, "id": "a", "mem-path": str(mine)}) == {
            "return": {}
        }
        reply = client.execute("object-add", {**add, "id": "b", "mem-path": str(theirs)})
        assert reply["error"]["desc"] == (
            f"'{theirs}' is owned by uid 1234: migd uses an existing file only if it "
            f"belongs to the client's uid ({OTHER_UID}); files of migd's uid serve only its "
            "own and root's clients (they may be another VM's)"
        )
    finally:
        client.close()
    assert theirs.stat().st_size == 0


def test_a_client_of_another_uid_cannot_reach_another_instances_memory(open_daemon, shm):
    """Every migd instance runs as root, so every memory file one creates is root's: a
    client another VM's instance let in named such a file (another VM's RAM in
    /dev/shm) and saved its guest RAM into a file of its own (red-team, session 14). A
    client of another uid now uses only its own files; the ones migd creates for it are
    given to it, so it can use them again."""
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    other_vm = shm / "other-vm-ram"
    fill_random(other_vm, MiB)  # root's, 0600: what another instance's backend leaves
    before = other_vm.read_bytes()
    add = {"qom-type": "memory-backend-file", "size": MiB}
    client = _connect_as(OTHER_UID, open_daemon.socket_path)
    try:
        reply = client.execute("object-add", {**add, "id": "a", "mem-path": str(other_vm)})
        assert "is owned by uid 0" in reply["error"]["desc"], reply
        assert "they may be another VM's" in reply["error"]["desc"]
        # A file migd makes for this client is the client's, and may be used again.
        mine = shm / "made-for-nobody"
        assert client.execute("object-add", {**add, "id": "b", "mem-path": str(mine)}) == {
            "return": {}
        }
        assert mine.stat().st_uid == OTHER_UID and stat.S_IMODE(mine.stat().st_mode) == 0o600
        assert client.execute("object-del", {"id": "b"}) == {"return": {}}
        assert client.execute("object-add", {**add, "id": "b", "mem-path": str(mine)}) == {
            "return": {}
        }
    finally:
        client.close()
    assert other_vm.read_bytes() == before
    root_client = _connect_as(0, open_daemon.socket_path)
    try:  # root's clients keep using migd's files, as before
        reply = root_client.execute("object-add", {**add, "id": "c", "mem-path": str(other_vm)})
        assert reply == {"return": {}}, reply
    finally:
        root_client.close()


def test_without_cap_chown_a_new_file_for_another_uid_is_refused_and_not_kept(short_dir, shm):
    """The shipped unit gives migd no capabilities (CapabilityBoundingSet= empty), so its
    fchown of a file it made for a client of another uid failed: the file stayed root's,
    a warning was logged, and the client's next object-add (or restore) of it was refused
    as root's, the file stuck in /dev/shm where that client cannot remove it (red-team,
    round 10c). The request is refused now, naming CAP_CHOWN, and the file removed;
    root's clients still create files."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run migd as a root without capabilities")
    short_dir.chmod(0o711)
    sock = short_dir / "qmp.sock"
    proc = subprocess.Popen(
        ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--",
         sys.executable, "-m", "migd", "serve", "--socket", str(sock), "--socket-mode", "0666"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    d = DaemonProcess(sock, proc)
    try:
        wait_for_socket(sock, proc, 15)
        add = {"qom-type": "memory-backend-file", "size": MiB}
        client = _connect_as(OTHER_UID, sock)
        try:
            reply = client.execute("object-add", {**add, "id": "b", "mem-path": f"{shm}/new"})
        finally:
            client.close()
        assert "error" in reply, reply
        desc = reply["error"]["desc"]
        assert f"cannot give the new file '{shm}/new' to uid {OTHER_UID}" in desc, desc
        assert "migd needs CAP_CHOWN" in desc and "the file was not kept" in desc
        assert not (shm / "new").exists()
        root_client = _connect_as(0, sock)
        try:
            reply = root_client.execute("object-add", {**add, "id": "r", "mem-path": f"{shm}/r"})
            assert reply == {"return": {}}, reply
        finally:
            root_client.close()
    finally:
        assert d.stop() == 0


# -- item 16: a trailing slash names a directory -------------------------------------------


@pytest.fixture
async def confined(short_dir: Path, shm: Path):
    d = InProcessDaemon(short_dir / "qmp.sock", allowed_dirs=[str(short_dir), str(shm)])
    await d.start()
    client = await d.client()
    yield client
    await client.disconnect()
    await d.stop()


async def _refuses_trailing_slashes(client: Any, short_dir: Path, shm: Path) -> None:
    fill_random(shm / "ram0", MiB)
    await add_file_backend(client, "ram0", shm / "ram0", MiB)
    await enable_mapped_ram(client)
    for command, arguments, name in [
        ("migrate", {"uri": f"file:{short_dir}/new/"}, f"{short_dir}/new/"),
        ("migrate-incoming", {"uri": f"file:{short_dir}/new/"}, f"{short_dir}/new/"),
        (
            "object-add",
            {"qom-type": "memory-backend-file", "id": "m", "size": MiB, "mem-path": f"{shm}/m/"},
            f"{shm}/m/",
        ),
    ]:
        text = await qmp_error(client, command, arguments)
        assert text == f"'{name}' ends with '/': it names a directory, not a file"
    assert not (short_dir / "new").exists() and not (shm / "m").exists()


async def test_a_file_name_with_a_trailing_slash_is_refused_and_creates_nothing(
    qmp, short_dir, shm
):
    await _refuses_trailing_slashes(qmp, short_dir, shm)


async def test_with_allowed_dirs_a_trailing_slash_is_refused_too(confined, short_dir, shm):
    # abspath() drops the slash: before, the confined open made a file `new`.
    await _refuses_trailing_slashes(confined, short_dir, shm)


# --- links and directories another user controls (red-team, session 12) ---------------


@pytest.fixture
def public(short_dir: Path) -> Path:
    """A sticky, world-writable directory, as /tmp and /dev/shm."""
    path = short_dir / "pub"
    path.mkdir()
    path.chmod(0o1777)
    return path


def _victim(short_dir: Path) -> Path:
    victim = short_dir / "victim.conf"
    victim.write_bytes(b"precious root-owned content\n")
    victim.chmod(0o644)
    return victim


@pytest.mark.parametrize("use", ["save", "restore", "mem-path"])
async def test_a_link_another_user_planted_is_not_followed(ready, short_dir, public, use):
    """Another user's link to a file of root's: root would write guest RAM into it (or
    map it as RAM), a file that user could not write himself."""
    victim = _victim(short_dir)
    link = public / "vm.sav"
    link.symlink_to(victim)
    os.lchown(link, OTHER_UID, OTHER_UID)
    before = _state(victim)
    expected = (
        f"'{link}' is a symbolic link owned by uid {OTHER_UID}: migd follows only links of "
        f"migd's or the client's uid ({os.geteuid()})"
    )
    if use == "save":
        assert await qmp_error(ready, "migrate", {"uri": f"file:{link}"}) == expected
    elif use == "restore":
        assert await qmp_error(ready, "migrate-incoming", {"uri": f"file:{link}"}) == expected
    else:
        arguments = {"qom-type": "memory-backend-file", "id": "m", "size": 4096,
                     "mem-path": str(link)}  # fmt: skip
        assert await qmp_error(ready, "object-add", arguments) == expected
    assert _state(victim) == before


async def test_a_directory_link_another_user_planted_is_not_followed(ready, short_dir, public):
    (short_dir / "real").mkdir()
    link = public / "dir"
    link.symlink_to(short_dir / "real")
    os.lchown(link, OTHER_UID, OTHER_UID)
    target = link / "vm.sav"
    assert await qmp_error(ready, "migrate", {"uri": f"file:{target}"}) == (
        f"'{target}' goes through '{link}', a symbolic link owned by uid {OTHER_UID}: migd "
        f"follows only links of migd's or the client's uid ({os.geteuid()})"
    )
    assert list((short_dir / "real").iterdir()) == []


async def test_a_link_of_migds_own_uid_is_followed(ready, short_dir, public):
    real = short_dir / "real.sav"
    link = public / "vm.sav"
    link.symlink_to(real)
    assert (await save(ready, link))["status"] == "completed"
    assert real.stat().st_size > MiB and link.is_symlink()


async def test_a_link_swapped_in_after_the_walk_is_not_followed(
    ready, short_dir, monkeypatch
):
    """The walk checks every link on the way, but whoever owns the directory (a client's
    own, for a client of its uid) can still put a link at the last component before the
    open: the open itself must not follow it (O_NOFOLLOW), or root opens whatever the link
    names (a device, whose open alone can act, or a file of root's)."""
    from migd.state import paths

    victim = short_dir / "victim.sav"
    victim.write_bytes(b"root's own file\n")
    victim.chmod(0o600)
    target = short_dir / "vm.sav"
    walk = paths.resolve_trusted

    def walk_then_swap(path: str, owners: Any) -> Any:
        found = walk(path, owners)
        if path == str(target):
            target.symlink_to(victim)  # after the walk, before the open
        return found

    monkeypatch.setattr(paths, "resolve_trusted", walk_then_swap)
    before = _state(victim)
    text = await qmp_error(ready, "migrate", {"uri": f"file:{target}"})
    assert text == f"'{target}' changed into a symbolic link while migd opened it"
    assert _state(victim) == before and target.is_symlink()
    assert await ready.execute("query-migrate") == {}


@pytest.mark.parametrize(
    "how",
    [
        "owned by another user",
        "writable by others, not sticky",
        "writable by its group, not sticky",
    ],
)
async def test_a_directory_another_user_can_change_is_refused(ready, short_dir, how):
    """Its owner (or anyone, without the sticky bit) could swap the file for a link
    between migd's checks and its open. A directory of root's that another group may
    write (0770, group nobody) is as open to that group's members as 0777 is to all."""
    theirs = short_dir / "theirs"
    theirs.mkdir()
    if how == "owned by another user":
        os.chown(theirs, OTHER_UID, OTHER_UID)
        problem = (
            f"owned by uid {OTHER_UID}: migd opens files only through directories of migd's "
            f"or the client's uid ({os.geteuid()})"
        )
    else:
        mode = 0o777 if how == "writable by others, not sticky" else 0o770
        os.chown(theirs, -1, OTHER_UID)
        theirs.chmod(mode)
        problem = (
            f"writable by group or others without the sticky bit (mode {mode:04o}): another "
            "user could swap the file"
        )
    target = theirs / "vm.sav"
    text = await qmp_error(ready, "migrate", {"uri": f"file:{target}"})
    assert text == f"'{target}' lies in '{theirs}', {problem}"
    assert not target.exists()


def test_a_socket_directory_another_user_owns_is_refused(short_dir):
    """That user could replace the socket with a listener of his own, and migd keeps its
    partial-restore marks beside it."""
    theirs = short_dir / "theirs"
    theirs.mkdir()
    os.chown(theirs, OTHER_UID, OTHER_UID)
    sock = theirs / "qmp.sock"
    result = subprocess.run(
        [sys.executable, "-m", "migd", "serve", "--socket", str(sock)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"Cannot listen on '{sock}': '{sock}' lies in '{theirs}', owned by uid {OTHER_UID}" in (
        result.stderr
    )
    assert not sock.exists()


def _serve(sock: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migd", "serve", "--socket", str(sock)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_socket_path_through_another_users_link_or_directory_is_refused(short_dir):
    """Red-team, session 13: only the last directory was checked, through its links. A
    link of another user's in a sticky directory (the README's /tmp/migd/qmp.sock
    pattern), or a directory of theirs higher up, let them swap the socket's directory
    for their own after migd started: root's `migd vm save` then handed their listener
    the guest's RAM file, read-write."""
    sticky = short_dir / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    ours = short_dir / "ours"
    ours.mkdir(mode=0o755)
    link = sticky / "migd"
    link.symlink_to(ours)
    os.lchown(link, OTHER_UID, OTHER_UID)
    result = _serve(link / "qmp.sock")
    assert result.returncode != 0
    assert f"'{link / 'qmp.sock'}' goes through '{link}', a symbolic link owned by uid " in (
        result.stderr
    )
    assert not (ours / "qmp.sock").exists()
    theirs = short_dir / "theirs"
    theirs.mkdir()
    (theirs / "run").mkdir(mode=0o755)
    os.chown(theirs, OTHER_UID, OTHER_UID)  # a directory of theirs above root's
    result = _serve(theirs / "run" / "qmp.sock")
    assert result.returncode != 0
    assert f"lies in '{theirs}', owned by uid {OTHER_UID}" in result.stderr


def test_a_socket_directly_in_a_sticky_shared_directory_is_refused(short_dir):
    """Others cannot rename migd's socket there, but they can squat the names migd keeps
    beside it (partial-restores/: every ramfs backend was then refused)."""
    shared = short_dir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    result = _serve(shared / "qmp.sock")
    assert result.returncode != 0
    assert (
        f"its directory '{shared}' is writable by group or others (mode 1777): another user "
        "could replace the socket or squat the names migd keeps beside it"
    ) in result.stderr


def test_a_socket_directory_its_group_may_write_is_refused_sticky_or_not(short_dir):
    """A directory of root's that another group may write (1770, group nobody) is as open
    to that group's members as 1777 is to everyone: they could squat the names migd keeps
    beside the socket. The walk lets a sticky directory pass on the way; the socket's own
    directory must be writable by its owner alone."""
    shared = short_dir / "shared"
    shared.mkdir()
    os.chown(shared, -1, OTHER_UID)
    shared.chmod(0o1770)
    with pytest.raises(RuntimeError) as refused:  # start_daemon: migd exited, or it listens
        start_daemon(shared / "qmp.sock").stop()
    assert (
        f"its directory '{shared}' is writable by group or others (mode 1770): another user "
        "could replace the socket or squat the names migd keeps beside it"
    ) in str(refused.value)
    assert not (shared / "qmp.sock").exists()


def test_the_client_refuses_a_socket_served_by_another_user(short_dir):
    """A listener of another user's in migd's place would be handed the memory fds the
    client passes: the client checks who serves the socket before it sends anything."""
    short_dir.chmod(0o755)  # mkdtemp's 0700: the other user must reach its directory
    shared = short_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    sock, config, log = shared / "impostor.sock", shared / "cfg.json", shared / "log"
    config.write_text("{}")
    config.chmod(0o644)
    fake = shared / "fake_qemu.py"  # a copy the other user can read, wherever the tree is
    shutil.copyfile(Path(__file__).with_name("fake_qemu.py"), fake)
    fake.chmod(0o644)
    impostor = subprocess.Popen(
        ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
         sys.executable, str(fake), str(sock), str(config), str(log)]
    )  # fmt: skip
    try:
        poll_until_exists(sock, impostor)
        result = subprocess.run(
            [sys.executable, "-m", "migd", "status", "--socket", str(sock)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2
        served = f"{sock} is served by uid {OTHER_UID} (pid {impostor.pid}), neither root nor you"
        assert served in result.stderr
        # Only the negotiation qemu.qmp does as it connects: no command, no fd.
        assert log.read_text().splitlines() == ["<- qmp_capabilities"]
    finally:
        impostor.kill()
        impostor.wait()


def poll_until_exists(path: Path, proc: subprocess.Popen[bytes]) -> None:
    import time

    deadline = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the listener never came"
        time.sleep(0.01)


@pytest.mark.parametrize("mode", [0o644, 0o640], ids=["by-others", "by-its-group"])
async def test_an_existing_save_file_readable_by_others_is_refused(ready, short_dir, mode):
    """A file of migd's (or the client's) uid, but guest RAM saved into it at 0644 would
    be any local user's to read, and a chmod first (what migd did until session 13) does
    not stop a reader that opened the file before: one held it open and read the save.
    At 0640 it would be every member of the file's group's to read: refused as well."""
    target = short_dir / "vm.sav"
    target.write_bytes(b"old")
    target.chmod(mode)
    reader = open(target, "rb")  # noqa: SIM115 (another user's fd, opened while readable)
    try:
        text = await qmp_error(ready, "migrate", {"uri": f"file:{target}"})
        assert text == (
            f"'{target}' may be read or written by group or others (mode {mode:04o}): a save "
            "would put guest RAM where they can read it, and a chmod would not stop a reader "
            "that opened it before; remove the file (migd creates it 0600) or save to another "
            "name"
        )
        assert reader.read() == b"old" and target.read_bytes() == b"old"
    finally:
        reader.close()
    target.unlink()
    assert (await save(ready, target))["status"] == "completed"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
