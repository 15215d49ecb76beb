"""query-qmp-schema: migd's commands and events described in QEMU's SchemaInfo format.

libvirt and other management code probe `query-qmp-schema` before they use a command or
an argument (libvirt's "migrate/arg-type/channels" style queries). The reply is built
from the same pydantic models that check requests, so it cannot drift from them.

The format is QEMU's (qapi/introspect.json): a flat list of entities, each a command
(arg-type, ret-type), an event (arg-type), an object (members, optional ones with
"default": null), an enum (members and the older "values"), an array ("[T]" with its
element-type), an alternate, or a builtin (str, int, number, bool, null, any). As QEMU
does, the names of types are masked as numbers, so that clients depend on structure
and not on type names; "0" is the empty object, and builtins keep their names. Every
integer type is "int", as in QEMU (the ranges are not part of introspection).
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Annotated, Any

from pydantic import BaseModel

from ..migration.settings import DEPRECATED
from ..qapi import Alternate
from ..qmp.dispatch import COMMANDS, EVENTS, command
from ..qmp.validation import Empty, QapiUnion
from .context import Context

SchemaInfo = dict[str, Any]

_BUILTINS: dict[Any, tuple[str, str]] = {
    str: ("str", "string"),
    int: ("int", "int"),
    float: ("number", "number"),
    bool: ("bool", "boolean"),
    type(None): ("null", "null"),
    Any: ("any", "value"),
}


def _strip(tp: Any) -> Any:
    """The type under Annotated[...] and `X | None` (optionality is the member's)."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp, *metadata = typing.get_args(tp)
            if any(isinstance(m, Alternate) for m in metadata):
                return tp  # null is one of its branches (StrOrNull), not optionality
            continue
        if _is_union(tp):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(rest) == 1:
                tp = rest[0]
                continue
        return tp


# x- names QEMU 10 does not mark unstable (older than the rule; kept for compatibility).
_STABLE_X = frozenset({"x-use-canonical-path-for-ramblock-id"})


def _features(name: str) -> dict[str, list[str]]:
    """QEMU's feature markers for a command, member or enum value: 'unstable' for an x-
    name (QAPI's rule: QEMU 10 marks x-checkpoint-delay, x-colo, ... so, and migd's own
    x- extensions are as unstable), 'deprecated' where QEMU 10 says so."""
    features = ["unstable"] if name.startswith("x-") and name not in _STABLE_X else []
    if name in DEPRECATED:
        features.append("deprecated")
    return {"features": features} if features else {}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


class SchemaBuilder:
    """Collects entities, each type once, named in the order first met."""

    def __init__(self) -> None:
        self.entities: list[SchemaInfo] = []
        self._names: dict[Any, str] = {}
        self._builtins: set[str] = set()
        self._next = 0
        self.type_name(Empty)  # "0", as in QEMU

    def _masked(self, key: Any) -> str:
        name = str(self._next)
        self._next += 1
        self._names[key] = name
        return name

    def type_name(self, tp: Any) -> str:
        tp = _strip(tp)
        if tp in _BUILTINS:
            name, json_type = _BUILTINS[tp]
            if name not in self._builtins:
                self._builtins.add(name)
                self.entities.append({"name": name, "meta-type": "builtin", "json-type": json_type})
            return name
        origin = typing.get_origin(tp)
        if origin in (list, tuple, typing.Sequence):
            return self._array(typing.get_args(tp)[0])
        if origin is dict:
            return self.type_name(Any)  # a free-form object, as QEMU's 'any'
        key = tp if not isinstance(tp, list) else tuple(tp)
        if key in self._names:
            return self._names[key]
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return self._object(tp)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self._enum(tp, [str(m.value) for m in tp])
        if origin is typing.Literal:
            return self._enum(tp, [str(v) for v in typing.get_args(tp)])
        if _is_union(tp):
            return self._alternate(tp)
        raise TypeError(f"no QAPI introspection for {tp!r}")

    def _array(self, element: Any) -> str:
        inner = self.type_name(element)
        name = f"[{inner}]"
        if name not in self._names:
            self._names[name] = name
            self.entities.append({"name": name, "meta-type": "array", "element-type": inner})
        return name

    def _object(self, model: type[BaseModel]) -> str:
        name = self._masked(model)
        entity: SchemaInfo = {"name": name, "meta-type": "object", "members": []}
        self.entities.append(entity)  # before its members: a model may refer to itself
        union = getattr(model, "qapi_union", None)
        fields = model.model_fields
        if isinstance(union, QapiUnion) and union.base is not None:
            fields = {n: fields[n] for n in union.base}
        for field_name, info in fields.items():
            # pydantic keeps Annotated's markers in .metadata, not in .annotation
            kind = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
            member: dict[str, Any] = {
                "name": info.alias or field_name,
                "type": self.type_name(kind),
            }
            if not info.is_required():
                member["default"] = None  # QEMU: optional, no default advertised
            member.update(_features(member["name"]))
            entity["members"].append(member)
        if isinstance(union, QapiUnion):
            # QEMU's flat union: the base's members, the tag, and per case an object of
            # that case's own members (qapi/introspect.json's SchemaInfoObject).
            tag = model.model_fields[union.tag]
            entity["tag"] = tag.alias or union.tag
            entity["variants"] = [
                {"case": case, "type": self.type_name(variant)}
                for case, variant in union.described().items()
            ]
        return name

    def _enum(self, key: Any, values: list[str]) -> str:
        name = self._masked(key)
        self.entities.append(
            {
                "name": name,
                "meta-type": "enum",
                "members": [{"name": v, **_features(v)} for v in values],
                "values": values,
            }
        )
        return name

    def _alternate(self, union: Any) -> str:
        name = self._masked(union)
        entity: SchemaInfo = {"name": name, "meta-type": "alternate", "members": []}
        self.entities.append(entity)
        entity["members"] = [{"type": self.type_name(a)} for a in typing.get_args(union)]
        return name


def build_schema() -> list[SchemaInfo]:
    """Every registered command and event with the types they use."""
    builder = SchemaBuilder()
    heads: list[SchemaInfo] = []
    for name, cmd in sorted(COMMANDS.items()):
        heads.append(
            {
                "name": name,
                "meta-type": "command",
                "arg-type": builder.type_name(cmd.arguments),
                "ret-type": builder.type_name(cmd.result),
                **_features(name),
            }
        )
    for name, model in sorted(EVENTS.items()):
        heads.append({"name": name, "meta-type": "event", "arg-type": builder.type_name(model)})
    return heads + builder.entities


@command(
    "query-qmp-schema",
    Empty,
    list[dict[str, Any]],
    "Describe every command and event migd accepts or sends, with their argument and "
    "result types, in QEMU's SchemaInfo format (type names masked as numbers, as QEMU "
    "does; builtins keep their names). Built from the same models that check requests.",
)
async def query_qmp_schema(ctx: Context, args: Empty) -> list[SchemaInfo]:
    return build_schema()
