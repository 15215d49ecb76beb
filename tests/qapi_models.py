"""A strict reader of QEMU's QAPI result types, as a client written against QEMU's schema
parses them: every mandatory member present with its JSON type, optional members absent or
typed, enum values from the enum, and members in the schema's order. Members QEMU does not
have are tolerated only after all of QEMU's (a client that reads the object as a QAPI
struct ignores trailing extras; one that sees them between QEMU's members is confused).

The models are copied from QEMU 10.0's schema (qapi/machine.json and qapi/control.json,
as `query-qmp-schema` of qemu-system-x86_64 10.0.2 reports them); `from_introspection`
builds the same model from a live QEMU so a test can check the copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Member:
    name: str
    type: str  # "int", "str", "bool", "[int]", or "enum:a|b|c", or "object:<Model name>"
    optional: bool = False


VERSION_TRIPLE = (Member("major", "int"), Member("minor", "int"), Member("micro", "int"))
VERSION_INFO = (Member("qemu", "object:VersionTriple"), Member("package", "str"))
# qapi/machine.json, QEMU 10.0: { 'struct': 'Memdev', ... } (MemdevInfo in query-qmp-schema)
MEMDEV = (
    Member("id", "str", optional=True),
    Member("size", "int"),
    Member("merge", "bool"),
    Member("dump", "bool"),
    Member("prealloc", "bool"),
    Member("share", "bool"),
    Member("reserve", "bool", optional=True),
    Member("host-nodes", "[int]"),
    Member("policy", "enum:default|preferred|bind|interleave"),
)
MODELS = {"VersionTriple": VERSION_TRIPLE, "VersionInfo": VERSION_INFO, "Memdev": MEMDEV}


def _check_type(value: Any, kind: str, where: str) -> None:
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind.startswith("["):
        ok = isinstance(value, list)
        if ok:
            for i, item in enumerate(value):
                _check_type(item, kind[1:-1], f"{where}[{i}]")
    elif kind.startswith("enum:"):
        ok = value in kind[5:].split("|")
    elif kind.startswith("object:"):
        check_struct(value, MODELS[kind[7:]], where)
        ok = True
    else:
        raise ValueError(f"unknown QAPI type {kind}")
    if not ok:
        raise AssertionError(f"{where}: {value!r} is not a QAPI {kind}")


def check_struct(value: Any, members: tuple[Member, ...], where: str = "value") -> list[str]:
    """Raise AssertionError unless `value` parses as the struct; return its extra members."""
    if not isinstance(value, dict):
        raise AssertionError(f"{where}: {value!r} is not a JSON object")
    keys = list(value)
    known = {m.name for m in members}
    first_extra = next((i for i, k in enumerate(keys) if k not in known), len(keys))
    late = [k for k in keys[first_extra:] if k in known]
    if late:
        raise AssertionError(f"{where}: QEMU's members {late} come after migd's {keys}")
    order = [m.name for m in members if m.name in value]
    if keys[:first_extra] != order:
        raise AssertionError(f"{where}: members {keys[:first_extra]} not in QEMU's order {order}")
    for m in members:
        if m.name not in value:
            if not m.optional:
                raise AssertionError(f"{where}: mandatory member '{m.name}' is missing")
            continue
        _check_type(value[m.name], m.type, f"{where}.{m.name}")
    return keys[first_extra:]


def from_introspection(schema: list[dict[str, Any]], command: str) -> tuple[Member, ...]:
    """The member list of `command`'s result (or of its array's element) as a live QEMU's
    query-qmp-schema describes it, in the same notation as the copies above."""
    by_name = {e["name"]: e for e in schema}
    ret = by_name[by_name[command]["ret-type"]]
    if ret["meta-type"] == "array":
        ret = by_name[ret["element-type"]]

    def kind(type_name: str) -> str:
        t = by_name[type_name]
        if t["meta-type"] == "builtin":
            return {"int": "int", "string": "str", "boolean": "bool"}[t["json-type"]]
        if t["meta-type"] == "array":
            return f"[{kind(t['element-type'])}]"
        if t["meta-type"] == "enum":
            return "enum:" + "|".join(t["values"])
        return "object:?"

    return tuple(Member(m["name"], kind(m["type"]), "default" in m) for m in ret["members"])
