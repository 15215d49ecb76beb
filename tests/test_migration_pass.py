"""MIGRATION_PASS and query-migrate's members per status, as QEMU 10 shows them (issue 15
item 8): the same save, cancel and failure run against migd and, when installed, QEMU.

QEMU's source side (migration.c fill_source_migration_info) shows only the status in
setup and once cancelled, the status and error-desc once failed, the times,
expected-downtime and ram while active or cancelling, the times, downtime and ram once
completed. A stopped save is one RAM pass plus the final sync: MIGRATION_PASS 1 before
`active` and 2 at the switchover, dirty-sync-count 1 then 2.

Differences kept on purpose (the QEMU tests below check them as differences):
* QEMU goes through a `device` status before `completed`; migd has no device state to
  save, and no such status.
* QEMU emits MIGRATION `failed` twice for a failed file save; migd once.
* A restore: QEMU's incoming side reports only its status; migd also reports its times
  and ram (progress of the restore), and emits no MIGRATION_PASS, as QEMU's incoming side.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    FINAL_STATES,
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    poll_until,
    restore,
    save,
    wait_migration,
)
from .qapi_schema import Schema
from .qemu_vm import QemuVM, requires_qemu
from .test_interop_qemu import none_machine_args

MiB = 1 << 20
SIZE = 24 * MiB
EVENTS = ("MIGRATION", "MIGRATION_PASS")
ACTIVE_KEYS = {"status", "total-time", "setup-time", "expected-downtime", "ram"}
COMPLETED_KEYS = {"status", "total-time", "setup-time", "downtime", "ram"}


def _name(event: dict[str, Any]) -> str:
    data = event["data"]
    return f"pass {data['pass']}" if event["event"] == "MIGRATION_PASS" else data["status"]


async def _run(client: Any, uri: str, cancel: bool = False, extra: bool = False) -> dict[str, Any]:
    """Start a save, optionally cancel it once active; the events, the infos seen."""
    seen: dict[str, Any] = {}
    with client.listener(EVENTS) as listener:
        await client.execute("migrate", {"uri": uri})
        if cancel:
            seen["active"] = await poll_until(
                lambda: client.execute("query-migrate"),
                lambda i: i["status"] != "setup",
                "the save active",
            )
            await client.execute("migrate_cancel")
        seen["final"] = await wait_migration(client)
        # The final MIGRATION event comes after the status it reports is set.
        names: list[str] = []
        while not names or names[-1] not in FINAL_STATES:
            names.append(_name(await asyncio.wait_for(listener.get(), 30)))
        if extra:  # QEMU's second `failed`
            names.append(_name(await asyncio.wait_for(listener.get(), 30)))
        # migd emits before it answers: anything more would be queued by now.
        await client.execute("query-migrate")
        assert listener.empty(), "more events after the final one"
    seen["events"] = names
    return seen


async def _migd_ready(qmp: Any, shm: Path, bandwidth: int = 0) -> None:
    fill_random(shm / "ram0", SIZE)
    await add_file_backend(qmp, "ram0", shm / "ram0", SIZE)
    await enable_mapped_ram(qmp, channels=2, events=True, **{"max-bandwidth": bandwidth})


def _qemu(shm: Path, sock_dir: Path) -> QemuVM:
    fill_random(shm / "qram0", SIZE)
    return QemuVM(none_machine_args(shm / "qram0", SIZE), sock_dir, name="src")


async def _qemu_ready(vm: QemuVM, bandwidth: int = 0) -> None:
    await vm.set_mapped_ram(channels=2, direct_io=False)
    await vm.cmd("migrate-set-parameters", {"max-bandwidth": bandwidth})


async def _qemu_failed_save(shm: Path, sock_dir: Path, target: Path) -> dict[str, Any]:
    """QEMU's save onto a full filesystem, as _run sees it.

    QEMU 10.0.2 itself sometimes dies of SIGSEGV in this failure (about 1 run in 20 here,
    more under load: a multifd channel's error path), which is QEMU's bug and not what
    this test compares; such a run is repeated, up to 5 tries."""
    for _ in range(5):
        async with _qemu(shm, sock_dir) as vm:
            await _qemu_ready(vm)
            try:
                return await _run(vm.qmp, f"file:{target}", extra=True)
            except Exception:
                if vm.proc.poll() != -signal.SIGSEGV:
                    raise
            finally:
                target.unlink(missing_ok=True)
    raise AssertionError("QEMU died of SIGSEGV in 5 failed saves in a row")


# --- migd on its own --------------------------------------------------------------------


async def test_a_save_emits_pass_1_then_2_and_reports_qemus_completed_members(qmp, shm, short_dir):
    await _migd_ready(qmp, shm)
    await qmp.execute("migrate-set-parameters", {"downtime-limit": 500})
    seen = await _run(qmp, f"file:{short_dir}/save.img")
    assert seen["events"] == ["setup", "pass 1", "active", "pass 2", "completed"]
    info = seen["final"]
    assert set(info) == COMPLETED_KEYS, info
    assert info["ram"]["dirty-sync-count"] == 2
    # The final stage (the switchover to the end) is part of the time after setup.
    assert 0 <= info["downtime"] <= info["total-time"] - info["setup-time"]
    assert info["ram"]["downtime-bytes"] > 0  # bitmaps and the end section


async def test_an_active_save_reports_expected_downtime_and_a_cancelled_one_only_status(
    qmp, shm, short_dir
):
    await _migd_ready(qmp, shm, bandwidth=4 * MiB)
    await qmp.execute("migrate-set-parameters", {"downtime-limit": 500})
    seen = await _run(qmp, f"file:{short_dir}/save.img", cancel=True)
    active = seen["active"]
    assert set(active) == ACTIVE_KEYS and active["status"] == "active", active
    assert active["expected-downtime"] == 500 and active["ram"]["dirty-sync-count"] == 1
    assert seen["final"] == {"status": "cancelled"}
    assert seen["events"] == ["setup", "pass 1", "active", "cancelling", "cancelled"]


async def test_a_failed_save_reports_status_and_error_only(qmp, shm, small_tmpfs):
    await _migd_ready(qmp, shm)
    seen = await _run(qmp, f"file:{small_tmpfs}/save.img")
    target = small_tmpfs / "save.img"
    expected = f"Could not write '{target}': No space left on device"
    assert seen["final"] == {"status": "failed", "error-desc": expected}
    assert seen["events"] == ["setup", "pass 1", "active", "failed"]


async def test_no_pass_events_without_the_events_capability(qmp, shm, short_dir):
    await _migd_ready(qmp, shm)
    await enable_mapped_ram(qmp, channels=2, events=False)
    with qmp.listener(EVENTS) as listener:
        assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
        assert listener.empty()


async def test_a_restore_emits_no_pass_and_keeps_its_progress_members(qmp, shm, short_dir):
    await _migd_ready(qmp, shm)
    assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
    with qmp.listener(EVENTS) as listener:
        info = await restore(qmp, short_dir / "save.img")
        names = []
        while not names or names[-1] not in FINAL_STATES:
            names.append(_name(await asyncio.wait_for(listener.get(), 30)))
    assert names == ["setup", "active", "completed"]  # as QEMU's incoming side
    # migd's extras: progress and the checks of its checksums (tests/test_checksums.py)
    assert set(info) == {"status", "total-time", "setup-time", "ram", "x-checksums"}, info


async def test_query_qmp_schema_describes_the_events_and_members_seen(qmp, shm, short_dir):
    """MIGRATION_PASS is in query-qmp-schema, and the events and query-migrate replies of
    every status read with migd's own schema (the new members included)."""
    schema = Schema(await qmp.execute("query-qmp-schema"))
    assert schema["MIGRATION_PASS"]["meta-type"] == "event"
    await _migd_ready(qmp, shm, bandwidth=4 * MiB)
    with qmp.listener(EVENTS) as listener:
        seen = await _run(qmp, f"file:{short_dir}/a.img", cancel=True)
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 0})
        seen_done = await _run(qmp, f"file:{short_dir}/b.img")
        events = []
        while not listener.empty():
            events.append(await listener.get())
    assert {e["event"] for e in events} == set(EVENTS)
    for event in events:
        schema.check(event["data"], schema[event["event"]]["arg-type"], event["event"])
    for info in (seen["active"], seen["final"], seen_done["final"]):
        schema.check(info, schema.ret_type("query-migrate"), "query-migrate")


