"""Runs of True in a bool array: the zero scan's zero runs, a bitmap's present pages.
Below every layer, as pages.py."""

from __future__ import annotations

import numpy as np


def true_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and stops of the runs of True in a bool array."""
    padded = np.concatenate(([False], mask, [False]))
    # With False on both ends, edges alternate rise/fall, so they pair up as runs.
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return edges[0::2], edges[1::2]
