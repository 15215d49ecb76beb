"""Refused requests are logged (client, command, QMP's class and text), at a bounded rate."""

from __future__ import annotations

import logging

import pytest
from qemu.qmp import ExecuteError

from migd.qmp import refusals

LOGGER = "migd.qmp.refusals"


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


async def test_a_refused_command_is_logged_with_its_client_and_error(
    migd_inproc, qmp, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator whose management application says only "operation failed" finds the
    command and migd's answer in the log (before: nothing at any level)."""
    with caplog.at_level(logging.INFO, logger=LOGGER):
        await qmp.execute("query-jobs")  # answered: not logged
        with pytest.raises(ExecuteError):
            await qmp.execute("object-del", {"id": "no-such-backend"})
        with pytest.raises(ExecuteError):
            await qmp.execute("no-such-command")
    lines = refusal_lines(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("client ") and "'object-del' refused: GenericError:" in lines[0]
    assert "no-such-backend" in lines[0]
    assert "'no-such-command' refused: CommandNotFound:" in lines[1]


async def test_a_command_name_with_a_newline_is_logged_on_one_line(
    migd_inproc, qmp, caplog: pytest.LogCaptureFixture
) -> None:
    """The client chooses the name: a newline in it would start a log line of its own."""
    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(ExecuteError):
        await qmp.execute("bogus\nclient 1: 'cont' refused: forged")
    (line,) = refusal_lines(caplog)
    assert "\n" not in line and "bogus\\nclient 1" in line


async def test_a_flood_of_refused_requests_is_logged_at_most_limit_lines_then_counted(
    migd_inproc, qmp, caplog: pytest.LogCaptureFixture
) -> None:
    """A client looping on a refused request cannot flood the log: LIMIT lines per window,
    then one line that counts the rest (said when the window ends, here at shutdown)."""
    extra = 7
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(refusals.LIMIT + extra):
            with pytest.raises(ExecuteError):
                await qmp.execute("object-del", {"id": "nope"})
        assert len(refusal_lines(caplog)) == refusals.LIMIT
        migd_inproc.daemon.server.refusals.close()
    lines = refusal_lines(caplog)
    assert len(lines) == refusals.LIMIT + 1
    assert lines[-1].startswith(f"{extra} more refused requests in ")


async def test_the_count_of_what_was_left_out_is_said_when_the_window_ends() -> None:
    """Without a later refusal or a shutdown, the window's end says it (a timer)."""
    now = [0.0]
    log = refusals.RefusalLog(clock=lambda: now[0])
    for _ in range(refusals.LIMIT + 1):
        log.refused(1, "cont", {"class": "GenericError", "desc": "x"})
    timer = log._summary
    assert timer is not None and not timer.cancelled()
    # A refusal a window later starts a new window, which first says what was left out.
    now[0] = refusals.WINDOW
    log.refused(1, "cont", {"class": "GenericError", "desc": "x"})
    assert timer.cancelled() and log._summary is None and log._left_out == 0
    assert log._logged == 1
