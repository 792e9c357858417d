"""`python -m llamaserve ...` is the `llamaserve` command."""

import sys

from llamaserve.entrypoints.cli import main

sys.exit(main())
