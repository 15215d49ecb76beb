"""`migd bench --vm`'s teardown of a QEMU with a second stop signal landing in it: it
ends that QEMU all the same (before: the signal's SystemExit cut Vm.close short, the
QEMU was left running, its GiB memory file mapped). Real processes, a real SIGTERM sent
to this process from inside the teardown, through the bench's own handler."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from migd.bench import _terminate, common
from migd.bench.vm import Vm

from .qemu_vm import requires_qemu


class SignalledPopen(subprocess.Popen[bytes]):
    """A process whose kill (the teardown's) is preceded by a SIGTERM to this process,
    as a service manager repeating its SIGTERM would send it."""

    def kill(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        super().kill()


@pytest.fixture
def bench_handler() -> Iterator[None]:
    """The bench's SIGTERM handler installed (migd bench's run), its noted stop cleared."""
    old = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        common._stopped.clear()


async def test_a_second_sigterm_while_a_qemu_is_ended_still_ends_it(
    bench_handler: None, capfd: Any
) -> None:
    # Stands in for a QEMU whose QMP did not connect: the teardown kills it at once.
    proc = SignalledPopen([sys.executable, "-c", "import time; time.sleep(600)"])
    vm = Vm.__new__(Vm)
    vm.proc, vm.qmp = proc, QMPClient("a")
    try:
        await vm.close()
        assert proc.poll() == -signal.SIGKILL  # ended (before: SystemExit, left running)
        assert "SIGTERM: still removing what the bench made" in capfd.readouterr().err
        with pytest.raises(SystemExit) as stop:
            common.raise_if_stopped()  # the bench stops at its next round
        assert stop.value.code == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            super(SignalledPopen, proc).kill()
            proc.wait()


class SignalledQuitVm(Vm):
    """A QEMU whose `quit` (the teardown's) is preceded by a SIGTERM to this process."""

    async def cmd(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        if name == "quit":
            os.kill(os.getpid(), signal.SIGTERM)
        return await super().cmd(name, arguments)


@requires_qemu
async def test_a_second_sigterm_as_a_qemu_is_asked_to_quit_still_ends_it(
    bench_handler: None, capfd: Any, short_dir: Path
) -> None:
    """The teardown's other path: QEMU's QMP connected, so it is asked to quit and
    waited for (before: the signal's SystemExit left before `quit` was sent)."""
    ram = short_dir / "ram"
    ram.write_bytes(b"")
    args = argparse.Namespace(qemu="qemu-system-x86_64", guest=None)
    vm = await SignalledQuitVm(short_dir, "q", ram, 16 << 20, args, incoming=True).connect()
    try:
        await vm.close()
        assert vm.proc.returncode == 0  # it quit when asked: not killed
        assert "SIGTERM: still removing what the bench made" in capfd.readouterr().err
        with pytest.raises(SystemExit):
            common.raise_if_stopped()
    finally:
        if vm.proc.poll() is None:
            vm.proc.kill()
            vm.proc.wait()
