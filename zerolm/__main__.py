"""`python -m zerolm ...` is the same as the `zerolm` command."""

import sys

from zerolm.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn re-imports this module
    sys.exit(main())
