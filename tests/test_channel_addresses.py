"""migrate's and migrate-incoming's `channels` addresses are checked as QEMU 10 checks
them, without QEMU: MigrationAddress is a flat union on 'transport' (SocketAddress one on
'type' inside it), so each transport's members are checked, with QEMU's texts and full
member paths, before migd refuses a transport it cannot seek. The same requests are
compared with a live QEMU in tests/test_qemu_differential.py."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import qmp_error

SEEKABLE = "Migration requires seekable transport (e.g. file)"
INET = {"transport": "socket", "type": "inet", "host": "h"}

CASES: list[tuple[dict[str, Any], str]] = [
    (
        {**INET, "port": None},
        "Invalid parameter type for 'channels[0].addr.port', expected: string",
    ),
    (INET, "Parameter 'channels[0].addr.port' is missing"),
    ({**INET, "port": 1}, "Invalid parameter type for 'channels[0].addr.port', expected: string"),
    ({**INET, "port": "1", "to": "x"}, "Parameter 'channels[0].addr.to' expects uint64"),
    ({**INET, "port": "1", "x": 1}, "Parameter 'channels[0].addr.x' is unexpected"),
    ({"transport": "socket"}, "Parameter 'channels[0].addr.type' is missing"),
    ({"transport": "socket", "type": "nope"}, "Parameter 'type' does not accept value 'nope'"),
    ({"transport": "socket", "type": "unix"}, "Parameter 'channels[0].addr.path' is missing"),
    (
        {"transport": "socket", "type": "vsock", "cid": 1, "port": "2"},
        "Invalid parameter type for 'channels[0].addr.cid', expected: string",
    ),
    ({"transport": "socket", "type": "fd"}, "Parameter 'channels[0].addr.str' is missing"),
    ({"transport": "exec"}, "Parameter 'channels[0].addr.args' is missing"),
    (
        {"transport": "exec", "args": [1]},
        "Invalid parameter type for 'channels[0].addr.args[0]', expected: string",
    ),
    ({"transport": "rdma", "host": "h"}, "Parameter 'channels[0].addr.port' is missing"),
    (
        {"transport": "file", "filename": "/x", "offset": 0, "x": 1},
        "Parameter 'channels[0].addr.x' is unexpected",
    ),
    ({**INET, "port": "1"}, SEEKABLE),
    ({"transport": "socket", "type": "unix", "path": "/x"}, SEEKABLE),
    ({"transport": "exec", "args": ["true"]}, SEEKABLE),
    ({"transport": "rdma", "host": "h", "port": "1"}, SEEKABLE),
]


@pytest.mark.parametrize("command", ["migrate", "migrate-incoming"])
@pytest.mark.parametrize(("addr", "text"), CASES, ids=[t for _, t in CASES])
async def test_channel_address_checked_as_qemu_checks_it(
    qmp: Any, command: str, addr: dict[str, Any], text: str
) -> None:
    channels = [{"channel-type": "main", "addr": addr}]
    assert await qmp_error(qmp, command, {"channels": channels}) == text


async def test_every_channel_is_checked_before_the_list_rules(qmp: Any) -> None:
    """QEMU reads the whole request before it looks at the list: a malformed second
    channel is named by its index before "more than one main entry"."""
    good = {"channel-type": "main", "addr": {"transport": "file", "filename": "/x", "offset": 0}}
    bad = {"channel-type": "main", "addr": {"transport": "file", "filename": "/x"}}
    text = await qmp_error(qmp, "migrate", {"channels": [good, bad]})
    assert text == "Parameter 'channels[1].addr.offset' is missing"
    text = await qmp_error(qmp, "migrate", {"uri": 1, "channels": [bad]})
    assert text == "Invalid parameter type for 'uri', expected: string"
