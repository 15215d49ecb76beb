"""query-memdev as a client written against QEMU's schema reads it: QEMU's Memdev members,
in QEMU's order and with truthful values for migd's mappings, and migd's own members after
them; compared with QEMU 10's own schema and reply where QEMU is installed."""

from __future__ import annotations

from pathlib import Path

from .conftest import RawClient
from .qapi_models import MEMDEV, check_struct, from_introspection
from .qemu_vm import QemuVM, requires_qemu

MiB = 1 << 20
# What is true of every migd mapping (no KSM or MADV_DONTDUMP advice, no MAP_NORESERVE,
# nothing touched at creation, no NUMA policy), and so the same for every backend.
MIGD_MAPPING = {
    "merge": False,
    "dump": True,
    "prealloc": False,
    "reserve": True,
    "host-nodes": [],
    "policy": "default",
}


def _add_backends(client: RawClient, shm: Path) -> None:
    file_backend = {
        "qom-type": "memory-backend-file",
        "id": "ram0",
        "size": 4 * MiB,
        "mem-path": str(shm / "ram0"),
        "share": True,
    }
    assert client.execute("object-add", file_backend) == {"return": {}}
    ram = {"qom-type": "memory-backend-ram", "id": "ram1", "size": 2 * MiB}
    assert client.execute("object-add", ram) == {"return": {}}


def test_query_memdev_parses_as_qemus_memdev_with_migd_members_after(raw, shm):
    raw.negotiate()
    _add_backends(raw, shm)
    file_backend, ram = raw.ok("query-memdev")
    assert check_struct(file_backend, MEMDEV) == ["qom-type", "mem-path", "ramblock-name"]
    assert check_struct(ram, MEMDEV) == ["qom-type", "ramblock-name"]
    assert file_backend == {
        "id": "ram0",
        "size": 4 * MiB,
        **MIGD_MAPPING,
        "share": True,
        "qom-type": "memory-backend-file",
        "mem-path": str(shm / "ram0"),
        "ramblock-name": "ram0",
    }
    assert ram == {
        "id": "ram1",
        "size": 2 * MiB,
        **MIGD_MAPPING,
        "share": False,
        "qom-type": "memory-backend-ram",
        "ramblock-name": "ram1",
    }


def test_the_strict_reader_refuses_what_a_qemu_client_could_not_parse():
    good = {"id": "a", "size": 1, "merge": False, "dump": True, "prealloc": False}
    good |= {"share": True, "reserve": True, "host-nodes": [], "policy": "default"}
    assert check_struct(good, MEMDEV) == []
    bad = [
        {k: v for k, v in good.items() if k != "dump"},  # a mandatory member missing
        {**good, "prealloc": 0},  # wrong JSON type
        {**good, "policy": "local"},  # not in the enum
        {"x-extra": 1, **good},  # migd's member before QEMU's
        {"size": 1, "id": "a", **good},  # out of QEMU's order
    ]
    for value in bad:
        try:
            check_struct(value, MEMDEV)
        except AssertionError:
            continue
        raise AssertionError(f"accepted {value}")


@requires_qemu
async def test_the_memdev_model_is_qemus_own_schema(short_dir):
    async with QemuVM(["-machine", "none", "-nodefaults", "-display", "none"], short_dir) as vm:
        schema = await vm.cmd("query-qmp-schema")
    assert from_introspection(schema, "query-memdev") == MEMDEV


@requires_qemu
async def test_query_memdev_matches_qemus_for_the_same_backends(daemon, short_dir, shm):
    args = ["-machine", "none", "-nodefaults", "-display", "none"]
    args += ["-object", f"memory-backend-file,id=ram0,size=4M,mem-path={shm}/q0,share=on"]
    args += ["-object", "memory-backend-ram,id=ram1,size=2M"]
    async with QemuVM(args, short_dir) as vm:
        qemu = await vm.cmd("query-memdev")
    client = RawClient(daemon.socket_path).negotiate()
    try:
        _add_backends(client, shm)
        ours = client.ok("query-memdev")
    finally:
        client.close()
    qemu_members = [m.name for m in MEMDEV]
    qemu.sort(key=lambda m: m["id"])  # QEMU lists its /objects children in no set order
    for q, m in zip(qemu, ours, strict=True):
        # The one value that differs, truthfully: QEMU advises MADV_MERGEABLE (its machine
        # property mem-merge is on by default); migd gives memory to KSM never.
        assert q.pop("merge") is True and m.pop("merge") is False
        assert q == {k: v for k, v in m.items() if k in qemu_members}
