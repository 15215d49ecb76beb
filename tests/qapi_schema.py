"""A reader of QEMU's QAPI introspection (query-qmp-schema replies), as management code
uses it: resolve libvirt-style paths ("migrate/arg-type/channels") and check that a JSON
value conforms to a type of the schema (objects with required and optional members and
no others, flat unions, enums, arrays, alternates, builtins).

Written from qapi/introspect.json, independently of migd's generator, so that the tests
check migd's schema against QEMU's rules rather than against itself.
"""

from __future__ import annotations

from typing import Any

_JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "value": lambda v: True,
}


class SchemaError(AssertionError):
    pass


class Schema:
    def __init__(self, entities: list[dict[str, Any]]) -> None:
        self.entities: dict[str, dict[str, Any]] = {}
        for e in entities:
            if e["name"] in self.entities:
                raise SchemaError(f"entity {e['name']!r} defined twice")
            self.entities[e["name"]] = e

    def __getitem__(self, name: str) -> dict[str, Any]:
        try:
            return self.entities[name]
        except KeyError:
            raise SchemaError(f"no entity {name!r}") from None

    def referenced(self) -> set[str]:
        """Every type name some entity refers to."""
        out: set[str] = set()
        for e in self.entities.values():
            meta = e["meta-type"]
            if meta == "command":
                out |= {e["arg-type"], e["ret-type"]}
            elif meta == "event":
                out.add(e["arg-type"])
            elif meta == "object":
                out |= {m["type"] for m in e["members"]}
                out |= {v["type"] for v in e.get("variants", [])}
            elif meta == "array":
                out.add(e["element-type"])
            elif meta == "alternate":
                out |= {m["type"] for m in e["members"]}
        return out

    # -- libvirt-style queries -----------------------------------------------------------

    def path(self, query: str) -> dict[str, Any] | None:
        """Resolve "command/arg-type/member/..." (libvirt's virQEMUQAPISchemaPathGet,
        simplified): None when some step does not exist. A plain step is a member of the
        object (of a union: of its base only); "+case" steps into a union's variant."""
        first, *steps = query.split("/")
        entity = self.entities.get(first)
        for step in steps:
            if entity is None:
                return None
            if step in ("arg-type", "ret-type"):
                entity = self.entities.get(entity.get(step, ""))
                while entity is not None and entity["meta-type"] == "array":
                    entity = self.entities.get(entity["element-type"])
                continue
            if entity["meta-type"] == "object" and step.startswith("+"):
                # libvirt's "+case": the variant of a flat union whose tag has that value
                variant = next((v for v in entity.get("variants", []) if v["case"] == step[1:]),
                               None)  # fmt: skip
                if variant is None:
                    return None
                entity = self.entities.get(variant["type"])
                continue
            if entity["meta-type"] == "object":
                member = next((m for m in entity["members"] if m["name"] == step), None)
                if member is None:
                    return None
                entity = self.entities.get(member["type"])
                while entity is not None and entity["meta-type"] == "array":
                    entity = self.entities.get(entity["element-type"])
                if entity is None:
                    return {"name": member["type"]}
            elif entity["meta-type"] == "enum":
                return entity if step in entity["values"] else None
            else:
                return None
        return entity

    # -- conformance ---------------------------------------------------------------------

    def check(self, value: Any, type_name: str, where: str = "$") -> None:
        """Raise SchemaError naming the first place where `value` does not fit."""
        e = self[type_name]
        meta = e["meta-type"]
        if meta == "builtin":
            if not _JSON_TYPES[e["json-type"]](value):
                raise SchemaError(f"{where}: {value!r} is not {e['json-type']}")
        elif meta == "enum":
            if value not in e["values"]:
                raise SchemaError(f"{where}: {value!r} not in enum {e['values']}")
        elif meta == "array":
            if not isinstance(value, list):
                raise SchemaError(f"{where}: not an array")
            for i, item in enumerate(value):
                self.check(item, e["element-type"], f"{where}[{i}]")
        elif meta == "alternate":
            for m in e["members"]:
                try:
                    self.check(value, m["type"], where)
                    return
                except SchemaError:
                    pass
            raise SchemaError(f"{where}: {value!r} fits no branch of alternate {type_name}")
        elif meta == "object":
            self._check_object(value, e, where)
        else:
            raise SchemaError(f"{where}: {type_name} is a {meta}, not a type")

    def _check_object(self, value: Any, e: dict[str, Any], where: str) -> None:
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: not an object")
        members = list(e["members"])
        if "tag" in e:
            tag = value.get(e["tag"])
            variant = next((v for v in e["variants"] if v["case"] == tag), None)
            if variant is not None:
                members += self[variant["type"]]["members"]
        known = {m["name"] for m in members}
        extra = set(value) - known
        if extra:
            raise SchemaError(f"{where}: members {sorted(extra)} not in the schema")
        for m in members:
            if m["name"] in value:
                self.check(value[m["name"]], m["type"], f"{where}.{m['name']}")
            elif "default" not in m:
                raise SchemaError(f"{where}: mandatory member {m['name']!r} missing")

    def ret_type(self, command: str) -> str:
        return str(self[command]["ret-type"])
