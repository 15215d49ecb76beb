"""Daemon configuration: a TOML file (kebab-case keys) overridden by command-line options.

Every problem in the file becomes one ConfigError line naming the file and the key, e.g.
"/etc/migd/migd.toml: parameters.multifd-channels: must be between 1 and 255".
"""

from __future__ import annotations

import difflib
import enum
import os
import stat
import tomllib
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from ..api.memory import ObjectAddArgs
from ..errors import ConfigError
from ..limits import CHANNELS_MAX, CHANNELS_MIN, channels_in_range
from ..migration.settings import (
    Capabilities,
    Parameters,
    SettingError,
    apply_capabilities,
    apply_parameters,
    field_types,
)
from ..pages import PAGE_SIZE
from ..qapi import QAPI_INT_ERROR, QapiInt, Size
from ..qmp.validation import QapiModel, qapi_name
from ..state.memory import ID_RE
from ..state.paths import MAX_SOCKET_PATH_BYTES, FileRefused, kind_of, resolve_trusted
from ..units import size_bytes
from .locations import DEFAULT_CONFIG_PATH, default_socket_path


class KeyedError(ValueError):
    """A model-level problem that belongs to one of the model's keys."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class Section(QapiModel):
    """Base of every table in the file: the keys are QMP's member names (kebab-case, as
    'multifd-channels' and object-add's 'mem-path'), TOML types as they are, no extras.
    Config(socket_path=...) works from Python; _parse takes the file's keys only."""


def _absolute(value: str) -> str:
    if "\0" in value:
        raise ValueError("must not hold a NUL byte")
    if not os.path.isabs(value):
        raise ValueError(f"must be an absolute path, not '{value}'")
    return os.path.normpath(value)


def _config_type(kind: Any) -> Any:
    """A setting's type as the file may write it: plain TOML values, integers within
    their QAPI type, the rest checked below as migrate-set-* checks it."""
    if typing.get_origin(kind) is Annotated:
        kind, *metadata = typing.get_args(kind)
        qapi = [m for m in metadata if isinstance(m, QapiInt)]
        if qapi:
            return Annotated[kind, *qapi]
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return Literal[tuple(m.value for m in kind)]  # "must be 'none' or 'multifd'"
    return kind


def _optional_fields(settings: Any) -> dict[str, Any]:
    return {name: (_config_type(kind) | None, None) for name, kind in field_types(settings).items()}


class _CapabilitiesBase(Section):
    """Migration capabilities set at start, as with migrate-set-capabilities."""


class _ParametersBase(Section):
    """Migration parameters set at start, as with migrate-set-parameters."""

    # Before the type's own check, in the words of the command line's options.
    @field_validator("multifd_channels", mode="before", check_fields=False)
    @classmethod
    def _channels(cls, value: Any) -> Any:
        if _is_int(value) and not channels_in_range(value):
            raise ValueError(f"must be between {CHANNELS_MIN} and {CHANNELS_MAX}")
        return value

    @field_validator("max_bandwidth", mode="before", check_fields=False)
    @classmethod
    def _bandwidth(cls, value: Any) -> Any:
        if _is_int(value) and value < 0:
            raise ValueError("must be 0 (unlimited) or more bytes per second")
        return value


def _size_text(value: Any) -> Any:
    """A size written as text ("1G", QEMU's size syntax, as object-add's `size` on
    QEMU's command line) as its bytes; anything else as it is, for the field's own type."""
    if isinstance(value, str):
        size = size_bytes(value)
        if size is None:
            raise ValueError(f"must be a size like 1073741824 or \"1G\", not '{value}'")
        return size
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


CapabilitiesConfig = create_model(
    "CapabilitiesConfig", __base__=_CapabilitiesBase, **_optional_fields(Capabilities)
)
ParametersConfig = create_model(
    "ParametersConfig", __base__=_ParametersBase, **_optional_fields(Parameters)
)


