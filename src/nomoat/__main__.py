"""`python -m nomoat`: the `nomoat` command line (what `torchrun -m nomoat train ...` starts in each process)."""

import sys

from nomoat.cli import main

sys.exit(main())
