"""Privacy audit of private AMHT-LRS: claimed epsilon versus a lower bound
measured with canaries (docs/privacy.md, "Audit").

    python experiments/privacy_audit.py [--quick] [--out DIR] [--seed N]

The same as ``lrs audit``; see ``lrs audit --help``.
"""

import sys

from lrs.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
