"""The application: command line, daemon wiring (signals, shutdown order), configuration."""

import os

# migd uses numpy for bitmaps and scans, never for linear algebra; OpenBLAS would still
# start a thread pool at import whose idle spinning took 2% of the daemon's CPU during
# saves and restores (perf, issue 19). Set before anything below imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
