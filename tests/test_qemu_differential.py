"""The same requests to QEMU 10.0 and to migd, replies compared: where migd claims QEMU's
behaviour the replies must be equal, and every difference is listed, with its reason, in
one place: DIFFERENCES below. That table is the documentation of how migd differs.

Each row opens a new connection to each side (greeting included), sends its messages one
at a time and reads one reply to each. Before comparing, what must differ is normalised
on both sides (`_normalise`: the `package` string, QEMU's micro release, the order of
QEMU's unordered lists, migd's own members after QEMU's in query-memdev). A row with a
Difference must still differ, and only in the members it names: a row that starts to
match QEMU fails here, so that its entry is removed.

QEMU runs as `qemu-system-x86_64 -machine none -nodefaults -display none` with one
memory-backend-file; migd has the same backend. Skipped, saying so, without QEMU 10.0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from migd import QEMU_VERSION

from .conftest import RawClient, start_daemon
from .qemu_vm import QEMU_BINARY, qemu_version

MiB = 1 << 20
CAPS = b'{"execute": "qmp_capabilities"}'
MIGD_MEMDEV_MEMBERS = ("qom-type", "mem-path", "ramblock-name")

pytestmark = pytest.mark.skipif(
    qemu_version() is None or qemu_version() != QEMU_VERSION[:2],
    reason=f"the differential test needs QEMU {QEMU_VERSION[0]}.{QEMU_VERSION[1]} "
    f"(migd.QEMU_VERSION), installed: {qemu_version()}",
)


@dataclass(frozen=True)
class Difference:
    """Where the replies differ (paths into [greeting, reply 1, reply 2, ...]) and why."""

    reason: str
    paths: tuple[tuple[Any, ...], ...]


def msg(execute: str, arguments: dict[str, Any] | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"execute": execute, **extra}
    if arguments is not None:
        body["arguments"] = arguments
    return json.dumps(body).encode()


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


INTENDED = "intended"
ITEM = "issue 15 item"
WORDING = "issue 15, wording:"
Row = tuple[str, list[bytes], Difference | None]


def same(name: str, *messages: bytes) -> Row:
    return (name, list(messages), None)


def differs(name: str, messages: list[bytes], reason: str, *paths: tuple[Any, ...]) -> Row:
    return (name, messages, Difference(reason, paths))


# No such directory on either side: QEMU cannot open the file, and neither can migd.
FILE_ADD = {"qom-type": "memory-backend-file", "id": "f1", "size": 4096,
            "mem-path": "/proc/no-such-dir/ram"}  # fmt: skip
RAM_ADD = {"qom-type": "memory-backend-ram", "id": "r1", "size": 4096}


def caps_of(*caps: tuple[str, bool]) -> bytes:
    states = [{"capability": c, "state": on} for c, on in caps]
    return msg("migrate-set-capabilities", {"capabilities": states})


REPLY = 2  # the reply to the message after CAPS
ERROR = (REPLY, "error", "desc")
# Every message gets exactly one reply read. Paths index [greeting, reply 1, reply 2, ...].
MAIN_FILE = {"channel-type": "main",
             "addr": {"transport": "file", "filename": "/nonexistent/x", "offset": 0}}  # fmt: skip

INET_NO_PORT = {"transport": "socket", "type": "inet", "host": "h"}
# Channel addresses of every transport, well-formed and not: the flat unions' checks.
CHANNEL_ADDRS: list[dict[str, Any]] = [
    {**INET_NO_PORT, "port": None}, INET_NO_PORT, {**INET_NO_PORT, "port": 1},
    {**INET_NO_PORT, "port": "1"},
    *[{**INET_NO_PORT, "port": "1", k: v} for k, v in (
        ("numeric", "x"), ("to", "x"), ("to", 70000), ("to", -1), ("keep-alive", 1),
        ("mptcp", None), ("x", 1))],
    {"transport": "socket"}, {"transport": "socket", "type": "nope"},
    {"transport": "socket", "type": None}, {"transport": "socket", "type": "unix"},
    {"transport": "socket", "type": "unix", "path": "/x"},
    {"transport": "socket", "type": "unix", "path": "/x", "abstract": 1},
    {"transport": "socket", "type": "unix", "path": "/x", "x": 1},
    {"transport": "socket", "type": "vsock", "cid": 1, "port": "2"},
    {"transport": "socket", "type": "fd"}, {"transport": "socket", "type": "fd", "str": "3"},
    {"transport": "exec"}, {"transport": "exec", "args": "x"}, {"transport": "exec", "args": [1]},
    {"transport": "exec", "args": ["true"]}, {"transport": "exec", "args": [], "x": 1},
    {"transport": "rdma", "host": "h"}, {"transport": "rdma", "host": "h", "port": "1"},
    {"transport": "file"}, {"transport": "file", "filename": "/nonexistent/x"},
    {"transport": "file", "filename": "/nonexistent/x", "offset": "x"},
    {"transport": "file", "filename": "/nonexistent/x", "offset": 0, "x": 1},
    {"transport": "file", "filename": 1, "offset": 0},
    {}, {"transport": "nope"}, {"transport": 1}, {"transport": None},
]
WELL_FORMED = ({**INET_NO_PORT, "port": "1"}, {"transport": "socket", "type": "unix", "path": "/x"},
               {"transport": "socket", "type": "fd", "str": "3"},
               {"transport": "exec", "args": ["true"]},
               {"transport": "rdma", "host": "h", "port": "1"})


def _well_formed(addr: dict[str, Any]) -> bool:
    return addr in WELL_FORMED


# A file both sides map in turn (QEMU creates it; migd takes it as the caller's own).
OPTS_PATH = f"/dev/shm/migd-diff-opts-{os.getpid()}"
OPTS_RAM = {"qom-type": "memory-backend-ram", "id": "r9", "size": 4096}
OPTS_FILE = {"qom-type": "memory-backend-file", "id": "f9", "size": 4096, "mem-path": OPTS_PATH}
BACKEND_OPTIONS: list[tuple[str, Any]] = [
    ("merge", "x"), ("merge", True), ("merge", False), ("dump", "x"), ("dump", False),
    ("prealloc", "x"), ("prealloc", True), ("prealloc-threads", "x"), ("prealloc-threads", 0),
    ("prealloc-threads", -1), ("prealloc-threads", 2), ("prealloc-threads", 1 << 32),
    ("prealloc-context", "x"), ("prealloc-context", 1), ("reserve", "x"), ("reserve", True),
    ("host-nodes", "x"), ("host-nodes", [0]), ("host-nodes", []), ("host-nodes", ["x"]),
    ("policy", "x"), ("policy", "bind"), ("policy", "default"), ("policy", 1),
    ("x-use-canonical-path-for-ramblock-id", True),
    ("x-use-canonical-path-for-ramblock-id", "x"),
    ("align", "x"), ("align", 3), ("align", 4096), ("offset", "x"), ("offset", 0),
    ("discard-data", False), ("discard-data", "x"), ("pmem", False), ("readonly", False),
    ("readonly", "x"), ("rom", "x"), ("rom", "on"), ("rom", "auto"),
]
# Taken by QEMU, refused by migd, saying why (on a memory-backend-ram QEMU refuses the
# file's own members as unexpected, and so does migd).
MIGD_REFUSES: list[tuple[str, Any]] = [
    ("align", 8192), ("offset", 4096), ("discard-data", True), ("pmem", True),
    ("readonly", True), ("reserve", False),
]
BACKEND_OPTIONS += MIGD_REFUSES


ROWS: list[Row] = [
    # -- greeting and negotiation
    differs("greeting", [], f"{INTENDED}: migd offers no out-of-band execution",
            (0, "QMP", "capabilities")),
    same("command before negotiation", msg("query-version", id=1)),
    same("negotiation twice", CAPS, CAPS),
    same("negotiation with an unknown capability", msg("qmp_capabilities", {"enable": ["nope"]})),
    # An optional member sent as null has the wrong type in QEMU's visitor (absent is fine).
    same("negotiation with enable null", msg("qmp_capabilities", {"enable": None})),
    # -- item 1: version
    same("query-version", CAPS, msg("query-version")),
    same("query-version echoes any id", CAPS, msg("query-version", id={"a": [1, None]})),
    # -- item 2: query-memdev (migd's own members are dropped by _normalise)
    differs("query-memdev", [CAPS, msg("query-memdev")],
            "truthful: QEMU advises MADV_MERGEABLE (mem-merge is on by default), "
            "migd never gives memory to KSM",
            (REPLY, "return", 0, "merge")),
    # -- item 5: JSON parsing
    same("duplicate key", CAPS, b'{"execute": "query-version", "id": 1, "id": 2}'),
    same("duplicate key in arguments",
         CAPS, b'{"execute": "query-version", "arguments": {"a": 1, "a": 2}}'),
    same("2 MiB line", CAPS, msg("query-version", id="x" * (2 * MiB)) + b"\n"),
    same("1024 levels of nesting", CAPS, deep(1024)),
    differs("1025 levels of nesting, then a request",
            [CAPS, deep(1025), msg("query-version", id="after")],
            f"{INTENDED}: migd discards the rest of a refused message; QEMU parses it as "
            "new input and answers every stray bracket",
            (3,)),
    differs("9 MiB message", [CAPS, msg("query-version", {"x": "x" * (9 * MiB)})],
            f"{INTENDED}: migd bounds a message at 8 MiB (wire.MAX_MESSAGE_BYTES; QEMU: 64 "
            "MiB of tokens) to bound the memory of a client",
            (REPLY,)),
    same("not an object", CAPS, b"[1, 2]"),
    same("no execute", CAPS, b'{"arguments": {}, "id": 5}'),
    same("execute not a string", CAPS, b'{"execute": 1}'),
    same("unexpected member", CAPS, b'{"execute": "query-version", "foo": 1}'),
    same("arguments not an object", CAPS, b'{"execute": "query-version", "arguments": []}'),
    same("garbage keyword", CAPS, b"aaa\n"),
    same("a keyword run on", CAPS, b"truex\n"),
    same("invalid escape", CAPS, b'{"execute": "query-version", "id": "\\x"}'),
    same("invalid UTF-8 in a string", CAPS, b'{"execute": "query-version", "id": "\xc3("}'),
    same("an encoded surrogate", CAPS, b'{"execute": "query-version", "id": "\xed\xa0\x80"}'),
    same("a lone surrogate escape", CAPS, b'{"execute": "query-version", "id": "\\ud800"}'),
    differs("byte 0xff", [CAPS, b'{"execute": "query-version", "id": "\xff"}'],
            f"{INTENDED}: QEMU's lexer takes 0xff as a stray token outside the string and "
            "answers twice; migd answers once, 'invalid UTF-8 sequence in string'", ERROR),
    same("missing comma", CAPS, b'{"execute": "query-version" "id": 1}'),
    same("trailing comma in an object", CAPS, b'{"execute": "query-version", }'),
    same("trailing comma in an array", CAPS, b'{"execute": "query-version", "id": [1, ]}'),
    same("missing colon", CAPS, b'{"execute" "query-version"}'),
    same("key not a string", CAPS, b'{1: "query-version"}'),
    same("missing comma in a list", CAPS, b'{"execute": "query-version", "id": [1 2]}'),
    same("NaN", CAPS, b'{"execute": "query-version", "id": NaN}'),
    same("Infinity", CAPS, b'{"execute": "query-version", "id": -Infinity}'),
    # 1e999 is not here: QEMU echoes it as 'inf', which is not JSON (test_wire.py).
    differs("single quotes", [CAPS, b"{'execute': 'query-version'}"],
            f"{INTENDED}: migd reads RFC 8259 JSON; QEMU also takes single-quoted strings, "
            "an extension of its own parser", (REPLY,)),
    differs("a leading zero", [CAPS, b'{"execute": "query-version", "id": 01}'],
            f"{INTENDED}: QEMU's lexer names the stray token ('01') and then parses the "
            "rest as new input; migd refuses the message once, 'expected separator in dict'",
            ERROR),
    same("a stray closing brace", CAPS, b'}'),
    same("NUL in an id", CAPS, b'{"execute": "query-version", "id": "a\\u0000b"}'),
    differs("NUL in an argument",
            [CAPS, b'{"execute": "object-del", "arguments": {"id": "a\\u0000b"}}'],
            f"{INTENDED}: migd refuses \\u0000 in arguments, where QEMU takes it: a NUL "
            "cannot be in a path, and migd passes names and paths to the OS",
            (REPLY,)),
    # -- commands and arguments
    same("unknown command", CAPS, msg("no-such-command", id="x")),
    same("missing argument", CAPS, msg("object-del", {})),
    same("extra argument", CAPS, msg("query-version", {"x": 1})),
    same("wrong JSON type", CAPS, msg("object-del", {"id": 1})),
    same("object-del of no such object", CAPS, msg("object-del", {"id": "nope"})),
    # object-add: every row is refused by both, so that no object is left behind.
    same("object-add size 0, file", CAPS, msg("object-add", {**FILE_ADD, "size": 0})),
    same("object-add size 0, ram", CAPS, msg("object-add", {**RAM_ADD, "size": 0})),
    # The same text for a mem-path it can open (tests/test_object_add_texts.py).
    differs("object-add size 4097, file", [CAPS, msg("object-add", {**FILE_ADD, "size": 4097})],
            f"{INTENDED}: migd checks the size before it opens mem-path; QEMU opens it first "
            "(creates it, and leaves it behind when the size is refused)", ERROR),
    same("object-add size as a string", CAPS, msg("object-add", {**RAM_ADD, "size": "4096"})),
    same("object-add size as a fraction", CAPS, msg("object-add", {**RAM_ADD, "size": 1.5})),
    same("object-add size 2^64", CAPS, msg("object-add", {**RAM_ADD, "size": 1 << 64})),
    same("object-add size true", CAPS, msg("object-add", {**RAM_ADD, "size": True})),
    same("object-add mem-path in no directory", CAPS, msg("object-add", FILE_ADD)),
    same("query-migrate before any migration", CAPS, msg("query-migrate")),
    same("migrate_cancel without a migration", CAPS, msg("migrate_cancel")),
    # Both fail at once and create nothing; QEMU on the truncate, migd before opening.
    differs("migrate to /dev/full", [CAPS, msg("migrate", {"uri": "file:/dev/full"})],
            f"{INTENDED}: migd asks for the mapped-ram capability first and saves only to "
            "regular files (QEMU: 'failed to truncate migration file to offset 0')",
            ERROR),
    differs("migrate to /dev/full with mapped-ram on",
            [CAPS, caps_of(("mapped-ram", True)), msg("migrate", {"uri": "file:/dev/full"})],
            f"{INTENDED}: both fail at once and create nothing; migd names the cause, 'is not "
            "a regular file (it is a character device)' (QEMU: 'failed to truncate migration "
            "file to offset 0: Invalid argument')", (3, "error", "desc")),
    same("query-fdsets", CAPS, msg("query-fdsets")),
    same("getfd without an fd", CAPS, msg("getfd", {"fdname": "a"})),
    same("closefd of an unknown name", CAPS, msg("closefd", {"fdname": "a"})),
    same("add-fd without an fd", CAPS, msg("add-fd", {"fdset-id": 1})),
    same("remove-fd of an unknown set", CAPS, msg("remove-fd", {"fdset-id": 9})),
    # Both answer in SchemaInfo format (tests/test_introspection.py reads migd's with QEMU's
    # own definition of it); the entities are each program's own commands.
    differs("query-qmp-schema", [CAPS, msg("query-qmp-schema")],
            f"{INTENDED}: migd describes its own commands and types", (REPLY,)),
    # Capabilities and parameters: tests/test_capabilities_parameters.py has the full table.
    same("query-migrate-capabilities", CAPS, msg("query-migrate-capabilities")),
    differs("query-migrate-parameters", [CAPS, msg("query-migrate-parameters")],
            f"{INTENDED}: migd's max-bandwidth default is 0 (unlimited), QEMU's 128 MiB/s "
            "would slow a save to disk tenfold",
            (REPLY, "return", "max-bandwidth")),
    same("a QEMU capability set to false", CAPS, caps_of(("xbzrle", False))),
    same("xbzrle with mapped-ram", CAPS, caps_of(("mapped-ram", True), ("xbzrle", True))),
    same("a parameter with no effect on a file save", CAPS,
         msg("migrate-set-parameters", {"downtime-limit": 100, "tls-creds": ""})),
    same("max-bandwidth 2^64", CAPS, msg("migrate-set-parameters", {"max-bandwidth": 1 << 64})),
    same("multifd-channels 0", CAPS, msg("migrate-set-parameters", {"multifd-channels": 0})),
    same("multifd-channels 256", CAPS, msg("migrate-set-parameters", {"multifd-channels": 256})),
    same("a nested member missing", CAPS, msg("migrate-set-capabilities",
         {"capabilities": [{"capability": "multifd"}]})),
    same("a nested member of the wrong type", CAPS, msg("migrate-set-capabilities",
         {"capabilities": [{"capability": "multifd", "state": 1}]})),
    same("unknown capability name", CAPS, caps_of(("nope", True))),
    # -- migrate's uri and channels (conformance review, session 14)
    same("migrate with uri null", CAPS, msg("migrate", {"uri": None})),
    same("migrate with channels null", CAPS, msg("migrate", {"channels": None})),
    same("migrate with detach null", CAPS, msg("migrate", {"uri": "gopher:x", "detach": None})),
    same("migrate with resume", CAPS,
         msg("migrate", {"uri": "file:/nonexistent/x", "resume": True})),
    same("migrate with resume and mapped-ram", CAPS, caps_of(("mapped-ram", True)),
         msg("migrate", {"uri": "file:/nonexistent/x", "resume": True})),
    same("migrate with resume null", CAPS, msg("migrate", {"uri": "gopher:x", "resume": None})),
    same("migrate-incoming with exit-on-error null", CAPS,
         msg("migrate-incoming", {"uri": "gopher:x", "exit-on-error": None})),
    same("object-add with share null", CAPS, msg("object-add", {**RAM_ADD, "share": None})),
    same("add-fd with fdset-id null", CAPS, msg("add-fd", {"fdset-id": None})),
    same("add-fd with opaque null", CAPS, msg("add-fd", {"opaque": None})),
    same("remove-fd with fd null", CAPS, msg("remove-fd", {"fdset-id": 9, "fd": None})),
    same("migrate with an empty channel list", CAPS, msg("migrate", {"channels": []})),
    same("migrate with two main channels", CAPS, msg("migrate", {"channels": [MAIN_FILE] * 2})),
    same("migrate into a directory", CAPS, caps_of(("mapped-ram", True)),
         msg("migrate", {"uri": "file:/tmp"})),
    same("migrate into a missing directory", CAPS, caps_of(("mapped-ram", True)),
         msg("migrate", {"uri": "file:/nonexistent/dir/x"})),
    same("migrate with a uri and an empty channel list", CAPS,
         msg("migrate", {"uri": "gopher:x", "channels": []})),
    # -- other transports: QEMU parses the address (socket_parse, inet_parse) before it
    # refuses a transport that cannot seek, so a malformed one is named as malformed.
    *[same(f"migrate to {uri}", CAPS, caps_of(("mapped-ram", True)), msg("migrate", {"uri": uri}))
      for uri in ("tcp:", "tcp:host", "tcp:h:", "tcp::", "tcp:[::1]", "tcp:[::1]:", "unix:",
                  "fd:", "vsock:1", "vsock:1:2,x", "rdma:h:1", "tcp:h:1,to=x",
                  "tcp:h:1,ipv4=x", "tcp:h:1,ipv4,,x", "tcp:h:1,keep-alive-count=5",
                  "tcp:h:1,ipv4=on,ipv6=off", "tcp:127.0.0.1:1", "unix:/x", "fd:1")],
    # -- channel addresses (round 10a): QEMU's visitor checks every transport's members
    # (MigrationAddress and SocketAddress are flat unions) before qmp_migrate refuses the
    # transport; the well-formed ones then get the seekable-transport refusal in both.
    *[same(f"migrate channel {json.dumps(addr)}", CAPS, caps_of(("mapped-ram", True)),
           msg("migrate", {"channels": [{"channel-type": "main", "addr": addr}]}))
      for addr in CHANNEL_ADDRS],
    *[differs(f"migrate-incoming channel {json.dumps(addr)}", [CAPS, caps_of(
          ("mapped-ram", True)), msg("migrate-incoming", {"channels": [
              {"channel-type": "main", "addr": addr}]})],
          f"{INTENDED}: migd restores without -incoming defer (QEMU: '-incoming' was not "
          "specified); a well-formed other transport is refused as not seekable",
          (3, "error", "desc"))
      for addr in WELL_FORMED],
    *[same(f"migrate-incoming channel {json.dumps(addr)}", CAPS, caps_of(("mapped-ram", True)),
           msg("migrate-incoming", {"channels": [{"channel-type": "main", "addr": addr}]}))
      for addr in CHANNEL_ADDRS if not _well_formed(addr)],
    same("migrate with a bad uri and a bad channel address", CAPS, msg("migrate", {
         "uri": 1, "channels": [{"channel-type": "main", "addr": INET_NO_PORT}]})),
    same("migrate with a bad channel address and a bad detach", CAPS, msg("migrate", {
         "detach": 1, "channels": [{"channel-type": "main", "addr": INET_NO_PORT}]})),
    same("migrate with a bad second channel address", CAPS, msg("migrate", {"channels": [
         MAIN_FILE, {"channel-type": "main", "addr": {"transport": "file", "filename": "x"}}]})),
    same("migrate with a well-formed socket main channel and a cpr one", CAPS, msg("migrate", {
         "channels": [{**MAIN_FILE, "channel-type": "cpr"}, {"channel-type": "main", "addr": {
             "transport": "socket", "type": "unix", "path": "/x"}}]})),
    # -- object-add's memory backend properties (round 10a): QEMU's types and checks, then
    # what migd does not do refused by name (docs/qemu-conformance.md, object-add)
    *[same(f"{add['qom-type']} {key}={json.dumps(value)}", CAPS, msg("object-add",
           {**add, key: value}), msg("object-del", {"id": add["id"]}))
      for add in (OPTS_RAM, OPTS_FILE) for key, value in BACKEND_OPTIONS
      if (key, value) not in MIGD_REFUSES or (add is OPTS_RAM and key != "reserve")],
    *[differs(f"{add['qom-type']} {key}={json.dumps(value)}", [CAPS, msg("object-add",
              {**add, key: value}), msg("object-del", {"id": add["id"]})],
              f"{INTENDED}: migd does not support '{key}' = {json.dumps(value)} (a QEMU "
              "backend can; the reason is in migd's text)", (REPLY,), (REPLY + 1,))
      for add in (OPTS_RAM, OPTS_FILE) for key, value in MIGD_REFUSES
      if add is OPTS_FILE or key == "reserve"],
    same("memory-backend-ram prealloc with reserve off", CAPS, msg("object-add",
         {**OPTS_RAM, "prealloc": True, "reserve": False})),
    # -- file: URIs as QEMU's file_parse_offset splits them: the first ",offset=" is the
    # option, every other comma is part of the name; the offset is a qemu_strtosz size.
    *[same(f"migrate to file:{rest}", CAPS, caps_of(("mapped-ram", True)),
           msg("migrate", {"uri": f"file:/nonexistent/{rest}"}))
      for rest in ("a,b", "a,x,offset=4096", "a,OFFSET=1", "a,offset=4k", "a,offset=1.5k",
                   "a,offset=+4096", "a,offset= 4096", "a,offset=1.5", "a,offset=0x1k",
                   "a,offset=-4096", "a,offset=18446744073709551616", "a,offset=16E")],
]  # fmt: skip


def _normalise(replies: list[Any]) -> list[Any]:
    """What must differ whoever answers: migd's package string and the micro release of
    the installed QEMU, QEMU's list orders, migd's members after QEMU's in query-memdev."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            out = {k: walk(v) for k, v in value.items()}
            if {"qemu", "package"} <= set(out) and isinstance(out["qemu"], dict):
                out["package"] = "PACKAGE"
                out["qemu"] = {**out["qemu"], "micro": 0}
            if {"merge", "dump", "host-nodes"} <= set(out):
                for member in MIGD_MEMDEV_MEMBERS:
                    out.pop(member, None)
            return out
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return [walk(r) for r in replies]


