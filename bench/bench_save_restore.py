"""The save/restore benchmark suite: now `migd bench` (migd/bench.py); this script runs it.

    .venv/bin/python bench/bench_save_restore.py --size-gib 4 --runs 3 --out docs/bench

is the same as `.venv/bin/migd bench --size-gib 4 --runs 3 --out docs/bench`; see
`migd bench --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # migd from this checkout

from migd.bench import main

if __name__ == "__main__":
    sys.exit(main())
