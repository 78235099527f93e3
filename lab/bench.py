"""`python -m lab.bench`: the command line, whose code is lab.cli; this name is kept for the command people type."""
import sys

from lab.cli import main

if __name__ == "__main__":
    sys.exit(main())
