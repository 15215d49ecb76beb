"""The QMP wire rules of qmp.md, checked against a real daemon over a real socket."""

from __future__ import annotations

import asyncio
import json

import pytest
from qemu.qmp import ExecuteError, QMPClient

from migd import QEMU_VERSION, __version__
from migd.qmp.wire import MAX_MESSAGE_BYTES

from .conftest import RawClient


async def test_qmpclient_negotiates_and_queries_version_and_commands(daemon):
    client = QMPClient("test")
    await asyncio.wait_for(client.connect(str(daemon.socket_path)), 10)
    try:
        version = await client.execute("query-version")
        assert version["package"] == f"migd {__version__}"
        assert set(version["qemu"]) == {"major", "minor", "micro"}
        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"qmp_capabilities", "query-version", "query-commands"} <= names
        with pytest.raises(ExecuteError) as info:
            await client.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert info.value.error.error.desc == "The command no-such-command has not been found"
    finally:
        await client.disconnect()


def test_greeting_names_migd_and_offers_no_capabilities(raw):
    qmp = raw.greeting["QMP"]
    assert qmp["capabilities"] == []
    assert qmp["version"]["package"] == f"migd {__version__}"


def test_greeting_and_query_version_report_the_qemu_release_migd_implements(raw):
    """Clients gate mapped-ram and direct-io on QEMU >= 9.1 (libvirt does): the `qemu`
    triple is QEMU's release whose interface migd implements, `package` names migd."""
    expected = {
        "qemu": dict(zip(("major", "minor", "micro"), QEMU_VERSION, strict=True)),
        "package": f"migd {__version__}",
    }
    assert raw.greeting["QMP"]["version"] == expected
    assert QEMU_VERSION[:2] == (10, 0)
    raw.negotiate()
    assert raw.execute("query-version") == {"return": expected}


def test_commands_before_negotiation_are_refused(raw):
    reply = raw.execute("query-version", id=1)
    assert reply == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
        "id": 1,
    }
    raw.negotiate()
    assert "return" in raw.execute("query-version")


def test_second_negotiation_is_refused(raw):
    raw.negotiate()
    reply = raw.execute("qmp_capabilities")
    assert reply["error"] == {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored",
    }


def test_bad_json_gets_an_error_and_the_connection_survives(raw):
    raw.negotiate()
    raw.send_raw(b'{"execute": ]\n')
    reply = raw.recv()
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith("JSON parse error, ")
    assert "id" not in reply
    assert "return" in raw.execute("query-version")


def test_a_stray_closing_brace_is_answered_and_the_next_requests_are_read(raw):
    """A `}` or `]` with nothing open is a message of its own: QEMU answers it with a parse
    error (tests/test_qemu_differential.py, "a stray closing brace") and reads on. Counted
    as depth -1 instead, it ended nothing: the session stalled, every later request
    unanswered. Both stray bytes go in one write with the requests after them, no
    newline to end them."""
    expecting = {"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}
    raw.send_raw(b'}{"execute": "qmp_capabilities", "id": 1}')
    assert raw.recv() == expecting
    assert raw.recv() == {"return": {}, "id": 1}
    raw.send_raw(b']{"execute": "query-version", "id": 2}')
    assert raw.recv() == expecting
    reply = raw.recv()
    assert reply["id"] == 2 and "return" in reply


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b'{"execute": "query-version", "id": NaN}', "stray 'N'"),
        (b'{"execute": "query-version", "id": -Infinity}', "stray '-I'"),
        (b'{"execute": "query-version", "id": 1e999}', "number '1e999' is out of range"),
        # Beyond a double as an integer: Python's own words (and its 4300-digit limit)
        # used to come out.
        (
            b'{"execute": "query-version", "id": ' + b"9" * 4301 + b"}",
            "number '" + "9" * 24 + "...' is out of range",
        ),
        (
            b'{"execute": "query-version", "id": -' + b"9" * 310 + b"}",
            "number '-" + "9" * 23 + "...' is out of range",
        ),
    ],
)
def test_numbers_that_are_not_json_are_refused_so_no_reply_carries_them(raw, text, reason):
    # Python's json reads NaN, Infinity and 1e999 (as inf) and would echo them in the id,
    # a reply no JSON parser reads; QEMU echoes 1e999 as 'inf'.
    raw.negotiate()
    raw.send_raw(text)
    reply = raw.recv()
    assert reply == {"error": {"class": "GenericError", "desc": f"JSON parse error, {reason}"}}
    assert raw.execute("query-version", id=1.5e300)["id"] == 1.5e300


