"""Which files a client may make migd open: the allowed-directories policy.

Access to the socket is control of migd, and migd usually runs as root. With
`allowed-dirs` configured, save files and mem-paths must resolve (symlinks followed)
inside one of them, and the open itself cannot be redirected by a symlink swapped in
after the check: the parent directory is opened first and verified through its fd, and
the final component is opened relative to it with O_NOFOLLOW.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence

from .errors import MigdError

FileOpener = Callable[[str, int, int], int]
"""open(path, flags, mode) -> fd, raising OSError like os.open."""


class PathNotAllowed(MigdError):
    """A path lies outside the configured allowed directories."""


def plain_open(path: str, flags: int, mode: int = 0o600) -> int:
    return os.open(path, flags | os.O_CLOEXEC, mode)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


class PathPolicy:
    def __init__(self, allowed_dirs: Sequence[str] = ()) -> None:
        # Resolved once: an allowed directory that is itself a symlink means its target.
        self.allowed = [os.path.realpath(d) for d in allowed_dirs]

    @property
    def restricted(self) -> bool:
        return bool(self.allowed)

    def _refuse(self, path: str) -> PathNotAllowed:
        return PathNotAllowed(
            f"'{path}' is outside the allowed directories ({', '.join(self.allowed)})"
        )

    def _allowed(self, real: str) -> bool:
        return any(_inside(real, d) for d in self.allowed)

    def check(self, path: str) -> None:
        """Refuse a path whose resolved location is outside every allowed directory."""
        if self.restricted and not self._allowed(os.path.realpath(path)):
            raise self._refuse(path)

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        """os.open, confined to the allowed directories when there are any."""
        if not self.restricted:
            return plain_open(path, flags, mode)
        parent, name = os.path.split(os.path.abspath(path))
        if name in ("", ".", ".."):
            raise self._refuse(path)
        real_parent = os.path.realpath(parent)
        if not self._allowed(os.path.join(real_parent, name)):
            raise self._refuse(path)
        dir_fd = os.open(real_parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # The directory we hold must still be inside: a component swapped for a
            # symlink between realpath() and open() shows up here.
            held = os.readlink(f"/proc/self/fd/{dir_fd}")
            if not self._allowed(os.path.join(held, name)):
                raise self._refuse(path)
            try:
                return os.open(name, flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise PathNotAllowed(
                        f"'{path}' is a symbolic link: with allowed-dirs set, migd opens "
                        "only real files"
                    ) from None
                raise
        finally:
            os.close(dir_fd)
