"""One exception tree for migd; each class carries the QMP error class it maps to."""

from __future__ import annotations


class MigdError(Exception):
    """Base of every error migd reports; `desc` is the text a client sees."""

    qmp_class = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class CommandNotFound(MigdError):
    qmp_class = "CommandNotFound"


class DeviceNotFound(MigdError):
    """QEMU's class for an object named that does not exist (a thread-context, say)."""

    qmp_class = "DeviceNotFound"


class InvalidRequest(MigdError):
    """Malformed QMP input or arguments (QEMU's dispatcher texts)."""

    # The request as far as it was read, so that the error reply can echo its id.
    request: object | None = None


class ConfigError(MigdError):
    """A bad configuration file or command-line option."""


class BackendError(MigdError):
    """A memory backend cannot be created, found, or used."""


class MigrationError(MigdError):
    """A migration request is refused or a running migration fails."""


class FormatError(MigrationError):
    """A save file does not follow the mapped-ram stream format."""


class FdError(MigdError):
    """A passed file descriptor or fdset cannot be found or used."""


class ChannelError(MigrationError):
    """An I/O failure in a channel thread, worded for the job's error-desc."""


class MemoryFault(ChannelError):
    """The kernel could not reach a page of the mapping (EFAULT): its file shrank, or its
    memory could not be allocated. The channel asks the backend which, for the error;
    this text is only the last resort."""
