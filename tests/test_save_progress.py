"""A running save reports progress, emits events, and holds its bandwidth cap."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from .conftest import (
    FINAL_STATES,
    add_file_backend,
    enable_mapped_ram,
    fill_random,
    save,
    wait_migration,
    wait_status,
)

MiB = 1 << 20


async def test_migration_events_follow_every_status_change_in_order(qmp, shm, short_dir):
    fill_random(shm / "ram0", 4 * MiB)
    await add_file_backend(qmp, "ram0", shm / "ram0", 4 * MiB)
    await enable_mapped_ram(qmp, events=True)
    statuses = []
    with qmp.listener("MIGRATION") as listener:
        await qmp.execute("migrate", {"uri": f"file:{short_dir}/save.img"})
        while not statuses or statuses[-1] not in ("completed", "failed"):
            event = await asyncio.wait_for(listener.get(), 30)
            assert set(event["timestamp"]) == {"seconds", "microseconds"}
            statuses.append(event["data"]["status"])
    assert statuses == ["setup", "active", "completed"]


async def test_no_events_without_the_events_capability(migd_inproc, shm, short_dir):
    client = await migd_inproc.client()
    fill_random(shm / "ram0", MiB)
    await add_file_backend(client, "ram0", shm / "ram0", MiB)
    await enable_mapped_ram(client, events=False)
    with client.listener("MIGRATION") as listener:
        assert (await save(client, short_dir / "save.img"))["status"] == "completed"
        assert listener.empty()
    await client.disconnect()


async def test_query_migrate_shows_progress_while_a_save_runs(qmp, shm, short_dir):
    size = 32 * MiB
    fill_random(shm / "ram0", size)
    await add_file_backend(qmp, "ram0", shm / "ram0", size)
    await enable_mapped_ram(qmp, channels=2, **{"max-bandwidth": 16 * MiB})
    await qmp.execute("migrate", {"uri": f"file:{short_dir}/save.img"})
    samples = []
    deadline = asyncio.get_running_loop().time() + 60  # the save takes about 2 s
    while (info := await qmp.execute("query-migrate"))["status"] not in FINAL_STATES:
        if info["status"] == "active":
            samples.append(info)
        assert asyncio.get_running_loop().time() < deadline, f"save still running: {info}"
        await asyncio.sleep(0.2)
    assert info["status"] == "completed", info
    assert len(samples) >= 3, "a 2 s save should be seen active several times"
    remaining = [s["ram"]["remaining"] for s in samples]
    transferred = [s["ram"]["transferred"] for s in samples]
    assert remaining == sorted(remaining, reverse=True) and remaining[0] > remaining[-1]
    assert transferred == sorted(transferred) and transferred[-1] > transferred[0]
    assert any(s["ram"]["mbps"] > 0 for s in samples[1:])
    assert all(s["ram"]["total"] == size for s in samples)
    assert info["ram"]["remaining"] == 0 and info["ram"]["transferred"] >= size


async def test_max_bandwidth_holds_within_ten_percent(qmp, shm, short_dir):
    size, rate = 256 * MiB, 64 * MiB
    fill_random(shm / "ram0", size)
    await add_file_backend(qmp, "ram0", shm / "ram0", size)
    await enable_mapped_ram(qmp, channels=4, direct_io=True, **{"max-bandwidth": rate})
    info = await save(qmp, short_dir / "save.img")
    assert info["status"] == "completed"
    seconds = (info["total-time"] - info["setup-time"]) / 1000
    achieved = info["ram"]["multifd-bytes"] / seconds
    assert 0.9 * rate <= achieved <= 1.1 * rate, f"{achieved / MiB:.1f} MiB/s"


async def test_max_bandwidth_changes_apply_to_the_running_save(qmp, shm, short_dir):
    """libvirt's migrate-setspeed: the cap of a running save can be lifted (or set)."""
    size, rate = 32 * MiB, 4 * MiB  # 8 s at the cap
    data = fill_random(shm / "ram0", size)
    await add_file_backend(qmp, "ram0", shm / "ram0", size)
    await enable_mapped_ram(qmp, channels=2, direct_io=True, **{"max-bandwidth": rate})
    await qmp.execute("migrate", {"uri": f"file:{short_dir}/save.img"})
    await wait_status(qmp, "active")
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 0})
    assert (await qmp.execute("query-migrate-parameters"))["max-bandwidth"] == 0
    info = await wait_migration(qmp)
    assert info["status"] == "completed"
    # Under the old cap the pages alone would have taken size / rate seconds.
    assert info["total-time"] < 1000 * size / rate / 2, info["total-time"]
    assert (await save(qmp, short_dir / "again.img"))["status"] == "completed"
    assert (short_dir / "again.img").stat().st_size == (short_dir / "save.img").stat().st_size
    assert (shm / "ram0").read_bytes() == data


