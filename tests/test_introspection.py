"""query-qmp-schema: migd describes itself in QEMU's SchemaInfo format, and management
code that reads QEMU's introspection (tests/qapi_schema.py, written from
qapi/introspect.json) can probe migd's commands, arguments and replies with it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from .conftest import add_file_backend, enable_mapped_ram, save
from .qapi_schema import Schema, SchemaError
from .qemu_vm import QemuVM, requires_qemu

pytestmark = pytest.mark.timeout(60)

QUERIES = (
    "query-version",
    "query-commands",
    "query-memdev",
    "query-migrate",
    "query-migrate-capabilities",
    "query-migrate-parameters",
    "query-fdsets",
)


async def migd_schema(client: Any) -> Schema:
    return Schema(await client.execute("query-qmp-schema"))


async def test_schema_is_complete_and_closed(qmp: Any) -> None:
    """Every command migd accepts and its MIGRATION event are described, every type an
    entity names is defined once, and builtins keep their names while others are masked."""
    schema = await migd_schema(qmp)
    commands = {c["name"] for c in await qmp.execute("query-commands")}
    described = {n for n, e in schema.entities.items() if e["meta-type"] == "command"}
    assert described == commands
    assert schema["MIGRATION"]["meta-type"] == "event"
    missing = schema.referenced() - set(schema.entities)
    assert not missing, f"types named but not defined: {missing}"
    for name, e in schema.entities.items():
        if e["meta-type"] in ("object", "enum", "alternate"):
            assert name.isdigit(), f"{name} is not masked as QEMU masks type names"
    assert schema["0"] == {"name": "0", "meta-type": "object", "members": []}
    assert schema["migrate_cancel"]["arg-type"] == "0"


async def test_libvirt_style_probes(qmp: Any) -> None:
    """The probes a management application makes before using an argument or a value."""
    schema = await migd_schema(qmp)
    for query in (
        "migrate/arg-type/uri",
        "migrate/arg-type/channels/addr/+file/offset",
        "migrate-incoming/arg-type/channels/addr/+file/filename",
        "migrate/arg-type/channels/addr/transport/file",
        "object-add/arg-type/+memory-backend-file/mem-path",
        "object-add/arg-type/+memory-backend-ram/size",
        "object-add/arg-type/id",
        "migrate-incoming/arg-type/exit-on-error",
        "migrate-set-parameters/arg-type/direct-io",
        "migrate-set-parameters/arg-type/multifd-channels",
        "query-migrate-capabilities/ret-type/capability/mapped-ram",
        "query-migrate-parameters/ret-type/zero-page-detection/none",
        "query-memdev/ret-type/share",
        "object-add/arg-type/qom-type/memory-backend-file",
        "query-version/ret-type/package",
    ):
        assert schema.path(query) is not None, query
    for query in (
        "migrate/arg-type/nope",
        "query-migrate-capabilities/ret-type/capability/xbzrle-nope",
        "no-such-command/arg-type",
        # unions as QEMU shows them: a case's members only through its "+case"
        "migrate/arg-type/channels/addr/offset",
        "object-add/arg-type/mem-path",
        # cases migd refuses are not advertised
        "migrate/arg-type/channels/addr/+socket",
        "object-add/arg-type/+memory-backend-memfd",
    ):
        assert schema.path(query) is None, query


async def test_unions_shaped_as_qemus(qmp: Any) -> None:
    """migrate's channel address and object-add's arguments are flat unions, as QEMU 10
    reports them (a base with the tag, then one object per case): the shapes a client
    checks its request against before it sends it."""
    schema = await migd_schema(qmp)
    addr = schema.path("migrate/arg-type/channels/addr")
    assert addr is not None and addr["tag"] == "transport"
    assert [m["name"] for m in addr["members"]] == ["transport"]
    assert [v["case"] for v in addr["variants"]] == ["file"]
    assert schema.path("migrate/arg-type/channels/addr/transport")["values"] == [
        "socket", "exec", "rdma", "file"]  # fmt: skip
    channel = schema.path("migrate/arg-type/channels")
    assert channel is not None
    good = {"channel-type": "main", "addr": {"transport": "file", "filename": "f", "offset": 0}}
    schema.check(good, channel["name"])
    for bad in (
        {"channel-type": "main", "addr": {"transport": "file", "filename": "f"}},
        {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "p"}},
    ):
        with pytest.raises(SchemaError):
            schema.check(bad, channel["name"])
    add = schema[schema["object-add"]["arg-type"]]
    assert add["tag"] == "qom-type"
    assert [m["name"] for m in add["members"]] == ["qom-type", "id"]
    file_case = schema.path("object-add/arg-type/+memory-backend-file")
    assert file_case is not None
    assert {m["name"]: "default" in m for m in file_case["members"]}["mem-path"] is False
    request = {"qom-type": "memory-backend-file", "id": "m", "size": 4096, "mem-path": "/p"}
    schema.check(request, add["name"])
    with pytest.raises(SchemaError):
        schema.check({**request, "qom-type": "memory-backend-ram"}, add["name"])


async def test_replies_and_events_conform_to_the_schema(qmp: Any, short_dir: Path) -> None:
    """What migd sends fits what it says it sends: mandatory members present, optional ones
    only where declared optional, nothing undeclared, enums within their values."""
    schema = await migd_schema(qmp)
    await add_file_backend(qmp, "m0", short_dir / "mem", 1 << 20)
    await enable_mapped_ram(qmp)
    for name in QUERIES:  # before any migration: query-migrate is {}
        schema.check(await qmp.execute(name), schema.ret_type(name), name)
    events: list[dict[str, Any]] = []

    async def collect() -> None:
        async for event in qmp.events:
            events.append(event)

    listener = asyncio.create_task(collect())
    try:
        info = await save(qmp, short_dir / "save.img")
    finally:
        listener.cancel()
    assert info["status"] == "completed"
    for name in QUERIES:
        schema.check(await qmp.execute(name), schema.ret_type(name), name)
    migration = [e for e in events if e["event"] == "MIGRATION"]
    assert migration, "no MIGRATION event seen"
    for event in migration:
        schema.check(event["data"], schema["MIGRATION"]["arg-type"], "MIGRATION")


def test_checker_refuses_what_does_not_fit() -> None:
    """The reader is strict: the checks above could fail."""
    schema = Schema(
        [
            {"name": "int", "meta-type": "builtin", "json-type": "int"},
            {"name": "1", "meta-type": "enum", "members": [{"name": "a"}], "values": ["a"]},
            {
                "name": "2",
                "meta-type": "object",
                "members": [
                    {"name": "n", "type": "int"},
                    {"name": "e", "type": "1", "default": None},
                ],
            },
        ]
    )
    schema.check({"n": 1}, "2")
    schema.check({"n": 1, "e": "a"}, "2")
    for bad in ({}, {"n": True}, {"n": 1, "e": "b"}, {"n": 1, "x": 0}, [1]):
        with pytest.raises(SchemaError):
            schema.check(bad, "2")
    with pytest.raises(SchemaError):
        Schema([{"name": "1", "meta-type": "builtin", "json-type": "int"}] * 2)


@requires_qemu
async def test_migd_schema_read_with_qemus_own_definitions(qmp: Any, short_dir: Path) -> None:
    """QEMU describes SchemaInfo in its own introspection: every entity migd returns must
    conform to it. For the commands both have, migd's members that QEMU also has are
    optional or mandatory as in QEMU, with the same JSON type, and migd's query-version
    reply passes QEMU's schema."""
    async with QemuVM(["-machine", "none", "-nodefaults", "-display", "none"], short_dir) as vm:
        qemu = Schema(await vm.qmp.execute("query-qmp-schema"))
    info_type = qemu["query-qmp-schema"]["ret-type"]
    entities = await qmp.execute("query-qmp-schema")
    qemu.check(entities, info_type, "migd's query-qmp-schema")
    ours = Schema(entities)
    shared = [
        n
        for n, e in ours.entities.items()
        if e["meta-type"] == "command" and n in qemu.entities
    ]
    assert "migrate" in shared and "query-migrate-parameters" in shared
    for query in LIBVIRT_PROBES:  # what a prober finds in QEMU, it finds in migd
        assert (qemu.path(query) is None) == (ours.path(query) is None), query
    # QEMU's 'unstable'/'deprecated' markers on what both have, and migd's on the same
    marked = {p: f for n in shared for p, f in _feature_paths(qemu, n).items()}
    assert "migrate-set-parameters/arg-type/x-checkpoint-delay" in marked
    mine = {p: f for n in shared for p, f in _feature_paths(ours, n).items()}
    for path, features in marked.items():
        if ours.path(path) is not None:
            assert mine.get(path) == features, path
    for path, features in mine.items():
        if qemu.path(path) is not None:
            assert marked.get(path) == features, f"{path}: QEMU does not mark it"
    for name in shared:
        for side in ("arg-type", "ret-type"):
            _same_members(ours, qemu, ours[name][side], qemu[name][side], f"{name}/{side}")
    qemu.check(await qmp.execute("query-version"), qemu.ret_type("query-version"), "version")


