"""Memory files cut short by another process while migd saves or restores them.

The pages past the new end of a file can no longer be read or written: from user space
that is SIGBUS, which kills a Python process; through the kernel it is EFAULT. migd must
survive, fail the job naming the backend, its file and both sizes, and keep serving the
other backends. The jobs are slowed with max-bandwidth and the truncate lands when
query-migrate shows the job part-way (polled, not slept for).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from migd.errors import BackendError
from migd.io.checksums import UnitChecksums
from migd.io.digests import digest
from migd.io.engine import BlockIO, PageRun
from migd.state.memory import create_file_backend

from .conftest import FINAL_STATES, RawClient, fill_random

MiB = 1 << 20


def add_backend(client: RawClient, id: str, path: Path, size: int, share: bool = True) -> None:
    client.ok("object-add", {"qom-type": "memory-backend-file", "id": id, "size": size,
                              "mem-path": str(path), "share": share})  # fmt: skip


def set_up(client: RawClient, bandwidth: int, direct_io: bool = False) -> None:
    caps = [{"capability": c, "state": True} for c in ("mapped-ram", "multifd")]
    client.ok("migrate-set-capabilities", {"capabilities": caps})
    client.ok("migrate-set-parameters", {"multifd-channels": 2, "max-bandwidth": bandwidth,
                                         "direct-io": direct_io})  # fmt: skip


def truncate_part_way(client: RawClient, path: Path, after: int, to: int) -> None:
    """Once the job has moved `after` bytes, cut `path` to `to` bytes, as another process."""
    # poll_migrate fails if the job ends first: the truncate must land mid-job.
    info = client.poll_migrate(lambda i: i.get("ram", {}).get("transferred", 0) >= after)
    assert info["status"] == "active", info
    os.truncate(path, to)


def final(client: RawClient) -> dict:
    return client.poll_migrate(lambda i: i["status"] in FINAL_STATES)


def with_zero_mibs(path: Path, size: int, seed: int) -> bytes:
    """Random data with every other MiB zero: the restore has zero runs to make."""
    data = np.frombuffer(bytearray(fill_random(path, size, seed)), dtype=np.uint8).copy()
    for mib in range(0, size // MiB, 2):
        data[mib * MiB : (mib + 1) * MiB] = 0
    path.write_bytes(data.tobytes())
    return data.tobytes()


# direct-io: the save reads the memory file into its channels' buffers (io/threads.py
# Staging), where it reads short; buffered: from the mapping, where it faults.
@pytest.mark.parametrize("direct_io", [False, True], ids=["mapped", "staged"])
def test_a_memory_file_truncated_during_a_save_fails_the_save_and_migd_lives_on(
    daemon, shm, short_dir, direct_io
):
    fill_random(shm / "a", 64 * MiB, seed=1)
    other = fill_random(shm / "b", 8 * MiB, seed=2)
    client = RawClient(daemon.socket_path).negotiate()
    add_backend(client, "ram0", shm / "a", 64 * MiB)
    add_backend(client, "ram1", shm / "b", 8 * MiB)
    set_up(client, bandwidth=16 * MiB, direct_io=direct_io)  # about 4.5 s: the truncate
    client.ok("migrate", {"uri": f"file:{short_dir}/save.img"})  # lands early in it
    # Only the last 16 MiB go, pages no channel has reached yet: the first to touch them
    # is the zero scan, which read them from user space (SIGBUS) before this was fixed.
    truncate_part_way(client, shm / "a", after=8 * MiB, to=48 * MiB)

    info = final(client)
    assert daemon.proc.poll() is None, daemon.proc.stderr.read().decode()  # no SIGBUS
    assert info["status"] == "failed"
    assert info["error-desc"] == (
        f"Memory backend 'ram0' file '{shm}/a' shrank from {64 * MiB} to {48 * MiB} bytes "
        "during the save"
    )
    # The other backend, and the daemon, still work: save it alone, restore it.
    client.ok("object-del", {"id": "ram0"})
    client.ok("migrate-set-parameters", {"max-bandwidth": 0})
    client.ok("migrate", {"uri": f"file:{short_dir}/other.img"})
    assert final(client)["status"] == "completed"
    (shm / "b").write_bytes(bytes(8 * MiB))
    client.ok("migrate-incoming", {"uri": f"file:{short_dir}/other.img"})
    assert final(client)["status"] == "completed"
    assert (shm / "b").read_bytes() == other
    client.close()


def test_a_private_memory_file_truncated_during_a_restore_fails_it_and_migd_lives_on(
    daemon, shm, short_dir
):
    """share=false: zeroing the absent pages writes into a private mapping of the file,
    which a truncate turns into SIGBUS for a store from user space."""
    fill_random(shm / "a", 32 * MiB, seed=3)
    with_zero_mibs(shm / "b", 16 * MiB, seed=4)
    client = RawClient(daemon.socket_path).negotiate()
    add_backend(client, "ram0", shm / "a", 32 * MiB)
    add_backend(client, "ram1", shm / "b", 16 * MiB)
    set_up(client, bandwidth=0)
    client.ok("migrate", {"uri": f"file:{short_dir}/save.img"})
    assert final(client)["status"] == "completed"
    for id in ("ram0", "ram1"):
        client.ok("object-del", {"id": id})
    fill_random(shm / "a2", 32 * MiB, seed=5)
    fill_random(shm / "b2", 16 * MiB, seed=6)
    add_backend(client, "ram0", shm / "a2", 32 * MiB, share=False)
    add_backend(client, "ram1", shm / "b2", 16 * MiB, share=False)

    # ram1's zero runs come after ram0's pages, which take about 2 s at this rate.
    client.ok("migrate-set-parameters", {"max-bandwidth": 16 * MiB})
    client.ok("migrate-incoming", {"uri": f"file:{short_dir}/save.img"})
    truncate_part_way(client, shm / "b2", after=4 * MiB, to=0)

    info = final(client)
    assert daemon.proc.poll() is None, daemon.proc.stderr.read().decode()  # no SIGBUS
    assert info["status"] == "failed"
    assert info["error-desc"] == (
        f"Memory backend 'ram1' file '{shm}/b2' shrank from {16 * MiB} to 0 bytes during "
        "the restore; memory backends 'ram0', 'ram1' hold partial data"
    )
    assert {m["id"] for m in client.ok("query-memdev")} == {"ram0", "ram1"}
    client.ok("object-del", {"id": "ram1"})
    client.ok("migrate-set-parameters", {"max-bandwidth": 0})
    # ram0 holds partial data (its private mapping has no file to carry the mark: the
    # daemon keeps it): not saved as if whole. Re-added on a file, it is.
    desc = client.execute("migrate", {"uri": f"file:{short_dir}/again.img"})["error"]["desc"]
    assert desc.startswith("Memory backend 'ram0' holds partial data"), desc
    client.ok("object-del", {"id": "ram0"})
    add_backend(client, "ram0", shm / "a", 32 * MiB)
    client.ok("migrate", {"uri": f"file:{short_dir}/again.img"})
    assert final(client)["status"] == "completed"
    client.close()


# direct-io: into a file that holds data, the restore writes each run into the file from
# its channel's buffer (io/threads.py Staging), and must not grow the file back either.
@pytest.mark.parametrize("direct_io", [False, True], ids=["mapped", "staged"])
def test_a_shared_memory_file_truncated_during_a_restore_is_reported_as_shrunk(
    daemon, shm, short_dir, direct_io
):
    """Not as ENOSPC or a bad address, and the file is not grown back over lost pages."""
    fill_random(shm / "a", 32 * MiB, seed=7)
    client = RawClient(daemon.socket_path).negotiate()
    add_backend(client, "ram0", shm / "a", 32 * MiB)
    set_up(client, bandwidth=0, direct_io=direct_io)
    client.ok("migrate", {"uri": f"file:{short_dir}/save.img"})
    assert final(client)["status"] == "completed"
    client.ok("migrate-set-parameters", {"max-bandwidth": 8 * MiB})
    client.ok("migrate-incoming", {"uri": f"file:{short_dir}/save.img"})
    truncate_part_way(client, shm / "a", after=2 * MiB, to=MiB)

    info = final(client)
    assert daemon.proc.poll() is None
    assert info["status"] == "failed"
    assert info["error-desc"] == (
        f"Memory backend 'ram0' file '{shm}/a' shrank from {32 * MiB} to {MiB} bytes during "
        "the restore; memory backends 'ram0' hold partial data"
    )
    assert os.stat(shm / "a").st_size == MiB
    client.close()


async def test_the_channels_fault_on_a_full_filesystem_gives_the_allocation_error(
    migd_inproc, qmp, shm, short_dir, small_tmpfs, monkeypatch
):
    """Which thread fails first must not change the error: here the populator does
    nothing, so a channel's read into unallocatable memory (EFAULT) is the first and only
    failure, and the job still reports the allocation error the populator would."""
    from migd.migration import plan

    from .fake_engine import FakeEngine
    from .test_restore import _saved_into_small_tmpfs

    dst = await _saved_into_small_tmpfs(qmp, shm, short_dir, small_tmpfs)
    monkeypatch.setattr(plan, "check_room", lambda path, needs: None)
    migd_inproc.daemon.services.engine.io_engine = FakeEngine(idle_populator=True)
    await qmp.execute("migrate-incoming", {"uri": f"file:{short_dir}/save.img"})
    deadline = time.monotonic() + 60
    while (info := await qmp.execute("query-migrate"))["status"] not in FINAL_STATES:
        assert time.monotonic() < deadline, info
    assert info["status"] == "failed"
    assert info["error-desc"] == (
        f"Could not allocate memory for memory backend 'ram0' in '{dst}': "
        "No space left on device; memory backends 'ram0' hold partial data"
    )


@pytest.mark.parametrize("direction", ["save", "restore"])
@pytest.mark.parametrize("read_through", ["memory file", "mapping"])
def test_a_memory_file_cut_short_while_units_wait_for_hashing_names_the_backend(
    shm: Path, direction: str, read_through: str
) -> None:
    """The channels are done with every page, the units wait in the hashing threads'
    queue, and the file shrinks: the hashing thread (reading with pread of the file, or
    from the mapping) fails with the backend's own account, as a channel would, and
    stops the job's other threads. Deterministic: the units are queued before the cut."""
    size, units = 4 * MiB, 4
    path = shm / "h"
    data = fill_random(path, size, 7)
    backend = create_file_backend("h", size, str(path))
    try:
        pages = size // 4096
        block = BlockIO(
            "h", 0, pages, backend.view(0, size), np.ones(pages, dtype=bool),
            explain_fault=backend.fault_error,
            content_fd=backend.shared_fd if read_through == "memory file" else None,
        )  # fmt: skip
        expected = None
        if direction == "restore":
            expected = [b"".join(digest(data[u * MiB : (u + 1) * MiB]) for u in range(units))]
        sums = UnitChecksums([block], "/saves/h.img", expected, [PageRun(0, 0, pages)])
        sums.done(0, 0, pages)  # every unit queued
        os.truncate(path, MiB + 4096)  # the first unit stays whole
        sums.no_more_units(1)
        cancel = threading.Event()
        with pytest.raises(BackendError) as raised:
            sums.hash_queued(cancel)
        assert raised.value.desc == (
            f"Memory backend 'h' file '{path}' shrank from {size} to {MiB + 4096} bytes "
            f"during the {direction}"
        )
        assert cancel.is_set()  # the channels stop at their next run
        assert sums.units_done == 1
        sums.release()
        del block
    finally:
        backend.close()
