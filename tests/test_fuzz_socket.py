"""Arbitrary bytes thrown at the socket never take the daemon down."""

from __future__ import annotations

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
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    try:
        s.sendall(payload)
    except OSError:
        pass
    finally:
        s.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(max_size=4096) | json_ish.map(lambda v: repr(v).encode()))
def test_arbitrary_bytes_never_crash_the_daemon(daemon, payload):
    _throw(daemon.socket_path, payload)
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
    assert "return" in RawClient(daemon.socket_path).execute("qmp_capabilities")
