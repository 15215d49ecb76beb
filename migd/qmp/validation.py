"""Argument models' base class and the pydantic error -> QEMU text mapping.

QEMU clients match on QEMU's error texts, so no pydantic wording may reach the wire.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import annotated_types
from pydantic import (
    BaseModel,
    ConfigDict,
    GetJsonSchemaHandler,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from ..errors import InvalidRequest
from ..qapi import QAPI_INT_ERROR, UINT64_T, Alternate, CheckedAs, QapiInt


def qapi_name(name: str) -> str:
    """QAPI member names use dashes where Python uses underscores."""
    return name.replace("_", "-")


class QapiModel(BaseModel):
    """Base of every argument and result model: QAPI names, strict JSON types, no extras."""

    model_config = ConfigDict(
        alias_generator=qapi_name,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        use_enum_values=False,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _optional_null_is_a_wrong_type(cls, value: Any, info: ValidationInfo) -> Any:
        """QEMU's visitor: an optional member sent as JSON null has the wrong type (absent
        is fine), unless null is one of its values (an alternate such as StrOrNull).
        Requests only (validate's context): migd builds replies with None members."""
        if value is None and info.context is _REQUEST and info.field_name is not None:
            field = cls.model_fields[info.field_name]
            kind = _null_error(field.annotation, field.metadata)
            if kind is not None:
                raise PydanticCustomError(kind, "null")
        return value


# validate()'s context: what marks a client's request (and its nested members).
_REQUEST: dict[str, bool] = {"request": True}


def _null_error(annotation: Any, metadata: list[Any]) -> str | None:
    """The type error for null in an optional member `X | None`, named by X's JSON type;
    None where null is a value (an alternate) or pydantic refuses it already."""
    if any(isinstance(m, Alternate) for m in metadata):
        return None
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    branches = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(branches) != 1 or len(branches) == len(typing.get_args(annotation)):
        return None
    tp, inner = _strip(branches[0])
    if any(isinstance(m, Alternate) for m in inner):
        return None
    origin = typing.get_origin(tp) or tp
    for types_, kind in _NULL_ERRORS:
        if isinstance(origin, type) and issubclass(origin, types_):
            return kind
    return None


# bool before int: a bool is an int in Python, not in JSON.
_NULL_ERRORS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "bool_type"),
    (int, "int_type"),
    ((str, enum.Enum), "string_type"),
    (float, "float_type"),
    (list, "list_type"),
    ((dict, BaseModel), "dict_type"),
)


class Empty(QapiModel):
    """No arguments / an empty object result."""


class ArgumentError(InvalidRequest, ValueError):
    """An InvalidRequest raised inside a validator: pydantic records a ValueError in its
    place among the other members' errors, and translate() hands it back as it is."""


@dataclass(frozen=True)
class QapiUnion:
    """A QAPI flat union: the model's own fields are its base (the tag among them), the
    members of each case those of `variants[case]` (a case not listed has none). Cases
    outside `introspected` (None: all) are checked as QEMU checks them but left out of
    query-qmp-schema: migd refuses them after the check, and a prober must not read
    them as supported. `base` (None: every field) narrows the base members introspection
    shows, for a union whose model also holds its variants' members (object-add)."""

    tag: str
    variants: Mapping[str, type[QapiModel]]
    introspected: frozenset[str] | None = None
    base: tuple[str, ...] | None = None

    def described(self) -> dict[str, type[QapiModel]]:
        return {
            case: model
            for case, model in self.variants.items()
            if self.introspected is None or case in self.introspected
        }


