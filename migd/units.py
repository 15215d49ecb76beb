"""Sizes written with binary suffixes ("4096", "512K", "1G", "2GiB"): one parser for the
configuration file and the command line, each with its own error text. Below every
layer, as pages.py."""

from __future__ import annotations

import re

_SIZE = re.compile(r"(\d+)\s*([kmgtpe]?)(?:i?b)?", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def size_bytes(text: str) -> int | None:
    """The bytes `text` names (binary units K..E, optional 'B'/'iB'), or None."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        return None
    return int(match[1]) << _SHIFT[match[2].lower()]