@pytest.mark.parametrize(
    ("text", "reason"),
    [  # QEMU 10.0's texts (tests/test_qemu_differential.py compares them with QEMU)
        (b'{"execute": "query-version" "id": 1}', "expected separator in dict"),
        (b'{"execute": "query-version", "id": [1 2]}', "expected separator in list"),
        (b'{"execute": "query-version", "id": ["]", {"a": 1} 2]}', "expected separator in list"),
        (b'{"execute": "query-version", }', "expecting value"),
        (b'{"execute" "query-version"}', "missing : in object pair"),
        (b'{1: "query-version"}', "key is not a string in object"),
        (b'{"execute": "query-version", "id": "\\x"}', "invalid escape sequence in string"),
        (b"truex\n", "invalid keyword 'truex'"),
    ],
)
def test_parse_errors_are_worded_as_qemu_words_them(raw, text, reason):
    raw.negotiate()
    raw.send_raw(text)
    assert raw.recv() == {"error": {"class": "GenericError", "desc": f"JSON parse error, {reason}"}}


def test_invalid_utf8_is_a_parse_error(raw):
    raw.negotiate()
    raw.send_raw(b'{"execute": "\xff\xfe"}\n')
    assert raw.recv()["error"]["desc"].startswith("JSON parse error")
    assert "return" in raw.execute("query-version")


@pytest.mark.parametrize("text", [b"[1, 2]", b'"hello"\n', b"42\n", b"null\n"])
def test_json_that_is_not_an_object_is_refused(raw, text):
    raw.negotiate()
    raw.send_raw(text)
    assert raw.recv() == {
        "error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}
    }


def test_missing_execute_is_refused_with_the_id_echoed(raw):
    raw.negotiate()
    raw.send({"arguments": {}, "id": "x"})
    assert raw.recv() == {
        "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"},
        "id": "x",
    }


def test_unexpected_member_is_refused(raw):
    raw.negotiate()
    raw.send({"execute": "query-version", "colour": "red"})
    assert raw.recv()["error"]["desc"] == "QMP input member 'colour' is unexpected"


def test_arguments_that_are_not_an_object_are_refused(raw):
    raw.negotiate()
    raw.send({"execute": "query-version", "arguments": [1]})
    assert raw.recv()["error"]["desc"] == "QMP input member 'arguments' must be an object"


def test_unexpected_argument_is_refused(raw):
    raw.negotiate()
    reply = raw.execute("query-version", {"verbose": True})
    assert reply["error"] == {
        "class": "GenericError",
        "desc": "Parameter 'verbose' is unexpected",
    }


def test_mistyped_argument_names_the_expected_json_type(raw):
    reply = raw.execute("qmp_capabilities", {"enable": "oob"})
    assert reply["error"]["desc"] == "Invalid parameter type for 'enable', expected: array"
    reply = raw.execute("qmp_capabilities", {"enable": [7]})
    assert reply["error"]["desc"] == "Invalid parameter type for 'enable[0]', expected: string"


def test_bad_enum_value_says_what_is_expected(raw):
    reply = raw.execute("qmp_capabilities", {"enable": ["fast"]})
    # QEMU 10's text: a list element has no name of its own
    assert reply["error"]["desc"] == "Parameter 'null' does not accept value 'fast'"
    # nothing happened: negotiation is still pending
    assert raw.execute("query-version")["error"]["class"] == "CommandNotFound"


@pytest.mark.parametrize("ident", [7, -1.5, "abc", {"a": [1, None]}, [1, 2], None, True])
def test_id_is_echoed_verbatim(raw, ident):
    raw.negotiate()
    assert raw.execute("query-version", id=ident)["id"] == ident
    assert raw.execute("no-such", id=ident)["id"] == ident


def test_reply_has_no_id_when_request_had_none(raw):
    raw.negotiate()
    assert "id" not in raw.execute("query-version")


def test_two_messages_in_one_write_get_two_replies_in_order(raw):
    raw.send_raw(b'{"execute": "qmp_capabilities", "id": 1}{"execute": "query-version", "id": 2}')
    assert raw.recv() == {"return": {}, "id": 1}
    assert raw.recv()["id"] == 2


