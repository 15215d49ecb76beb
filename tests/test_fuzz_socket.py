"""Arbitrary bytes thrown at the socket never take the daemon down."""

from __future__ import annotations

import contextlib
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import RawClient

json_ish = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _throw(path, payload: bytes) -> None:
    """Send `payload` on a new connection, end it, and read until migd closes its side:
    migd reads to the end of a connection before it closes it, so by then it has handled
    every byte. A migd that hangs on the bytes fails here, by the socket's timeout."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):  # the greeting and any replies, then EOF
                pass
    finally:
        s.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(max_size=4096) | json_ish.map(lambda v: repr(v).encode()))
def test_arbitrary_bytes_never_crash_the_daemon_and_the_next_client_is_served(daemon, payload):
    _throw(daemon.socket_path, payload)
    client = RawClient(daemon.socket_path).negotiate()
    try:
        assert client.execute("query-version")["return"]["package"].startswith("migd ")
    finally:
        client.close()
    assert daemon.proc.poll() is None


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(execute=st.text(max_size=30), arguments=json_ish, ident=json_ish)
def test_random_commands_get_a_reply_each_and_the_next_client_works(
    daemon, execute, arguments, ident
):
    client = RawClient(daemon.socket_path).negotiate()
    try:
        client.send({"execute": execute, "arguments": arguments, "id": ident})
        reply = client.recv()
        assert ("return" in reply) or ("error" in reply)
    finally:
        client.close()
    following = RawClient(daemon.socket_path)
    try:
        assert following.execute("qmp_capabilities") == {"return": {}}
    finally:
        following.close()