# --- against QEMU -----------------------------------------------------------------------


@requires_qemu
@pytest.mark.timeout(90)
async def test_completed_save_events_and_members_match_qemu(qmp, shm, short_dir):
    async with _qemu(shm, short_dir) as vm:
        await _qemu_ready(vm)
        theirs = await _run(vm.qmp, f"file:{short_dir}/qemu.img")
    await _migd_ready(qmp, shm)
    ours = await _run(qmp, f"file:{short_dir}/migd.img")
    assert [e for e in theirs["events"] if e != "device"] == ours["events"]
    assert set(theirs["final"]) == set(ours["final"]) == COMPLETED_KEYS
    assert set(theirs["final"]["ram"]) == set(ours["final"]["ram"])
    assert theirs["final"]["ram"]["dirty-sync-count"] == ours["final"]["ram"]["dirty-sync-count"]


@requires_qemu
@pytest.mark.timeout(90)
async def test_active_and_cancelled_members_match_qemu(qmp, shm, short_dir):
    async with _qemu(shm, short_dir) as vm:
        await _qemu_ready(vm, bandwidth=4 * MiB)
        theirs = await _run(vm.qmp, f"file:{short_dir}/qemu.img", cancel=True)
    await _migd_ready(qmp, shm, bandwidth=4 * MiB)
    ours = await _run(qmp, f"file:{short_dir}/migd.img", cancel=True)
    assert theirs["events"] == ours["events"]
    assert set(theirs["active"]) == set(ours["active"]) == ACTIVE_KEYS
    for key in ("expected-downtime", "status"):
        assert theirs["active"][key] == ours["active"][key]
    assert theirs["active"]["ram"]["dirty-sync-count"] == ours["active"]["ram"]["dirty-sync-count"]
    assert theirs["final"] == ours["final"] == {"status": "cancelled"}