class QapiUnionModel(QapiModel):
    """A flat union's base; its case's members arrive as extras and are checked by
    check_variant(), which the containing model calls with the member's path (QEMU names
    a nested member by its full path: 'channels[0].addr.port')."""

    model_config = ConfigDict(extra="allow")
    qapi_union: ClassVar[QapiUnion]
    _variant: QapiModel | None = PrivateAttr(None)

    def check_variant(self, loc: tuple[Any, ...]) -> QapiModel | None:
        """The case's members as their model, checked as QEMU's visitor does (presence
        and types, then members it does not know); a nested union's in turn."""
        tag = getattr(self, self.qapi_union.tag)
        case = tag.value if isinstance(tag, enum.Enum) else str(tag)
        model = self.qapi_union.variants.get(case)
        extra = dict(self.model_extra or {})
        if model is None:
            if extra:
                name = _full_name((*loc, next(iter(extra))))
                raise ArgumentError(f"Parameter '{name}' is unexpected")
            return None
        try:
            variant = model.model_validate(extra, context=_REQUEST)
        except ValidationError as exc:
            raise ArgumentError(translate(model, exc, prefix=loc).desc) from None
        if isinstance(variant, QapiUnionModel):
            variant.check_variant(loc)
        self._variant = variant
        return variant

    @property
    def variant(self) -> QapiModel | None:
        return self._variant

    @classmethod
    def __get_pydantic_json_schema__(cls, core: Any, handler: GetJsonSchemaHandler) -> Any:
        """The JSON Schema (schemas/*.json): the base, and per described case its members
        (`oneOf`), as query-qmp-schema describes them."""
        schema = handler(core)
        target = handler.resolve_ref_schema(schema)
        tag = cls.model_fields[cls.qapi_union.tag]
        cases = []
        for case, model in cls.qapi_union.described().items():
            variant = model.model_json_schema()
            assert "$defs" not in variant, "a described case refers to no other type"
            variant.pop("title", None)
            variant["properties"] = {tag.alias or cls.qapi_union.tag: {"const": case},
                                     **variant.get("properties", {})}  # fmt: skip
            cases.append(variant)
        target["oneOf"] = cases
        return schema


_JSON_TYPE_BY_ERROR = {
    "int_type": "integer",
    "int_parsing": "integer",
    "int_from_float": "integer",
    "string_type": "string",
    "bool_type": "boolean",
    "dict_type": "object",
    "model_type": "object",
    "model_attributes_type": "object",
    "list_type": "array",
    "tuple_type": "array",
    "float_type": "number",
    "bytes_type": "string",
}


def _member_name(loc: tuple[Any, ...]) -> str:
    """The member's own name; a list element has none ('null' in QEMU's texts)."""
    for part in reversed(loc):
        if isinstance(part, int):
            return "null"
        if isinstance(part, str) and not part.startswith("function-"):
            return part
    return "null"