def _feature_paths(schema: Schema, command: str) -> dict[str, list[str]]:
    """Every member and enum value under a command's argument and result types that has
    features, by its libvirt-style path (the command's own under its name)."""
    out: dict[str, list[str]] = {}
    if schema[command].get("features"):
        out[command] = schema[command]["features"]

    def walk(type_name: str, path: str, depth: int) -> None:
        e = schema[type_name]
        while e["meta-type"] == "array":
            e = schema[e["element-type"]]
        if depth > 6 or e["meta-type"] not in ("object", "enum"):
            return
        for m in e["members"]:
            if m.get("features"):
                out[f"{path}/{m['name']}"] = m["features"]
            if "type" in m:
                walk(m["type"], f"{path}/{m['name']}", depth + 1)
        for v in e.get("variants", []):
            walk(v["type"], f"{path}/+{v['case']}", depth + 1)

    for side in ("arg-type", "ret-type"):
        if side in schema[command]:
            walk(schema[command][side], f"{command}/{side}", 0)
    return out


async def test_feature_markers(qmp: Any) -> None:
    """'unstable' on every x- command, member and enum value (QAPI's rule, and what QEMU 10
    marks: x-checkpoint-delay, x-colo, ...), 'deprecated' where QEMU 10 marks it."""
    schema = await migd_schema(qmp)
    marked = {p: f for n in schema.entities if schema[n]["meta-type"] == "command"
              for p, f in _feature_paths(schema, n).items()}  # fmt: skip
    assert marked["migrate-set-parameters/arg-type/x-checkpoint-delay"] == ["unstable"]
    assert marked["query-migrate-parameters/ret-type/x-vcpu-dirty-limit-period"] == ["unstable"]
    assert marked["migrate-set-capabilities/arg-type/capabilities/capability/x-colo"] == [
        "unstable"]  # fmt: skip
    assert marked["query-migrate-capabilities/ret-type/capability/zero-blocks"] == ["deprecated"]
    assert marked["x-migd-session-scope"] == ["unstable"]
    assert marked["migrate-incoming/arg-type/x-read-cached"] == ["unstable"]
    for path, features in marked.items():
        assert path.rsplit("/", 1)[-1].startswith("x-") or features == ["deprecated"], path
    assert "migrate-set-parameters/arg-type/multifd-channels" not in marked


