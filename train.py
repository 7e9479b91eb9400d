"""Train FixMatch: `accelerate launch train.py --dataset_name ...`; with no flag, a short CPU demo on digits."""

import sys

from fixmatch_accel.cli import main as run


def main() -> int:
    """The entry accelerate's TPU launcher calls (tpu.yaml's main_training_function); it ignores return
    values, so a failed run must raise SystemExit to end with its status."""
    status = run()
    if status:
        raise SystemExit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