def test_one_message_split_over_many_writes_is_reassembled(raw):
    raw.negotiate()
    text = json.dumps({"execute": "query-version", "id": 'split \\" {[ '}).encode()
    for i in range(len(text)):
        raw.send_raw(text[i : i + 1])
    assert raw.recv()["id"] == 'split \\" {[ '


def test_over_limit_message_gets_qemus_error_and_the_connection_stays(raw):
    """Over the bound (MAX_MESSAGE_BYTES), the message is refused with QEMU's text and no
    id; its rest is discarded and the same connection goes on (before: closed at 1 MiB)."""
    raw.negotiate()
    big = b'{"execute": "query-version", "id": 1, "arguments": {"x": "'
    big += b"a" * (MAX_MESSAGE_BYTES + 1) + b'"}}'
    raw.send_raw(big + b'{"execute": "query-version", "id": 2}')
    assert raw.recv() == {
        "error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}
    }
    assert raw.recv()["id"] == 2


def test_a_two_mib_line_is_answered_as_qemu_answers_it(raw):
    raw.negotiate()
    ident = "x" * (2 << 20)
    raw.send_raw(json.dumps({"execute": "query-version", "id": ident}).encode() + b"\n")
    reply = raw.recv()
    assert reply["id"] == ident and "return" in reply


def test_a_duplicate_key_is_refused_as_qemu_refuses_it(raw):
    raw.negotiate()
    raw.send_raw(b'{"execute": "query-version", "id": 1, "id": 2}')
    assert raw.recv() == {
        "error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}
    }
    raw.send_raw(b'{"execute": "object-del", "arguments": {"id": "a", "id": "b"}, "id": 3}')
    assert raw.recv()["error"]["desc"] == "JSON parse error, duplicate key"
    assert raw.execute("query-version", id=4)["id"] == 4


def test_events_are_not_sent_before_negotiation_and_nothing_else_is_queued(raw, short_dir):
    """A save with events runs to its end (seen by a negotiated client) while `raw` has
    not negotiated; then raw's next messages must be exactly the replies to its own
    requests, in order: no event arrived before negotiation, none was held for after."""
    other = RawClient(raw.sock.getpeername()).negotiate()
    try:
        add = {"qom-type": "memory-backend-ram", "id": "ram0", "size": 1 << 20}
        assert other.execute("object-add", add) == {"return": {}}
        caps = [{"capability": c, "state": True} for c in ("mapped-ram", "events")]
        assert other.execute("migrate-set-capabilities", {"capabilities": caps}) == {"return": {}}
        assert other.execute("migrate", {"uri": f"file:{short_dir}/save.img"}) == {"return": {}}
        statuses: list[str] = []
        while statuses[-1:] not in (["completed"], ["failed"], ["cancelled"]):
            msg = other.recv()  # bounded by the socket's timeout
            if msg.get("event") == "MIGRATION":
                statuses.append(msg["data"]["status"])
        # (execute() skipped "setup", sent before the migrate reply)
        assert statuses == ["active", "completed"]
    finally:
        other.close()
    raw.send({"execute": "qmp_capabilities", "id": "first"})
    assert raw.recv() == {"return": {}, "id": "first"}
    raw.send({"execute": "query-version", "id": "second"})
    reply = raw.recv()
    assert reply["id"] == "second" and "return" in reply, reply


async def test_fifty_clients_at_once_are_all_greeted_and_answered(daemon):
    clients = [QMPClient(f"c{i}") for i in range(50)]
    await asyncio.wait_for(
        asyncio.gather(*(c.connect(str(daemon.socket_path)) for c in clients)), 30
    )
    try:
        replies = await asyncio.wait_for(
            asyncio.gather(*(c.execute("query-version") for c in clients)), 30
        )
        assert all(r["package"] == f"migd {__version__}" for r in replies)
    finally:
        await asyncio.gather(*(c.disconnect() for c in clients))


def test_a_second_client_is_served_while_the_first_is_idle(daemon):
    a = RawClient(daemon.socket_path)
    b = RawClient(daemon.socket_path).negotiate()
    try:
        assert "return" in b.execute("query-version")
    finally:
        a.close()
        b.close()