def _full_name(loc: tuple[Any, ...]) -> str:
    """QEMU's full member path for type and presence errors: 'capabilities[0].state'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.startswith("function-"):
            out += f".{part}" if out else part
    return out or "null"


def _strip(annotation: Any) -> tuple[Any, list[Any]]:
    """Peel Optional/Annotated so the concrete type of a member is left, with constraints."""
    metadata: list[Any] = []
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation, *extra = typing.get_args(annotation)
            for item in extra:
                # Field(...) inside Annotated carries its constraints in .metadata
                metadata.extend(getattr(item, "metadata", None) or [item])
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0]
        else:
            return annotation, metadata


def _field_at(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, list[Any]]:
    """The annotation and constraint metadata of the member `loc` points to."""
    annotation: Any = model
    metadata: list[Any] = []
    for part in loc:
        annotation, _ = _strip(annotation)
        if isinstance(part, int):
            args = typing.get_args(annotation)
            annotation, metadata = (args[0] if args else Any), []
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = next(
                (f for n, f in annotation.model_fields.items() if part in (n, f.alias)), None
            )
            if field is None:
                return Any, []
            annotation, metadata = field.annotation, list(field.metadata)
        else:
            return Any, []
    annotation, inner = _strip(annotation)
    return annotation, metadata + inner


def _expects(model: type[BaseModel], loc: tuple[Any, ...], err: ErrorDetails) -> str:
    annotation, metadata = _field_at(model, loc)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation.__name__
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(repr(v) for v in typing.get_args(annotation))
    # annotated_types types its bounds as merely comparable; the models' bounds are ints.
    low: int | None = None
    high: int | None = None
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            low = typing.cast(int, m.ge)
        elif isinstance(m, annotated_types.Gt):
            low = cast(int, m.gt) + 1
        elif isinstance(m, annotated_types.Le):
            high = typing.cast(int, m.le)
        elif isinstance(m, annotated_types.Lt):
            high = cast(int, m.lt) - 1
    if low is not None and high is not None:
        return f"a value between {low} and {high}"
    if low is not None:
        return "a non-negative value" if low == 0 else f"a value of at least {low}"
    if high is not None:
        return f"a value of at most {high}"
    ctx = err.get("ctx") or {}
    if "error" in ctx:
        return str(ctx["error"])
    return "a valid value"


def translate(
    model: type[BaseModel], exc: ValidationError, prefix: tuple[Any, ...] = ()
) -> InvalidRequest:
    """Turn the first pydantic error into QEMU's wording for that kind of mistake;
    `prefix` is where `model` sits in the request (a union's case: its members' path)."""
    errors = exc.errors(include_url=False)
    # Report missing members before type errors, as QEMU's visitor walks members in order.
    err = errors[0]
    loc = tuple(err["loc"])
    # QEMU names the member by its full path for presence and type errors, by its own
    # name for values it does not accept.
    name, full = _member_name(loc), _full_name((*prefix, *loc))
    kind = err["type"]
    _, metadata = _field_at(model, loc)
    qapi = next((m for m in metadata if isinstance(m, QapiInt)), None)
    if qapi is not None and (kind == QAPI_INT_ERROR or kind in _JSON_TYPE_BY_ERROR):
        return InvalidRequest(_qapi_int_text(qapi, kind, err.get("input"), name, full))
    checked = next((m.name for m in metadata if isinstance(m, CheckedAs)), None)
    if kind == "missing":
        return InvalidRequest(f"Parameter '{full}' is missing")
    if kind == "extra_forbidden":
        return InvalidRequest(f"Parameter '{full}' is unexpected")
    if kind in _JSON_TYPE_BY_ERROR:
        alternate = next((m.name for m in metadata if isinstance(m, Alternate)), None)
        expected = alternate or _JSON_TYPE_BY_ERROR[kind]
        return InvalidRequest(f"Invalid parameter type for '{full}', expected: {expected}")
    if kind in ("enum", "literal_error"):
        value = err.get("input")
        if not isinstance(value, str):
            return InvalidRequest(f"Invalid parameter type for '{full}', expected: string")
        return InvalidRequest(f"Parameter '{name}' does not accept value '{value}'")
    if kind == "value_error" and isinstance((err.get("ctx") or {}).get("error"), InvalidRequest):
        return err["ctx"]["error"]
    return InvalidRequest(f"Parameter '{checked or name}' expects {_expects(model, loc, err)}")


def _qapi_int_text(qapi: QapiInt, kind: str, value: Any, name: str, full: str) -> str:
    """QEMU's QObject input visitor: an unsigned member is read as a uint64 first, then
    narrowed; a signed one as an int64."""
    if not qapi.unsigned:
        return f"Invalid parameter type for '{full}', expected: integer"
    if kind != QAPI_INT_ERROR or not isinstance(value, int) or value > UINT64_T.high:
        return f"Parameter '{full}' expects uint64"
    if value < 0 and qapi == UINT64_T:
        # QEMU takes a negative uint64 as 2^64 + value; migd refuses it (a listed
        # difference), in the same words.
        return f"Parameter '{full}' expects uint64"
    return f"Parameter '{name}' expects {qapi.name}"


def validate(model: type[QapiModel], arguments: dict[str, Any]) -> QapiModel:
    try:
        return model.model_validate(arguments, context=_REQUEST)
    except ValidationError as exc:
        raise translate(model, exc) from None