class BackendConfig(ObjectAddArgs):
    """One memory backend created at start: object-add's arguments, with every check made
    when the file is read, in the file's words."""

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not ID_RE.fullmatch(value):
            raise ValueError(
                "must be an identifier: a letter, then letters, digits, '.', '_' or '-'"
            )
        return value

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        value = _size_text(value)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if is_int and (value <= 0 or value % PAGE_SIZE):
            raise ValueError(f"must be a positive multiple of {PAGE_SIZE} bytes")
        return value

    @field_validator("mem_path")
    @classmethod
    def _mem_path(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("/dev/fdset/"):
            raise ValueError("cannot name an fd set: none exists when migd starts")
        return None if value is None else _absolute(value)

    @field_validator("ramblock_name")
    @classmethod
    def _ramblock_name(cls, value: str | None) -> str | None:
        if value is not None and not 1 <= len(value.encode()) <= 255:
            raise ValueError("must be 1 to 255 bytes long")
        return value

    @model_validator(mode="after")
    def _by_type(self) -> BackendConfig:
        if self.qom_type == "memory-backend-file":
            if self.mem_path is None:
                raise KeyedError("mem-path", "is required for memory-backend-file")
        else:
            if self.mem_path is not None:
                raise KeyedError("mem-path", "is not allowed for memory-backend-ram")
            if self.share:
                raise KeyedError("share", "memory-backend-ram is always private (share = false)")
        return self


class Config(Section):
    """What `migd serve` runs with; every field is optional in the file."""

    socket_path: str = Field(default_factory=default_socket_path, alias="socket")
    socket_mode: int = 0o600
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    allowed_dirs: list[str] = Field(default_factory=list)
    # bytes/s of page I/O of all jobs together (0 = unlimited): x-migd-set-bandwidth
    max_bandwidth: Size = 0
    capabilities: CapabilitiesConfig = Field(default_factory=CapabilitiesConfig)
    parameters: ParametersConfig = Field(default_factory=ParametersConfig)
    memory_backends: list[BackendConfig] = Field(default_factory=list, alias="memory-backend")
    # The file this was read from (None: defaults), for errors found after reading it.
    _source: str | None = PrivateAttr(default=None)

    # Bytes/s written as object-add's size is ("1G"); [parameters] max-bandwidth stays an
    # integer, as QEMU's migrate-set-parameters takes it.
    @field_validator("max_bandwidth", mode="before")
    @classmethod
    def _max_bandwidth(cls, value: Any) -> Any:
        return _size_text(value)

    def where(self, key: str) -> str:
        """'FILE: KEY: ' for an error about `key` of the file, as the file's own errors say."""
        return f"{self._source}: {key}: " if self._source else ""

    @field_validator("socket_path")
    @classmethod
    def _socket(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        if "\0" in value:
            raise ValueError("must not hold a NUL byte")
        if not os.path.isabs(value):  # under systemd the working directory is /
            raise ValueError(f"must be an absolute path, not '{value}'")
        if len(os.fsencode(value)) > MAX_SOCKET_PATH_BYTES:
            raise ValueError(
                f"is longer than {MAX_SOCKET_PATH_BYTES} bytes (a UNIX socket path holds at "
                f"most {MAX_SOCKET_PATH_BYTES})"
            )
        return value

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        text = 'must be a mode from 0o000 to 0o777, written 0o660 or "0660"'
        if isinstance(value, str):
            try:
                value = int(value, 8)
            except ValueError:
                raise ValueError(text) from None
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= 0o777:
            raise ValueError(text)
        return value

    @field_validator("allowed_dirs")
    @classmethod
    def _dirs(cls, value: list[str]) -> list[str]:
        for i, path in enumerate(value):
            if "\0" in path:
                raise KeyedError(f"[{i}]", "must not hold a NUL byte")
            if not os.path.isabs(path):
                raise KeyedError(f"[{i}]", f"must be an absolute path, not '{path}'")
        return [os.path.normpath(p) for p in value]

    @model_validator(mode="after")
    def _settings(self) -> Config:
        """The tables as a whole, checked as migrate-set-capabilities and
        migrate-set-parameters check them (the daemon applies them in that order)."""
        caps = self.capabilities.model_dump(exclude_none=True)
        params = self.parameters.model_dump(exclude_none=True)
        try:
            applied = apply_capabilities(Capabilities(), caps, Parameters())
        except SettingError as exc:
            raise KeyedError(_setting_key("capabilities", exc), exc.desc) from None
        try:
            apply_parameters(Parameters(), params, applied)
        except SettingError as exc:
            raise KeyedError(_setting_key("parameters", exc), exc.desc) from None
        return self

    @model_validator(mode="after")
    def _unique_backends(self) -> Config:
        ids: dict[str, int] = {}
        blocks: dict[str, int] = {}
        for i, b in enumerate(self.memory_backends):
            if b.id in ids:
                raise KeyedError(
                    f"memory-backend[{i}].id",
                    f"'{b.id}' is already used by memory-backend[{ids[b.id]}]",
                )
            if b.block_name in blocks:
                raise KeyedError(
                    f"memory-backend[{i}].ramblock-name",
                    f"RAM block name '{b.block_name}' is already used by "
                    f"memory-backend[{blocks[b.block_name]}]",
                )
            ids[b.id] = blocks[b.block_name] = i
        return self


def _setting_key(table: str, exc: SettingError) -> str:
    return f"{table}.{exc.member}" if exc.member else table


# --- loading ----------------------------------------------------------------------------


def load_config(path: str | None = None, **overrides: Any) -> Config:
    """The file's Config (the default file if present, else defaults), then `overrides`.

    Overrides are Python field names with values already checked by the command line.
    Raises ConfigError with "FILE: KEY: problem" on any problem in the file.
    """
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    config = Config() if path is None else _parse(path)
    return config.model_copy(update=overrides) if overrides else config


MAX_CONFIG_BYTES = 1 << 20  # a configuration is a few KiB; /dev/zero is not one


def _read_trusted(path: str) -> bytes:
    """The configuration's bytes, if it is a file only root or migd's user can change.

    Whoever can write it decides what root's migd listens on, who may connect and which
    files it opens (red-team, session 14: a file of `nobody`'s in a 0777 directory set
    socket-mode 0666 and no allowed-dirs, silently). So, as sshd's StrictModes: the file
    and every directory on the way must belong to root or migd's uid and be writable by
    no one else (a sticky directory aside); it must be a regular file (a FIFO blocked
    the start for ever), opened without blocking, and no larger than MAX_CONFIG_BYTES.
    """
    trusted = {0, os.geteuid()}
    try:
        _, found = resolve_trusted(os.path.abspath(path), trusted)
    except FileRefused as exc:
        raise ConfigError(f"{path}: refused: {exc.desc}") from None
    if found is not None and stat.S_ISDIR(found.st_mode):
        raise ConfigError(f"{path}: cannot read: Is a directory")
    if found is not None and not stat.S_ISREG(found.st_mode):
        raise ConfigError(f"{path}: not a regular file (it is {kind_of(found.st_mode)})")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file (it is {kind_of(st.st_mode)})")
        if st.st_uid not in trusted or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"{path}: refused: owned by uid {st.st_uid} with mode "
                f"{stat.S_IMODE(st.st_mode):04o}; migd reads a configuration only if root or "
                "its own user owns it and no one else may write it"
            )
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {st.st_size} bytes: too large for a configuration")
        data = os.read(fd, MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: too large for a configuration")
    return data


def _parse(path: str) -> Config:
    try:
        data = tomllib.loads(_read_trusted(path).decode())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
    try:
        config = Config.model_validate(data, by_alias=True, by_name=False)
    except ValidationError as exc:
        key, message = describe_error(exc.errors()[0])
        raise ConfigError(f"{path}: {key}: {message}") from None
    config._source = path
    return config


def _key(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.startswith("["):
            out += part
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def describe_error(err: Any) -> tuple[str, str]:
    """(dotted key, plain-words problem) for one pydantic error of Config."""
    loc = tuple(err["loc"])
    kind = err["type"]
    ctx = err.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, KeyedError):
        sub = cause.key if cause.key.startswith("[") else f".{cause.key}"
        key = _key(loc) + sub if loc else cause.key
        return key, str(cause)
    if kind == "value_error" and cause is not None:
        return _key(loc), str(cause)
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]).replace("_", "-"), known, n=1)
        return _key(loc), "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
    plain = {
        "missing": "is required",
        "bool_type": "must be true or false",
        "int_type": "must be an integer",
        "string_type": "must be a string",
        "list_type": "must be an array",
        "model_type": "must be a table",
        "dict_type": "must be a table",
        "model_attributes_type": "must be a table",
    }
    if kind == "list_type" and loc == ("memory-backend",):
        return _key(loc), "must be an array of tables: write each one as [[memory-backend]]"
    if kind in plain:
        return _key(loc), plain[kind]
    if kind in ("literal_error", "enum"):
        return _key(loc), f"must be {ctx['expected']}"
    if kind == QAPI_INT_ERROR:
        qapi = ctx["qapi"]
        return _key(loc), f"must be an integer from {qapi.low} to {qapi.high}"
    return _key(loc), err["msg"][:1].lower() + err["msg"][1:]


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the table at `loc` accepts, for "did you mean" hints."""
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = next(
            (f for name, f in model.model_fields.items() if (f.alias or qapi_name(name)) == part),
            None,
        )
        if field is None:
            return []
        annotation = field.annotation
        while typing.get_origin(annotation) is not None:
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return [f.alias or qapi_name(name) for name, f in model.model_fields.items()]
