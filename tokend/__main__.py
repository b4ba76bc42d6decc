"""`python -m tokend` runs the command-line interface."""

import sys

from tokend.cli import main

sys.exit(main())
