"""Unit checks of the JSON framing: where one message ends and the next begins."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migd.errors import InvalidRequest
from migd.qmp.wire import (
    MAX_MESSAGE_BYTES,
    MAX_NESTING,
    MAX_TOKENS,
    MessageSplitter,
    Refused,
    decode_request,
)


def test_strings_with_braces_and_escapes_do_not_end_a_message():
    s = MessageSplitter()
    assert s.feed(b'{"a": "}\\"{"') == []
    assert s.feed(b"}") == [b'{"a": "}\\"{"}']


def test_garbage_at_top_level_ends_at_newline():
    assert MessageSplitter().feed(b"hello\n{}") == [b"hello\n", b"{}"]


def test_whitespace_between_messages_is_ignored():
    assert MessageSplitter().feed(b' \n {"x": 1} \r\n ') == [b' {"x": 1}']


def test_a_message_over_the_limit_is_refused_once_and_the_next_one_is_read():
    s = MessageSplitter(limit=100)
    assert s.feed(b"[" * 101) == [Refused("JSON token size limit exceeded")]
    assert s.buffered == 0
    assert s.feed(b"]" * 101 + b"{}") == [b"{}"]


def test_an_endless_message_is_discarded_as_it_streams_in():
    """Memory stays bounded by one read, however long the message, and the message's
    end is still found: braces inside its strings do not end it."""
    s = MessageSplitter(limit=1000)
    assert s.feed(b'{"execute": "x", "arguments": {"a": "') == []
    refusals = []
    for _ in range(500):
        refusals += s.feed(b'} ] { \\" still inside the string ' + b"x" * 200)
        assert s.buffered == (0 if refusals else s.buffered) <= 1000
    assert refusals == [Refused("JSON token size limit exceeded")]
    assert s.feed(b'\\"} "}}{"execute": "next"}') == [b'{"execute": "next"}']


def test_top_level_garbage_over_the_limit_is_discarded_up_to_its_newline():
    s = MessageSplitter(limit=100)
    assert s.feed(b"a" * 150) == [Refused("JSON token size limit exceeded")]
    assert s.feed(b"b" * 150 + b"\n{}") == [b"{}"]


def test_a_complete_message_over_the_limit_in_one_read_is_refused():
    s = MessageSplitter(limit=100)
    text = b'{"a": "' + b"x" * 200 + b'"}'
    assert s.feed(b"{}" + text + b"[]") == [b"{}", Refused("JSON token size limit exceeded"), b"[]"]


def test_the_default_limit_takes_a_line_qemu_takes_and_refuses_one_over_it():
    line = b'{"execute": "query-version", "id": "' + b"x" * (2 << 20) + b'"}'
    assert MessageSplitter().feed(line) == [line]
    assert 2 * len(line) <= MAX_MESSAGE_BYTES
    over = b'{"id": "' + b"x" * MAX_MESSAGE_BYTES + b'"}'
    assert MessageSplitter().feed(over) == [Refused("JSON token size limit exceeded")]


def test_too_many_values_are_refused_with_qemus_token_count_text():
    s = MessageSplitter()
    many = b"[" + b"[]," * MAX_TOKENS + b"0]"
    assert s.feed(many + b"{}") == [Refused("JSON token count limit exceeded"), b"{}"]
    assert s.feed(b"[" + b"0," * (MAX_TOKENS - 2) + b"0]") != []  # just under: a message


def test_nesting_over_qemus_bound_is_refused_once_with_qemus_text():
    s = MessageSplitter()
    deep = b"[" * (MAX_NESTING + 1) + b"]" * (MAX_NESTING + 1)
    assert s.feed(deep + b"{}") == [Refused("JSON nesting depth limit exceeded"), b"{}"]


def test_qemus_deepest_nesting_decodes():
    text = b"[" * MAX_NESTING + b"]" * MAX_NESTING
    assert MessageSplitter().feed(text) == [text]
    with pytest.raises(InvalidRequest, match=r"^QMP input must be a JSON object$"):
        decode_request(text)


def test_deep_nesting_is_a_parse_error_not_a_crash():
    with pytest.raises(InvalidRequest, match=r"^JSON nesting depth limit exceeded$"):
        decode_request(b"[" * 5000 + b"]" * 5000)


@pytest.mark.parametrize(
    "text",
    [
        b'{"execute": "query-version", "execute": "query-version"}',
        b'{"execute": "query-version", "id": 1, "id": 2}',
        b'{"execute": "x", "arguments": {"a": 1, "a": 1}}',
        b'{"execute": "x", "arguments": {"b": [{"c": 1, "c": 2}]}, "id": 3}',
    ],
)
def test_a_duplicate_key_anywhere_is_qemus_parse_error_without_an_id(text):
    with pytest.raises(InvalidRequest, match=r"^JSON parse error, duplicate key$") as info:
        decode_request(text)
    assert getattr(info.value, "request", None) is None  # the reply carries no id


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


# QEMU 10's texts for the same faults (tests/test_qemu_differential.py compares them live).
@pytest.mark.parametrize(
    ("text", "desc"),
    [
        (b"aaa\n", "invalid keyword 'aaa'"),
        (b"truex\n", "invalid keyword 'truex'"),
        (b'{"execute": nul}', "invalid keyword 'nul'"),
        (b'{"execute": "q", "id": "\\x"}', "invalid escape sequence in string"),
        (b'{"execute": "q", "id": "\xc3("}', "invalid UTF-8 sequence in string"),
        (b'{"execute": "q", "id": "\xed\xa0\x80"}', "invalid UTF-8 sequence in string"),
        (b'{"execute": "q", "id": "\\ud800"}', "\\ud800 is not a valid Unicode character"),
        (
            b'{"execute": "q", "arguments": {"\\udfff": 1}}',
            "\\udfff is not a valid Unicode character",
        ),
    ],
)
def test_parse_errors_are_worded_as_qemu_words_them(text, desc):
    with pytest.raises(InvalidRequest) as info:
        decode_request(text)
    assert info.value.desc == f"JSON parse error, {desc}"


def test_a_surrogate_pair_and_a_number_with_a_letter_are_not_keywords():
    assert decode_request(b'{"execute": "q", "id": "\\ud83d\\ude00"}').id == "\U0001f600"
    with pytest.raises(InvalidRequest) as info:
        decode_request(b'{"execute": 1e}')
    assert "keyword" not in info.value.desc