async def test_query_migrate_is_empty_before_any_migration(qmp):
    assert await qmp.execute("query-migrate") == {}


async def test_completed_save_reports_qemus_members(qmp, shm, short_dir):
    fill_random(shm / "ram0", MiB)
    await add_file_backend(qmp, "ram0", shm / "ram0", MiB)
    await enable_mapped_ram(qmp)
    info = await save(qmp, short_dir / "save.img")
    assert {"status", "total-time", "setup-time", "ram"} <= set(info)
    assert set(info["ram"]) == {
        "transferred",
        "remaining",
        "total",
        "duplicate",
        "normal",
        "normal-bytes",
        "dirty-pages-rate",
        "mbps",
        "dirty-sync-count",
        "postcopy-requests",
        "page-size",
        "multifd-bytes",
        "pages-per-second",
        "precopy-bytes",
        "downtime-bytes",
        "postcopy-bytes",
        "dirty-sync-missed-zero-copy",
    }
    assert info["ram"]["page-size"] == 4096
    # wait_migration is reused by other tests; make sure it sees a finished job at once
    assert (await wait_migration(qmp, timeout=1))["status"] == "completed"


async def _poll_until_final(qmp, period: float, timeout: float) -> list[dict]:
    """query-migrate every `period` seconds until the job ends (a poller's clock, not a
    synchronisation: nothing waits on a sleep to be done)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    polls = []
    while (info := await qmp.execute("query-migrate"))["status"] not in FINAL_STATES:
        polls.append(info)
        assert loop.time() < deadline, f"save still running: {info}"
        await asyncio.sleep(period)
    polls.append(info)
    return polls


@pytest.mark.parametrize("rate", [4 * MiB, 1 * MiB])
async def test_counters_advance_at_every_poll_under_a_low_cap(qmp, shm, short_dir, rate):
    """Issue 15 item 7: under a low cap, 'transferred' and 'remaining' move between every
    two polls at 5 Hz ('remaining' moved once per 8 MiB page run, and at 1 MiB/s a call
    took 1/4 s), and the cap holds."""
    size = 6 * rate  # 6 s at the cap
    fill_random(shm / "ram0", size)
    await add_file_backend(qmp, "ram0", shm / "ram0", size)
    await enable_mapped_ram(qmp, channels=2, **{"max-bandwidth": rate})
    await qmp.execute("migrate", {"uri": f"file:{short_dir}/save.img"})
    polls = await _poll_until_final(qmp, 0.2, 60)
    assert polls[-1]["status"] == "completed", polls[-1]
    # While pages are still to move (the last active poll may come after the last page).
    moving = [p for p in polls if p["status"] == "active" and p["ram"]["remaining"] > 0]
    assert len(moving) >= 10, f"a 6 s save should be polled often: {len(moving)}"
    for before, after in itertools.pairwise(moving):
        assert after["ram"]["transferred"] > before["ram"]["transferred"], (before, after)
        assert after["ram"]["remaining"] < before["ram"]["remaining"], (before, after)
    done = polls[-1]
    seconds = (done["total-time"] - done["setup-time"]) / 1000
    assert done["ram"]["multifd-bytes"] / seconds <= 1.1 * rate
