"""Train FixMatch: `accelerate launch train.py --dataset_name ...`; with no flag, a short CPU demo on digits."""

import sys

from fixmatch_accel.cli import main

if __name__ == "__main__":
    sys.exit(main())
