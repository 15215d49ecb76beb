"""`migd bench --fast-disk`: a disk much faster than this machine's, to show migd's own
cost where the disk no longer hides it (issue 19).

ext4 on a loop device whose backing file lives in /dev/shm (tmpfs): every "disk" access
is a memory copy. The backing file is written through first, so that its pages exist
(a sparse tmpfs file would allocate pages during the measurements); the loop device uses
direct I/O onto it (`losetup --direct-io=on`: no second page cache above tmpfs), and
mkfs runs with `-E nodiscard` (a discard would punch the pages out again) and initialises
its inode tables at once (no lazy init writing behind the measurements). Needs root.
Everything is torn down at the end, also on error or a signal (the bench's Cleanup); a
signal that lands while `losetup` attaches leaves a device whose name was never read, so
teardown then finds it by its backing file (`losetup -j`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from .common import BenchError, log

MiB = 1 << 20
_FILL_CHUNK = 64 * MiB


class FastDisk:
    """The loop-over-tmpfs ext4, mounted; `close()` undoes every step that was done."""

    def __init__(self, size: int) -> None:
        if os.geteuid() != 0:
            raise BenchError("--fast-disk needs root (losetup, mkfs.ext4, mount)")
        for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
            if shutil.which(tool) is None:
                raise BenchError(f"--fast-disk needs {tool}")
        self.size = -(-size // MiB) * MiB
        self.backing: Path | None = None
        self.device: str | None = None
        self.mount: Path | None = None

    def open(self) -> Path:
        """Build and mount it; the mount point (the bench's --dir)."""
        free = shutil.disk_usage("/dev/shm").free
        if free < self.size + 512 * MiB:
            raise BenchError(
                f"--fast-disk needs {self.size / MiB:.0f} MiB in /dev/shm, which has "
                f"{free / MiB:.0f} MiB free"
            )
        fd, name = tempfile.mkstemp(prefix="migd-fastdisk-", dir="/dev/shm")
        self.backing = Path(name)
        try:
            zeros = bytes(_FILL_CHUNK)
            for at in range(0, self.size, _FILL_CHUNK):
                os.write(fd, zeros[: min(_FILL_CHUNK, self.size - at)])
        finally:
            os.close(fd)
        log(f"fast disk: {self.size / MiB:.0f} MiB backing file {self.backing}")
        self.device = self._run(
            ["losetup", "--find", "--show", "--direct-io=on", str(self.backing)]
        ).strip()
        self._run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,"
                   "lazy_journal_init=0", self.device])  # fmt: skip
        self.mount = Path(tempfile.mkdtemp(prefix="migd-fastdisk-mnt-"))
        self._run(["mount", "-o", "nodiscard", self.device, str(self.mount)])
        log(f"fast disk: ext4 on {self.device} (direct-io onto tmpfs) mounted at {self.mount}")
        return self.mount

    def close(self) -> None:
        if self.mount is not None:
            try:
                self._run(["umount", str(self.mount)])
            except BenchError as exc:
                # Still in use (a shell's cwd, a process the bench could not stop): detach
                # it from the tree now; the kernel frees it, and the loop device set to
                # autoclear below, once the last user lets go.
                log(f"fast disk: {exc}; unmounting it lazily")
                self._run_logged(["umount", "--lazy", str(self.mount)])
            with contextlib.suppress(OSError):
                self.mount.rmdir()
            self.mount = None
        # Not known if a signal cut `losetup --find --show` short after it attached one:
        # then whatever is attached to our backing file (a name of our own, mkstemp's).
        if self.device is not None:
            devices = [self.device]
        elif self.backing is not None:
            devices = self.attached(self.backing)
        else:
            devices = []
        for device in devices:
            self._run_logged(["losetup", "-d", device])
        self.device = None
        if self.backing is not None:
            self.backing.unlink(missing_ok=True)
            self.backing = None

    @classmethod
    def attached(cls, backing: Path) -> list[str]:
        """The loop devices backed by this file (`losetup -j`: "/dev/loop3: []: (FILE)")."""
        with contextlib.suppress(BenchError):
            out = cls._run(["losetup", "-j", str(backing)])
            return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]
        return []

    @classmethod
    def _run_logged(cls, argv: list[str]) -> None:
        """A teardown step: its failure is said, and the teardown goes on."""
        try:
            cls._run(argv)
        except BenchError as exc:
            log(f"fast disk: {exc}")

    @staticmethod
    def _run(argv: list[str]) -> str:
        # Its own process group: a Ctrl-C at the terminal reaches only the bench, which
        # ends a set-up step's tool itself and does not let it cut the teardown's short.
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0
        )
        try:
            stdout, stderr = proc.communicate()
        except BaseException:
            # A signal (Ctrl-C, the bench's SIGTERM): the tool may still finish its step
            # (attach, mount) before it dies, so wait for it; close() then undoes the step.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its group: what it started too
            proc.wait()
            raise
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(argv)}: {stderr.strip() or proc.returncode}")
        return stdout
