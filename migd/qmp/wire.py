"""The QMP wire: message framing, envelopes and the single exception -> reply mapping."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest, MigdError

# The largest message migd reads. QEMU's own bound is 64 MiB of tokens; a request migd
# understands is a few hundred bytes, and QEMU clients send lines of a few MiB at most (an
# add-fd opaque, a long id). A message over the bound, or over MAX_TOKENS values, is refused
# with QEMU's text while it streams in, its remaining bytes discarded, and the connection
# kept. That bounds what one request costs: its text (and the copy json.loads decodes) plus
# at most MAX_TOKENS Python objects, under 48 MiB at the worst (tests/test_qmp_wire.py).
MAX_MESSAGE_BYTES = 8 << 20
# Containers plus commas of one message: the number of values json.loads can make of it
# (a value costs up to 70 bytes as a Python object, 26 times its text for `[],`).
MAX_TOKENS = 1 << 17
# QEMU's JSON streamer refuses deeper nesting (MAX_NESTING).
MAX_NESTING = 1024

# QEMU's texts (qobject/json-streamer.c), sent without an id, as QEMU sends them.
TOKEN_SIZE_EXCEEDED = "JSON token size limit exceeded"
TOKEN_COUNT_EXCEEDED = "JSON token count limit exceeded"
NESTING_EXCEEDED = "JSON nesting depth limit exceeded"

_INTERESTING = re.compile(rb'[{}\[\]",\\\n]')


@dataclass(frozen=True)
class Refused:
    """A message the splitter refused as it streamed in (`desc` is QEMU's error text);
    the rest of it is discarded unread."""

    desc: str


class MessageSplitter:
    """Cuts a byte stream into top-level JSON texts, as QEMU's JSON streamer does.

    Messages need no separator: a text ends when its outermost brace or bracket closes.
    Anything at depth 0 that is not whitespace ends at the next newline, so garbage
    is reported (as a parse error) instead of waiting forever.

    A message over `limit` bytes, MAX_TOKENS values or MAX_NESTING levels becomes one
    Refused at the moment it crosses the bound; the splitter then keeps only its place in
    the message (depth, inside a string or not) and drops the bytes until the message
    ends, so a peer streaming an endless message costs no memory, and the next message
    is read as usual.
    """

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already scanned
        self._depth = 0
        self._tokens = 0
        self._in_string = False
        self._escaped = False
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | Refused]:
        """Add received bytes; return the texts they finish and the refusals, in order."""
        self._buf += data
        out: list[bytes | Refused] = []
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
            elif ch == b",":
                self._count_token(out)
            elif ch in (b"{", b"["):
                self._depth += 1
                self._count_token(out)
                if self._depth > MAX_NESTING:
                    self._refuse(out, NESTING_EXCEEDED)
            elif ch in (b"}", b"]"):
                self._depth -= 1
                if self._depth <= 0:
                    self._end(pos, out)
                    pos = 0
            elif ch == b"\n" and self._depth == 0:
                self._end(pos, out, top_level=True)
                pos = 0
        if not self._discarding and len(self._buf) > self._limit:
            self._refuse(out, TOKEN_SIZE_EXCEEDED)
        if self._discarding:
            del self._buf[:pos]
            pos = 0
        self._scan = pos
        return out

    @property
    def buffered(self) -> int:
        """Bytes held for the message in progress (a refused one holds none)."""
        return len(self._buf)

    def _count_token(self, out: list[bytes | Refused]) -> None:
        self._tokens += 1
        if self._tokens > MAX_TOKENS:
            self._refuse(out, TOKEN_COUNT_EXCEEDED)

    def _refuse(self, out: list[bytes | Refused], desc: str) -> None:
        if not self._discarding:
            out.append(Refused(desc))
            self._discarding = True

    def _end(self, end: int, out: list[bytes | Refused], top_level: bool = False) -> None:
        """The message (or top-level garbage line) ends at `end`: hand it out or drop it."""
        if not self._discarding and end > self._limit:
            self._refuse(out, TOKEN_SIZE_EXCEEDED)
        if self._discarding:
            del self._buf[:end]
        else:
            text = bytes(self._buf[:end])
            del self._buf[:end]
            if not top_level or text.strip():
                out.append(text)
        self._depth = 0
        self._tokens = 0
        self._in_string = False
        self._escaped = False
        self._discarding = False

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


@dataclass
class Request:
    """A decoded command: `has_id` tells an absent id from an explicit null."""

    execute: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False


_REQUEST_MEMBERS = {"execute", "arguments", "id"}


def _too_deep(text: bytes) -> bool:
    """Nested over MAX_NESTING? The server's splitter has refused such texts already; this
    is for other callers. Cheap for the usual text (two counts in C); no regex, whose
    backtracking over a long string takes 100 times its size in memory."""
    if text.count(b"[") + text.count(b"{") <= MAX_NESTING:
        return False
    return Refused(NESTING_EXCEEDED) in MessageSplitter(limit=len(text)).feed(text)


def _strings(value: Any) -> Iterator[str]:
    """Every string of a decoded JSON value, keys included."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _has_nul(value: Any) -> bool:
    """QEMU's parser refuses NUL in strings; paths and names with one cannot work anyway."""
    return any("\x00" in item for item in _strings(value))


# QEMU's texts (qobject/json-parser.c) where Python's parser finds the same fault.
INVALID_UTF8 = "invalid UTF-8 sequence in string"
_QEMU_REASONS = {
    "Invalid \\escape": "invalid escape sequence in string",
    "Expecting ':' delimiter": "missing : in object pair",
}
_KEYWORD = re.compile(r"(?<![^\s\[{,:])[a-z]+")  # a run of letters that starts a token
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


class _NotJson(ValueError):
    """A token json.loads takes that JSON (and QEMU) does not: NaN, Infinity, 1e999."""


def _refuse_constant(name: str) -> float:
    # QEMU's lexer stops at the first letter it cannot start a token with ('-I', 'N').
    raise _NotJson(f"stray '{name[:2] if name.startswith('-') else name[0]}'")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # QEMU echoes such a number back as 'inf', which no JSON parser reads: refuse it.
        raise _NotJson(f"number '{text}' is out of range")
    return value


def _bounded_int(text: str) -> int:
    # Python refuses to convert more than 4300 digits, in words of its own; such a number
    # is beyond a double too (as QEMU reads an integer that fits no 64-bit type): the
    # same refusal as 1e999. Short of that, the command's schema says what it takes.
    if len(text.lstrip("-")) > _MAX_DOUBLE_DIGITS:
        raise _NotJson(f"number '{text[:24]}...' is out of range")
    return int(text)


_MAX_DOUBLE_DIGITS = 309  # digits of the largest finite double (1.8e308)


def _innermost_container(source: str, pos: int) -> str:
    """'{' or '[': the container open at pos (strings skipped), for QEMU's 'in dict/list'."""
    stack: list[str] = []
    for token in re.finditer(r'[\[\]{}]|"', _STRING.sub('""', source[:pos])):
        char = token.group()
        if char in "[{":
            stack.append(char)
        elif char in "]}" and stack:
            stack.pop()
    return stack[-1] if stack else "{"


def _parse_error_reason(source: str, exc: ValueError | RecursionError) -> str:
    """QEMU's words for a parse error where migd can tell which it is, else Python's."""
    if isinstance(exc, _NotJson):
        return str(exc)
    if not isinstance(exc, json.JSONDecodeError):
        return str(exc).lower()
    if exc.msg in _QEMU_REASONS:
        return _QEMU_REASONS[exc.msg]
    if exc.msg == "Expecting ',' delimiter":
        kind = "dict" if _innermost_container(source, exc.pos) == "{" else "list"
        return f"expected separator in {kind}"
    if exc.msg == "Expecting property name enclosed in double quotes":
        # '{"a": 1, }' in QEMU's parser is a missing value; '{1: 2}' a key of another type.
        if source[exc.pos : exc.pos + 1] == "}":
            return "expecting value"
        return "key is not a string in object"
    # A bare word that is not a keyword ('aaa', 'truex'): QEMU's lexer reads the whole
    # run of letters as one keyword token and names it.
    start = len(source[: exc.pos].rstrip("abcdefghijklmnopqrstuvwxyz"))
    word = _KEYWORD.match(source, start)
    if word is not None and word.group() not in ("true", "false", "null"):
        return f"invalid keyword '{word.group()}'"
    return exc.msg.lower()


def _lone_surrogate(value: Any) -> str | None:
    """A \\udXXX escape that is not half of a pair: json.loads keeps it, QEMU refuses it."""
    for item in _strings(value):
        if not item.isascii():
            found = _SURROGATE.search(item)
            if found:
                return found.group()
    return None


_SURROGATE = re.compile("[\\ud800-\\udfff]")


class _DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey
    return obj


# json.loads recurses once per nesting level and counts against the interpreter's
# recursion limit (1000 by default, less the frames below it): raise it so that the
# MAX_NESTING levels QEMU accepts decode, with room for the frames of the event loop.
sys.setrecursionlimit(max(sys.getrecursionlimit(), MAX_NESTING + 1000))


def decode_request(text: bytes) -> Request:
    """Decode one framed text into a Request; InvalidRequest carries QEMU's text.

    The id of an object is recovered before any other check so errors can echo it. As
    in QEMU, a duplicate key anywhere makes the whole text a parse error (with no id).
    """
    if _too_deep(text):
        raise InvalidRequest(NESTING_EXCEEDED)
    try:
        # Strict UTF-8: json.loads of bytes would let encoded surrogates through.
        source = text.decode()
    except UnicodeDecodeError:
        raise InvalidRequest(f"JSON parse error, {INVALID_UTF8}") from None
    try:
        msg = json.loads(
            source,
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except _DuplicateKey:
        raise InvalidRequest("JSON parse error, duplicate key") from None
    except (ValueError, RecursionError) as exc:
        reason = _parse_error_reason(source, exc)
        raise InvalidRequest(f"JSON parse error, {reason}") from None
    surrogate = _lone_surrogate(msg)
    if surrogate is not None:
        raise InvalidRequest(
            f"JSON parse error, \\u{ord(surrogate):04x} is not a valid Unicode character"
        )
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
        exc.request = req
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


def _without_lone_surrogates(value: Any) -> Any:
    """A copy of a JSON value whose strings have each lone surrogate replaced by U+FFFD.
    A file's name as the kernel gives it (os.readlink of a passed fd, in an error text)
    keeps each byte that is not UTF-8 as a lone surrogate, which json.dumps writes as an
    escape like \\udcff: JSON that QEMU's parser, and migd's own (decode_request),
    refuse (red-team, session 16). QEMU's JSON writer puts U+FFFD for such bytes."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    return value


def encode(msg: dict[str, Any]) -> bytes:
    # allow_nan=False: a reply is JSON or an error here, never NaN or Infinity on the wire.
    text = json.dumps(msg, separators=(", ", ": "), allow_nan=False)
    if "\\ud" in text:  # a surrogate, maybe lone (a pair is a character beyond U+FFFF)
        text = json.dumps(_without_lone_surrogates(msg), separators=(", ", ": "), allow_nan=False)
    return text.encode() + b"\r\n"
