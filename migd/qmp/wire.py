"""The QMP wire: message framing, envelopes and the single exception -> reply mapping."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest, MigdError

MAX_MESSAGE_BYTES = 1 << 20
# QEMU's JSON parser refuses deeper nesting; it also keeps json.loads off the recursion limit.
MAX_NESTING = 1024

_INTERESTING = re.compile(rb'[{}\[\]"\\\n]')


class MessageTooLarge(Exception):
    """The peer sent a message over MAX_MESSAGE_BYTES; the connection is closed after the reply.

    `before` holds the complete messages that preceded it in the same read.
    """

    def __init__(self, before: list[bytes]) -> None:
        super().__init__("QMP message exceeds 1 MiB")
        self.before = before


class MessageSplitter:
    """Cuts a byte stream into top-level JSON texts, as QEMU's JSON streamer does.

    Messages need no separator: a text ends when its outermost brace or bracket closes.
    Anything at depth 0 that is not whitespace ends at the next newline, so garbage
    is reported (as a parse error) instead of waiting forever.
    """

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already scanned
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete texts they finish, in order."""
        self._buf += data
        out: list[bytes] = []
        pos = self._scan
        while True:
            if self._in_string:
                pos = self._skip_string(pos)
                if self._in_string:
                    break
                continue
            m = _INTERESTING.search(self._buf, pos)
            if m is None:
                pos = len(self._buf)
                break
            ch = m.group()
            pos = m.end()
            if ch == b'"':
                self._in_string = True
            elif ch in (b"{", b"["):
                self._depth += 1
            elif ch in (b"}", b"]"):
                self._depth -= 1
                if self._depth <= 0:
                    if pos > self._limit:
                        self._reset()
                        raise MessageTooLarge(out)
                    out.append(self._cut(pos))
                    pos = 0
            elif ch == b"\n" and self._depth == 0:
                text = self._cut(pos)
                pos = 0
                if text.strip():
                    out.append(text)
        self._scan = pos
        if len(self._buf) > self._limit:
            self._reset()
            raise MessageTooLarge(out)
        return out

    def _reset(self) -> None:
        self._buf.clear()
        self._scan = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def _skip_string(self, pos: int) -> int:
        buf = self._buf
        n = len(buf)
        if self._escaped:
            if pos >= n:
                return pos
            self._escaped = False
            pos += 1
        while pos < n:
            q = buf.find(b'"', pos)
            b = buf.find(b"\\", pos)
            if q < 0 and b < 0:
                return n
            if b >= 0 and (q < 0 or b < q):
                if b + 1 >= n:
                    self._escaped = True
                    return n
                pos = b + 2
                continue
            self._in_string = False
            return q + 1
        return pos

    def _cut(self, end: int) -> bytes:
        text = bytes(self._buf[:end])
        del self._buf[:end]
        self._depth = 0
        self._in_string = False
        self._escaped = False
        return text


@dataclass
class Request:
    """A decoded command: `has_id` tells an absent id from an explicit null."""

    execute: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False


_REQUEST_MEMBERS = {"execute", "arguments", "id"}


def _nesting_depth(text: bytes) -> int:
    depth = best = 0
    for m in re.finditer(rb'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]', text):
        tok = m.group()
        if tok in (b"[", b"{"):
            depth += 1
            best = max(best, depth)
        elif tok in (b"]", b"}"):
            depth -= 1
    return best


def _has_nul(value: Any) -> bool:
    """QEMU's parser refuses NUL in strings; paths and names with one cannot work anyway."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def decode_request(text: bytes) -> Request:
    """Decode one framed text into a Request; InvalidRequest carries QEMU's text.

    The id of an object is recovered before any other check so errors can echo it.
    """
    if _nesting_depth(text) > MAX_NESTING:
        raise InvalidRequest("JSON parse error, nesting too deep")
    try:
        msg = json.loads(text)
    except UnicodeDecodeError:
        raise InvalidRequest("JSON parse error, invalid UTF-8 sequence") from None
    except (ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise InvalidRequest(f"JSON parse error, {reason.lower()}") from None
    if not isinstance(msg, dict):
        raise InvalidRequest("QMP input must be a JSON object")
    req = Request(execute="", arguments={}, id=msg.get("id"), has_id="id" in msg)
    try:
        if "execute" not in msg:
            if "exec-oob" in msg:
                raise InvalidRequest("QMP input member 'exec-oob' is unexpected")
            raise InvalidRequest("QMP input lacks member 'execute'")
        for key in msg:
            if key not in _REQUEST_MEMBERS:
                raise InvalidRequest(f"QMP input member '{key}' is unexpected")
        if not isinstance(msg["execute"], str):
            raise InvalidRequest("QMP input member 'execute' must be a string")
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            raise InvalidRequest("QMP input member 'arguments' must be an object")
        if _has_nul(msg["execute"]) or _has_nul(args):
            raise InvalidRequest("JSON parse error, \\u0000 is not supported")
    except InvalidRequest as exc:
        exc.request = req  # type: ignore[attr-defined]
        raise
    req.execute = msg["execute"]
    req.arguments = args
    return req


def return_reply(value: Any, req: Request | None) -> dict[str, Any]:
    reply: dict[str, Any] = {"return": value}
    if req is not None and req.has_id:
        reply["id"] = req.id
    return reply


def error_reply(exc: BaseException, req: Request | None) -> dict[str, Any]:
    """The one place where an exception becomes a wire error."""
    if isinstance(exc, MigdError):
        error = {"class": exc.qmp_class, "desc": exc.desc}
    else:
        # An unexpected bug: say so without leaking a traceback onto the wire.
        error = {"class": "GenericError", "desc": f"Internal error: {type(exc).__name__}: {exc}"}
    reply: dict[str, Any] = {"error": error}
    if req is not None and req.has_id:
        reply["id"] = req.id
    return reply


def event_message(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    now = time.time()
    seconds = int(now)
    msg: dict[str, Any] = {"event": name}
    if data:
        msg["data"] = data
    msg["timestamp"] = {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}
    return msg


def greeting(major: int, minor: int, micro: int, package: str) -> dict[str, Any]:
    version = {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": package}
    return {"QMP": {"version": version, "capabilities": []}}


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(", ", ": ")).encode() + b"\r\n"
