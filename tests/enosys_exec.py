"""Run a command whose cachestat(2) calls the kernel refuses with ENOSYS, as a kernel
before 6.5 does: `python tests/enosys_exec.py NR COMMAND...` installs a seccomp filter
that answers syscall NR with ENOSYS (every other syscall is allowed), then execs COMMAND.
The filter is inherited by every thread and child of COMMAND and cannot be removed."""

from __future__ import annotations

import ctypes
import errno
import os
import sys

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, ...


class _Filter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]


def refuse(number: int) -> None:
    """From now on, syscall `number` fails with ENOSYS in this process and its children."""
    code = (_Filter * 4)(
        _Filter(_LD_W_ABS, 0, 0, 0),  # A = seccomp_data.nr
        _Filter(_JEQ_K, 0, 1, number),
        _Filter(_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS),
        _Filter(_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
    )
    program = _Program(len(code), code)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    refuse(int(sys.argv[1]))
    os.execvp(sys.argv[2], sys.argv[2:])
