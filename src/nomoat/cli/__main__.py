"""`python -m nomoat.cli`: the same as the `nomoat` console script."""

import sys

from nomoat.cli import main

sys.exit(main())
