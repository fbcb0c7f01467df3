"""Private AMHT-LRS: error versus epsilon and versus users (docs/privacy.md).

    python experiments/privacy_utility.py [--quick] [--out DIR] [--seed N]

The same as ``lrs dp``; see ``lrs dp --help``.
"""

import sys

from lrs.cli import main

if __name__ == "__main__":
    sys.exit(main(["dp", *sys.argv[1:]]))
