"""Unit checks of the JSON framing: where one message ends and the next begins."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migd.errors import InvalidRequest
from migd.qmp.wire import MessageSplitter, MessageTooLarge, decode_request


def test_strings_with_braces_and_escapes_do_not_end_a_message():
    s = MessageSplitter()
    assert s.feed(b'{"a": "}\\"{"') == []
    assert s.feed(b"}") == [b'{"a": "}\\"{"}']


def test_garbage_at_top_level_ends_at_newline():
    assert MessageSplitter().feed(b"hello\n{}") == [b"hello\n", b"{}"]


def test_whitespace_between_messages_is_ignored():
    assert MessageSplitter().feed(b' \n {"x": 1} \r\n ') == [b' {"x": 1}']


def test_limit_counts_a_message_that_never_closes():
    s = MessageSplitter(limit=100)
    with pytest.raises(MessageTooLarge):
        s.feed(b"[" * 101)
    assert s.feed(b"{}") == [b"{}"]


def test_deep_nesting_is_a_parse_error_not_a_crash():
    with pytest.raises(InvalidRequest, match="nesting too deep"):
        decode_request(b"[" * 5000 + b"]" * 5000)


@given(
    st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3), max_size=5),
    st.integers(1, 7),
)
def test_any_chunking_of_a_message_sequence_yields_the_same_messages(objs, chunk):
    import json

    stream = b"".join(json.dumps(o).encode() for o in objs)
    s = MessageSplitter()
    got = []
    for i in range(0, len(stream), chunk):
        got += s.feed(stream[i : i + chunk])
    assert [json.loads(t) for t in got] == objs
