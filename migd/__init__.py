"""migd: save and restore memory regions to QEMU mapped-ram files, driven over QMP."""

__version__ = "0.1.0"
