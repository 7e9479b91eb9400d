"""`fixmatch-train` / `python train.py`: parse the flags, run, turn input errors into one line."""

import sys
from functools import partial
from typing import List, Optional

from .errors import report_usage_errors


def _train(argv: Optional[List[str]]) -> int:
    from .config import parse_args

    cfg, sources = parse_args(argv)
    from .preflight import check_start  # imported late so `--help` and flag errors stay fast

    start = check_start(cfg, sources)  # before the training stack is imported
    from .stop import Stopped
    from .trainer import train

    try:
        train(cfg, sources, start)
    except Stopped as e:
        print(f"fixmatch-train: {'error: ' if e.error else ''}{e}", file=sys.stderr)
        return e.exit_code
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return report_usage_errors("fixmatch-train", partial(_train, argv))


if __name__ == "__main__":
    sys.exit(main())
