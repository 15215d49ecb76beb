"""`python -m migd.bench`: the same as `migd bench`."""

import sys

from . import main

sys.exit(main())
