"""`python -m zerolm ...` is the same as the `zerolm` command."""

import sys

from zerolm.cli import main

sys.exit(main())
