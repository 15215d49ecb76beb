"""migd: save and restore memory regions to QEMU mapped-ram files, driven over QMP."""

__version__ = "0.1.0"

# The QEMU release whose migration interface migd implements: its QMP commands, arguments,
# replies and error texts, and its `migrate file:` mapped-ram files (tests/test_interop_qemu.py
# and tests/test_qemu_differential.py check migd against it). The QMP greeting and
# query-version report it in their `qemu` member, as management code that gates features
# on QEMU's version (mapped-ram and direct-io need >= 9.1) expects; `package` names migd.
QEMU_VERSION = (10, 0, 2)
