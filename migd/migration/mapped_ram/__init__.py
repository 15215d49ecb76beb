"""QEMU's mapped-ram stream format."""