@requires_qemu
@pytest.mark.timeout(90)
async def test_failed_members_match_qemu(qmp, shm, short_dir, small_tmpfs):
    theirs = await _qemu_failed_save(shm, short_dir, small_tmpfs / "qemu.img")
    await _migd_ready(qmp, shm)
    ours = await _run(qmp, f"file:{small_tmpfs}/migd.img")
    assert set(theirs["final"]) == set(ours["final"]) == {"status", "error-desc"}
    # QEMU emits `failed` twice.
    assert theirs["events"] == [*ours["events"], "failed"]


@requires_qemu
@pytest.mark.timeout(90)
async def test_restore_side_differs_from_qemu_only_by_migds_progress_members(qmp, shm, short_dir):
    await _migd_ready(qmp, shm)
    assert (await save(qmp, short_dir / "save.img"))["status"] == "completed"
    (shm / "dst").write_bytes(bytes(0))
    with open(shm / "dst", "wb") as f:
        f.truncate(SIZE)
    args = [*none_machine_args(shm / "dst", SIZE), "-incoming", "defer"]
    async with QemuVM(args, short_dir, name="dst") as vm:
        await vm.set_mapped_ram(channels=2, direct_io=False)
        with vm.qmp.listener(EVENTS) as listener:
            await vm.cmd("migrate-incoming", {"uri": f"file:{short_dir}/save.img"})
            theirs = await vm.wait_migration(60)
            names = []
            while not names or names[-1] not in FINAL_STATES:
                names.append(_name(await asyncio.wait_for(listener.get(), 30)))
    assert theirs == {"status": "completed"}
    assert names == ["setup", "active", "completed"]
    ours = await restore(qmp, short_dir / "save.img")
    extension = {"total-time", "setup-time", "ram", "x-checksums"}
    assert set(ours) - set(theirs) == extension
