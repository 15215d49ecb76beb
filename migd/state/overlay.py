"""Which file a name or fd is, through overlayfs: its layer's file.

Through an overlayfs mount a file has the overlay's device, though it is the file of its
upper (or a lower) layer, which the layer's own name reaches with that layer's device.
migd tells two names of one file apart by (st_dev, st_ino) (two backends on one file, a
save into a backend's memory file, two jobs on one file) and keeps other migd processes'
jobs off a file by OFD locks, which are per inode: both looked past each other between
the overlay's name and the layer's (red-team, round 10b). This module finds the layer's
file (from /proc/self/mountinfo) so that identities and locks are taken there.
"""

from __future__ import annotations

import ctypes
import os
import re
import stat

_libc = ctypes.CDLL(None, use_errno=True)

_OVERLAYFS_MAGIC = 0x794C7630
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo's escapes of space, tab, '\\', ','


def file_identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of fd's file, by which migd tells two names of one file: two
    backends on it, a save into a backend's memory file, a job on another job's file.

    Through an overlayfs mount a file has the overlay's device, though it is the file of
    its upper (or a lower) layer, which the layer's own name reaches with that layer's
    device: the two were taken for two files (red-team, round 10b: a second backend on a
    backend's file was added through the overlay, and a restore into it overwrote the
    other's memory). A file on overlayfs is known by its layer's file where that is
    found. Blocking: an fstat (FUSE, NFS ask their server)."""
    st = os.fstat(fd)
    if fs_type(fd) == _OVERLAYFS_MAGIC:
        layer = _overlay_layer_file(fd, st)
        if layer is not None:
            return layer[1].st_dev, layer[1].st_ino
    return st.st_dev, st.st_ino


def on_overlayfs(fd: int) -> bool:
    return fs_type(fd) == _OVERLAYFS_MAGIC


def layer_file(fd: int, flags: int) -> int | None:
    """fd's file on overlayfs opened with `flags` through its layer's name (as
    reopen_for_locks); None if fd is not on overlayfs or its layer's file is not found."""
    if not on_overlayfs(fd):
        return None
    layer = _overlay_layer_file(fd, os.fstat(fd))
    return None if layer is None else _open_checked(layer[0], layer[1], flags)


def _open_checked(name: str, expected: os.stat_result, flags: int) -> int | None:
    """`name` opened with `flags` if it is the regular file `expected` (lstat) still."""
    try:
        pinned = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(pinned)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (
            expected.st_dev,
            expected.st_ino,
        ):
            return None
        return os.open(f"/proc/self/fd/{pinned}", flags | os.O_CLOEXEC)
    except OSError:
        return None
    finally:
        os.close(pinned)


def fs_type(fd: int) -> int | None:
    """The f_type of fd's filesystem (fstatfs; os.fstatvfs lacks it)."""
    buf = ctypes.create_string_buffer(256)  # larger than struct statfs on any arch
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return _f_type(buf)


def fs_type_at(path: str) -> int | None:
    """The f_type of the filesystem `path` lies on (statfs, links followed), or None if
    it cannot be had (no such name: the open that follows says what is wrong)."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return _f_type(buf)


def _f_type(buf: ctypes.Array[ctypes.c_char]) -> int:
    """struct statfs's first field, f_type (a long; its magic numbers fit 32 bits)."""
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def _unescape(text: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def _overlay_layer_file(fd: int, st: os.stat_result) -> tuple[str, os.stat_result] | None:
    """The name and lstat of what the layer holding fd's overlayfs file has at its name:
    the overlay mount with fd's device that its name lies under (/proc/self/mountinfo),
    then its layers, upper first, as overlayfs looks them up. None where it cannot be
    told (a removed name, a mount not listed): then the overlay's own identity stands."""
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except OSError:
        return None
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for line in lines:
        head, dash, tail = line.rstrip("\n").partition(" - ")
        fields, super_fields = head.split(), tail.split()
        if not dash or len(fields) < 5 or len(super_fields) < 3 or fields[2] != device:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if name != point and not name.startswith(point.rstrip("/") + "/"):
            continue
        inside = os.path.join(root, name[len(point) :].lstrip("/")).lstrip("/")
        for layer in _overlay_layers(super_fields[2]):
            there = os.path.join(layer, inside)
            try:
                found = os.lstat(there)
            except OSError:
                continue
            # The first layer with the name is the one overlayfs uses (a whiteout or a
            # directory there hides the lower ones).
            return (there, found) if stat.S_ISREG(found.st_mode) else None
    return None


def _overlay_layers(options: str) -> list[str]:
    """An overlay mount's layer directories, upper first, from its super options."""
    upper: list[str] = []
    lower: list[str] = []
    for option in options.split(","):
        key, _, value = option.partition("=")
        if key == "upperdir":
            upper.append(_unescape(value))
        elif key in ("lowerdir", "lowerdir+"):
            parts = re.split(r"(?<!\\):", _unescape(value))
            lower += [part.replace("\\:", ":") for part in parts if part]
    return upper + lower
