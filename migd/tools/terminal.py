"""Text fit for a terminal: what migd prints never carries a control sequence.

Error texts and fields can hold strings from a file (a block name, a machine type) or
from the daemon (a job's error-desc naming a file a client chose): printed raw, an ESC
in one could clear the screen, rewrite earlier lines or set the window title (red-team,
sessions 13 and 14). Escaping at each print missed some, so the CLI's own stdout and
stderr escape every control character but tab, newline and carriage return (tqdm's bar
redraws with \\r) as its Python escape, and lone surrogates (from undecodable bytes,
which would make the print itself fail) likewise.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO, cast

_KEPT = {"\t", "\n", "\r"}
_ESCAPES: dict[int, str] = {
    code: f"\\x{code:02x}"
    for code in [*range(0x20), 0x7F, *range(0x80, 0xA0)]
    if chr(code) not in _KEPT
}
_ESCAPES.update({code: f"\\u{code:04x}" for code in range(0xD800, 0xE000)})


def safe_text(text: str) -> str:
    """`text` with control characters (but tab, newline, CR) and lone surrogates escaped."""
    return text.translate(_ESCAPES)


def shown(value: object) -> str:
    """A single-line field from a file: every character that is not printable, newlines
    too, as its Python escape."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _unless_gone(action: Callable[[], object]) -> None:
    """A terminal that hung up (EIO) or a reader gone (EPIPE) must not stop a client
    cleaning up after SIGHUP: what it says is lost, what it undoes is not."""
    try:
        action()
    except OSError as exc:
        if exc.errno not in (errno.EIO, errno.EPIPE):
            raise


class SafeStream:
    """A text stream that writes `safe_text` of everything to the stream it wraps."""

    def __init__(self, stream: TextIO) -> None:
        self.wrapped = stream

    def write(self, text: str) -> int:
        _unless_gone(lambda: self.wrapped.write(safe_text(text)))
        return len(text)

    def flush(self) -> None:
        _unless_gone(self.wrapped.flush)

    def writelines(self, lines: Iterator[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self.wrapped, name)


def write_control(stream: TextIO, sequence: str) -> None:
    """A control sequence migd means to send (`migd jobs --watch` clears the screen),
    past the escaping of a SafeStream."""
    target = stream.wrapped if isinstance(stream, SafeStream) else stream
    _unless_gone(lambda: target.write(sequence))


@contextlib.contextmanager
def safe_output() -> Iterator[None]:
    """sys.stdout and sys.stderr as SafeStreams for the duration (the CLI's whole run)."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, SafeStream):
        sys.stdout = cast(TextIO, SafeStream(sys.stdout))
    if not isinstance(sys.stderr, SafeStream):
        sys.stderr = cast(TextIO, SafeStream(sys.stderr))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
