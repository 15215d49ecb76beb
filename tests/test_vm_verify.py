"""`migd verify IMAGE` of a `migd vm save` image: its header, its device state and every
page of its RAM part, as `migd vm restore` would check them, without a QEMU or a daemon
(red-team, session 8a: it said "not a QEMU/migd save file", exit 2, of every image, and
`IMAGE,offset=N` checked the RAM part alone). Real QEMU for the save."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from migd.tools import vm_image

from .conftest import DaemonProcess
from .qemu_vm import requires_qemu
from .test_vm import MiB, _damage, saved_image

pytestmark = requires_qemu


def verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migd", "verify", "-q", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


async def test_a_good_image_verifies_whole(daemon: DaemonProcess, setup: dict[str, Path]) -> None:
    image = setup["image"]
    await saved_image(daemon, setup, "--quit")
    result = verify(str(image))
    assert result.returncode == 0, result.stderr
    assert "migd VM image" in result.stdout and "header and device state" in result.stdout
    assert "all 64 checksums verified" in result.stdout
    as_json = json.loads(verify("--json", str(image)).stdout)
    with open(image, "rb") as f:
        header = vm_image.read_header(f.fileno(), str(image))
    assert as_json["offset"] == header.ram.offset
    assert as_json["vm-image"]["image-id"] == header.image_id


def _flip_a_page(image: Path) -> str:
    with open(image, "r+b") as f:
        header = vm_image.read_header(f.fileno(), str(image))
        at = header.ram.offset + header.ram.length - 5 * MiB  # in the last block's pages
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))
    return "checksum mismatch"


@pytest.mark.parametrize("how", ["page byte", "device byte", "header byte", "header gone",
                                 "truncated"])  # fmt: skip
async def test_a_damaged_image_exits_1_naming_what(
    daemon: DaemonProcess, setup: dict[str, Path], how: str
) -> None:
    """Each refused as `vm restore` refuses it; a flipped page byte, which `vm restore`
    finds only as it writes the guest's RAM, is found without one."""
    image = setup["image"]
    await saved_image(daemon, setup, "--quit")
    text = _flip_a_page(image) if how == "page byte" else _damage(image, how)
    result = verify(str(image))
    assert result.returncode == 1, result
    assert text in result.stderr, result.stderr
    assert str(image) in result.stderr
    if how == "page byte":  # inspect reads no pages, and no longer says it is all good
        out = subprocess.run([sys.executable, "-m", "migd", "inspect", str(image)],
                             capture_output=True, text=True).stdout  # fmt: skip
        assert "`migd verify` checks every page" in out