def _drop(replies: list[Any], path: tuple[Any, ...]) -> None:
    *parents, last = path
    target: Any = replies
    for key in parents:
        target = target[key]
    target[last] = "<differs>"


def _run(path: Path, messages: list[bytes]) -> list[Any]:
    """[greeting, one reply per message] on a new connection. The timeout is a bound on
    "at all": QEMU's monitor reads a socket one byte per main-loop turn, and took over 60 s
    to take the 9 MiB row's message on a loaded machine."""
    client = RawClient(path, timeout=300)
    try:
        replies: list[Any] = [client.greeting]
        for message in messages:
            client.send_raw(message)
            replies.append(client.recv())
        return replies
    finally:
        client.close()


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"QEMU exited with {proc.returncode}"
        assert time.monotonic() < deadline, "QEMU's QMP socket did not appear"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def sides() -> Iterator[tuple[Path, Path]]:
    """(QEMU's socket, migd's socket), each with one 4 MiB shared memory-backend-file."""
    sock_dir = Path(tempfile.mkdtemp(prefix="migd-diff-", dir="/tmp"))
    mem = Path(tempfile.mkdtemp(prefix="migd-diff-", dir="/dev/shm"))
    qemu_sock = sock_dir / "qemu.sock"
    backend = f"memory-backend-file,id=ram0,size=4M,mem-path={mem}/q0,share=on"
    args = ["-machine", "none", "-nodefaults", "-display", "none", "-object", backend]
    args += ["-qmp", f"unix:{qemu_sock},server=on,wait=off"]
    qemu = subprocess.Popen([QEMU_BINARY, *args], stdin=subprocess.DEVNULL)
    daemon = None
    try:
        daemon = start_daemon(sock_dir / "migd.sock")
        _wait_for(qemu_sock, qemu)
        client = RawClient(daemon.socket_path).negotiate()
        add = {"qom-type": "memory-backend-file", "id": "ram0", "size": 4 * MiB}
        assert client.execute("object-add", {**add, "mem-path": f"{mem}/m0"}) == {"return": {}}
        client.close()
        yield qemu_sock, daemon.socket_path
    finally:
        if daemon is not None:
            daemon.stop()
        qemu.kill()
        qemu.wait(10)
        shutil.rmtree(mem, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)
        Path(OPTS_PATH).unlink(missing_ok=True)


@pytest.mark.parametrize(("name", "messages", "difference"), ROWS, ids=[r[0] for r in ROWS])
def test_migd_answers_as_qemu_does(sides, name, messages, difference):
    qemu_sock, migd_sock = sides
    qemu = _normalise(_run(qemu_sock, messages))
    migd = _normalise(_run(migd_sock, messages))
    if messages:  # the greeting is compared in its own row
        qemu[0] = migd[0] = "greeting"
    if difference is None:
        assert migd == qemu
        return
    assert migd != qemu, f"{name} now matches QEMU: remove its Difference ({difference.reason})"
    for path in difference.paths:
        _drop(qemu, path)
        _drop(migd, path)
    assert migd == qemu, f"{name} differs beyond {difference.paths}"


def test_every_difference_has_a_reason():
    for name, _, difference in ROWS:
        if difference is not None:
            assert difference.reason and difference.paths, name
