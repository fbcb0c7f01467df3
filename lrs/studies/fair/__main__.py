"""``python -m lrs.studies.fair``: :func:`lrs.studies.fair.main`."""

import sys

from lrs.studies.fair.cli import main

if __name__ == "__main__":
    sys.exit(main())
