"""Every integer member is checked as its QAPI type, with QEMU 10's texts (each text
below was read from a QEMU 10.0 answering the same request), and a refused request
changes none of its members."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import qmp_error

pytestmark = pytest.mark.timeout(60)

U64 = 1 << 64


@pytest.mark.parametrize(
    ("command", "arguments", "text"),
    [
        # size / uint64: anything but an unsigned 64-bit integer, named by full path
        (
            "migrate-set-parameters",
            {"max-bandwidth": U64},
            "Parameter 'max-bandwidth' expects uint64",
        ),
        (
            "migrate-set-parameters",
            {"max-bandwidth": 1.5},
            "Parameter 'max-bandwidth' expects uint64",
        ),
        (
            "migrate-set-parameters",
            {"max-bandwidth": "x"},
            "Parameter 'max-bandwidth' expects uint64",
        ),
        # uint8: read as uint64 first, then narrowed; then QEMU's own 1..255 check
        (
            "migrate-set-parameters",
            {"multifd-channels": 1.5},
            "Parameter 'multifd-channels' expects uint64",
        ),
        (
            "migrate-set-parameters",
            {"multifd-channels": U64},
            "Parameter 'multifd-channels' expects uint64",
        ),
        (
            "migrate-set-parameters",
            {"multifd-channels": 256},
            "Parameter 'multifd-channels' expects uint8_t",
        ),
        (
            "migrate-set-parameters",
            {"multifd-channels": -1},
            "Parameter 'multifd-channels' expects uint8_t",
        ),
        (
            "migrate-set-parameters",
            {"multifd-channels": 0},
            "Parameter 'multifd_channels' expects a value between 1 and 255",
        ),
        # int64
        (
            "add-fd",
            {"fdset-id": 1 << 63},
            "Invalid parameter type for 'fdset-id', expected: integer",
        ),
        ("add-fd", {"fdset-id": 1.5}, "Invalid parameter type for 'fdset-id', expected: integer"),
        (
            "remove-fd",
            {"fdset-id": 1 << 63},
            "Invalid parameter type for 'fdset-id', expected: integer",
        ),
        # nested: the full path
        (
            "migrate",
            {
                "channels": [
                    {
                        "channel-type": "main",
                        "addr": {"transport": "file", "filename": "/x", "offset": U64},
                    }
                ]
            },
            "Parameter 'channels[0].addr.offset' expects uint64",
        ),
        (
            "migrate",
            {
                "channels": [
                    {"channel-type": "main", "addr": {"transport": "file", "filename": "/x"}}
                ]
            },
            "Parameter 'channels[0].addr.offset' is missing",
        ),
        (
            "migrate",
            {"channels": [{"channel-type": "main", "addr": {"transport": "file", "offset": 0}}]},
            "Parameter 'channels[0].addr.filename' is missing",
        ),
    ],
)
async def test_integer_members_are_checked_as_qemu_checks_them(
    qmp: Any, command: str, arguments: dict[str, Any], text: str
) -> None:
    before = await qmp.execute("query-migrate-parameters")
    assert await qmp_error(qmp, command, arguments) == text
    assert await qmp.execute("query-migrate-parameters") == before


async def test_largest_values_are_taken(qmp: Any) -> None:
    """The top of each range is a value, not an error: 2^64-1 bytes/s (no cap in
    practice) and 255 channels."""
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": U64 - 1, "multifd-channels": 255})
    params = await qmp.execute("query-migrate-parameters")
    assert (params["max-bandwidth"], params["multifd-channels"]) == (U64 - 1, 255)


async def test_a_refused_member_refuses_the_whole_request(qmp: Any) -> None:
    before = await qmp.execute("query-migrate-parameters")
    text = await qmp_error(
        qmp,
        "migrate-set-parameters",
        {"multifd-channels": before["multifd-channels"] + 1, "max-bandwidth": U64},
    )
    assert text == "Parameter 'max-bandwidth' expects uint64"
    assert await qmp.execute("query-migrate-parameters") == before
