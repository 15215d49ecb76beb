"""With allowed-dirs set, a client cannot make migd open files anywhere else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from migd.state import paths as paths_module
from migd.state.paths import PathNotAllowed, PathPolicy

from .conftest import (
    InProcessDaemon,
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    qmp_error,
    save,
)

MiB = 1 << 20


@pytest.fixture
def tree(short_dir: Path, shm: Path) -> dict[str, Path]:
    allowed, outside = short_dir / "allowed", short_dir / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    return {"allowed": allowed, "outside": outside, "shm": shm}


@pytest.fixture
async def confined(short_dir: Path, tree: dict[str, Path]):
    d = InProcessDaemon(
        short_dir / "qmp.sock", allowed_dirs=[str(tree["allowed"]), str(tree["shm"])]
    )
    await d.start()
    client = await d.client()
    yield client
    await client.disconnect()
    await d.stop()


async def _ready(client, shm: Path) -> None:
    fill_random(shm / "ram0", MiB)
    await add_file_backend(client, "ram0", shm / "ram0", MiB)
    await enable_mapped_ram(client)


async def test_save_inside_an_allowed_directory_works(confined, tree):
    await _ready(confined, tree["shm"])
    assert (await save(confined, tree["allowed"] / "vm.sav"))["status"] == "completed"


async def test_save_outside_the_allowed_directories_is_refused_and_creates_nothing(confined, tree):
    await _ready(confined, tree["shm"])
    target = tree["outside"] / "vm.sav"
    text = await qmp_error(confined, "migrate", {"uri": f"file:{target}"})
    assert text.startswith(f"'{target}' is outside the allowed directories (")
    assert not target.exists()
    assert await confined.execute("query-migrate") == {}


async def test_dotdot_cannot_climb_out(confined, tree):
    await _ready(confined, tree["shm"])
    target = f"{tree['allowed']}/../outside/vm.sav"
    assert "outside the allowed directories" in await qmp_error(
        confined, "migrate", {"uri": f"file:{target}"}
    )
    assert not (tree["outside"] / "vm.sav").exists()


async def test_a_symlink_as_the_file_is_refused_and_its_target_untouched(confined, tree):
    await _ready(confined, tree["shm"])
    link = tree["allowed"] / "vm.sav"
    link.symlink_to(tree["outside"] / "precious")
    text = await qmp_error(confined, "migrate", {"uri": f"file:{link}"})
    assert "outside the allowed directories" in text or "symbolic link" in text
    assert (tree["outside"] / "precious").read_bytes() == b"keep me"


async def test_a_symlinked_directory_leading_out_is_refused(confined, tree):
    await _ready(confined, tree["shm"])
    (tree["allowed"] / "sub").symlink_to(tree["outside"])
    target = tree["allowed"] / "sub" / "vm.sav"
    assert "outside the allowed directories" in await qmp_error(
        confined, "migrate", {"uri": f"file:{target}"}
    )
    assert not (tree["outside"] / "vm.sav").exists()


async def test_a_symlink_inside_pointing_inside_is_still_refused_as_a_symlink(confined, tree):
    await _ready(confined, tree["shm"])
    real = tree["allowed"] / "real.sav"
    real.write_bytes(b"")
    (tree["allowed"] / "alias.sav").symlink_to(real)
    text = await qmp_error(confined, "migrate", {"uri": f"file:{tree['allowed']}/alias.sav"})
    assert "is a symbolic link" in text


async def test_mem_path_outside_is_refused_and_creates_nothing(confined, tree):
    target = tree["outside"] / "ram"
    with pytest.raises(ExecuteError) as info:
        await add_file_backend(confined, "ram0", target, MiB)
    assert "outside the allowed directories" in info.value.error.error.desc
    assert not target.exists()
    assert await confined.execute("query-memdev") == []


async def test_restore_from_outside_is_refused(confined, tree):
    await _ready(confined, tree["shm"])
    text = await qmp_error(
        confined, "migrate-incoming", {"uri": f"file:{tree['outside']}/precious"}
    )
    assert "outside the allowed directories" in text


def test_a_directory_swapped_for_a_symlink_after_the_check_is_caught(tree, monkeypatch):
    """The race the dir-fd check exists for: realpath() sees a real directory, then an
    attacker replaces it with a symlink leading out before the open."""
    allowed, outside = tree["allowed"], tree["outside"]
    sub = allowed / "sub"
    sub.mkdir()
    real_realpath = os.path.realpath

    def realpath_then_swap(path, *args, **kwargs):
        result = real_realpath(path, *args, **kwargs)
        if result == str(sub) and sub.is_dir() and not sub.is_symlink():
            sub.rmdir()
            sub.symlink_to(outside)
        return result

    monkeypatch.setattr(paths_module.os.path, "realpath", realpath_then_swap)
    policy = PathPolicy([str(allowed)])
    with pytest.raises(PathNotAllowed):
        policy.open(str(sub / "vm.sav"), os.O_WRONLY | os.O_CREAT)
    assert not (outside / "vm.sav").exists()


def test_no_allowed_dirs_means_no_restriction(tree):
    fd = PathPolicy([]).open(str(tree["outside"] / "free"), os.O_WRONLY | os.O_CREAT)
    os.close(fd)
    assert (tree["outside"] / "free").exists()
