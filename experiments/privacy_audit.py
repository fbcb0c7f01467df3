"""Privacy audit of private AMHT-LRS: claimed epsilon versus a lower bound
measured with canaries (docs/privacy.md, "Audit").

    python experiments/privacy_audit.py [--quick] [--out DIR] [--seed N]

The same as ``lrs audit``; see ``lrs audit --help``. The rows: one noisy
aggregation and the whole fit with the crafted canary for epsilon in
{1, 2, 4, 8} (the fit scored by the final-U and by the transcript attacker),
the ordinary canary, a float32 run and the overflow canary (a 1e20-scaled user
in float32) at epsilon 8, and two broken controls that must be flagged (half
the noise; one key reused by every run). Table: lrs.studies.privacy_audit.
"""

import sys

from lrs.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
