"""/proc/PID/stat read by one helper (migd/procstat.py): the client's stopped-server
check, `vm restore`'s start-up and the bench's CPU times all rely on its fields."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migd.procstat import read_stat


def test_a_command_name_with_spaces_and_parentheses_leaves_the_fields_in_place() -> None:
    # A process may name itself anything of 15 bytes: the fields after the name must
    # still be found where the kernel puts them.
    child = subprocess.Popen(
        [sys.executable, "-c",
         "open('/proc/self/comm', 'w').write('a) b (c) 1 2');"
         "import sys; sys.stdout.write('named\\n'); sys.stdout.flush(); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == b"named\n"
        comm, fields = read_stat(child.pid)
        assert comm == "a) b (c) 1 2"
        assert fields[0] in ("S", "R")  # waiting for its stdin, or about to
        assert int(fields[1]) == os.getpid()  # field 4: the parent
        os.kill(child.pid, 19)  # SIGSTOP: the state letter the client looks for
        deadline = time.monotonic() + 30
        while read_stat(child.pid)[1][0] not in ("T", "t"):
            assert time.monotonic() < deadline, "the child never showed as stopped"
    finally:
        os.kill(child.pid, 18)  # SIGCONT
        child.communicate(b"")


def test_this_process_reads_as_itself_and_a_gone_one_is_an_oserror() -> None:
    comm, fields = read_stat()
    assert comm == Path("/proc/self/comm").read_text().strip()
    assert int(fields[19]) > 0  # starttime, in clock ticks since boot
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(OSError):
        read_stat(child.pid)