# Paths libvirt-style probers ask (virQEMUQAPISchemaPathGet): found in both or in neither.
LIBVIRT_PROBES = (
    "migrate/arg-type/channels",
    "migrate/arg-type/channels/addr/+file/offset",
    "migrate/arg-type/channels/addr/+file/filename",
    "migrate/arg-type/channels/addr/transport/file",
    "migrate/arg-type/channels/addr/offset",
    "migrate/arg-type/channels/channel-type/main",
    "migrate-incoming/arg-type/channels/addr/+file/offset",
    "object-add/arg-type/qom-type/memory-backend-file",
    "object-add/arg-type/+memory-backend-file/mem-path",
    "object-add/arg-type/+memory-backend-file/size",
    "object-add/arg-type/+memory-backend-file/share",
    "object-add/arg-type/+memory-backend-ram/size",
    "object-add/arg-type/+memory-backend-ram/prealloc-threads",
    "object-add/arg-type/+memory-backend-file/prealloc",
    "object-add/arg-type/+memory-backend-file/readonly",
    "object-add/arg-type/+memory-backend-file/policy/bind",
    "object-add/arg-type/+memory-backend-ram/align",
    "object-add/arg-type/mem-path",
    "object-add/arg-type/size",
)


def _same_members(ours: Schema, qemu: Schema, our_type: str, qemu_type: str, where: str) -> None:
    """Arguments: what a QEMU client may omit, migd must let it omit. Results: what a QEMU
    client may count on (mandatory members), migd always sends. Shared members: the same
    JSON type. A union of QEMU's is one in migd, on the same tag, each of migd's cases
    one of QEMU's, compared the same way."""
    a, b = ours[our_type], qemu[qemu_type]
    while a["meta-type"] == "array" and b["meta-type"] == "array":
        a, b = ours[a["element-type"]], qemu[b["element-type"]]
    if a["meta-type"] != "object" or b["meta-type"] != "object":
        return
    assert a.get("tag") == b.get("tag"), f"{where}: union tag"
    cases = {v["case"]: v["type"] for v in b.get("variants", [])}
    for variant in a.get("variants", []):
        assert variant["case"] in cases, f"{where}: case {variant['case']} not QEMU's"
        _same_members(ours, qemu, variant["type"], cases[variant["case"]],
                      f"{where}/+{variant['case']}")  # fmt: skip
    mine = {m["name"]: m for m in a["members"]}
    for q in b["members"]:
        m = mine.get(q["name"])
        path = f"{where}/{q['name']}"
        if "/ret-type" in where and "default" not in q:
            assert m is not None and "default" not in m, f"{path}: QEMU always sends it"
        if m is None:
            continue  # an argument migd does not take: refused by name, as unknown
        if "/arg-type" in where and "default" in q:
            assert "default" in m, f"{path}: optional in QEMU, mandatory in migd"
        t, u = ours[m["type"]], qemu[q["type"]]
        if t["meta-type"] == "builtin" or u["meta-type"] == "builtin":
            assert t.get("json-type") == u.get("json-type"), f"{path}: type"
        else:
            _same_members(ours, qemu, m["type"], q["type"], path)  # nested: channels/addr
