"""QAPI's integer types as pydantic annotations, so that every integer member is checked
as QEMU's QObject input visitor checks it, with its texts (qmp/validation.py turns the
errors into them).

QEMU reads every unsigned member as a uint64 first ("Parameter 'x' expects uint64" for
anything else: a string, a fraction, 2^64), then narrows it ("Parameter 'x' expects
uint8_t"); a signed member outside int64 is "Invalid parameter type ..., expected:
integer". A member's own rule on top (multifd-channels >= 1) is a separate check with its
own text, which `CheckedAs` names as QEMU spells it ('multifd_channels').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

QAPI_INT_ERROR = "qapi_int_range"


@dataclass(frozen=True)
class QapiInt:
    """A QAPI integer type: its range and the name QEMU's visitor gives it in errors."""

    name: str  # "uint8_t", "uint64", "int64" ... as in QEMU's error texts
    low: int
    high: int

    @property
    def unsigned(self) -> bool:
        return self.low == 0

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def _check(self, value: int) -> int:
        if not self.low <= value <= self.high:
            raise PydanticCustomError(QAPI_INT_ERROR, "out of range", {"qapi": self})
        return value


@dataclass(frozen=True)
class Alternate:
    """A QAPI alternate of a type and JSON null, e.g. StrOrNull: a member of the wrong
    type is "Invalid parameter type for 'x', expected: StrOrNull" in QEMU's text, and
    introspection describes the member as an alternate of both."""

    name: str


@dataclass(frozen=True)
class CheckedAs:
    """The name QEMU's own range check of a member uses in its text."""

    name: str


UINT8_T = QapiInt("uint8_t", 0, (1 << 8) - 1)
UINT16_T = QapiInt("uint16_t", 0, (1 << 16) - 1)
UINT32_T = QapiInt("uint32_t", 0, (1 << 32) - 1)
UINT64_T = QapiInt("uint64", 0, (1 << 64) - 1)
INT64_T = QapiInt("int64", -(1 << 63), (1 << 63) - 1)

Uint8 = Annotated[int, UINT8_T]
Uint16 = Annotated[int, UINT16_T]
Uint32 = Annotated[int, UINT32_T]
Uint64 = Annotated[int, UINT64_T]
Int64 = Annotated[int, INT64_T]
Size = Uint64  # QAPI 'size': read and checked as a uint64, with the same texts

StrOrNull = Annotated[str | None, Alternate("StrOrNull")]


class QapiStruct(BaseModel):
    """A QAPI struct that lives below the QMP layer (a migration parameter's value):
    QAPI member names, strict JSON types, no extra members, immutable."""

    model_config = ConfigDict(
        alias_generator=lambda name: name.replace("_", "-"),
        populate_by_name=True,
        extra="forbid",
        strict=True,
        frozen=True,
    )
