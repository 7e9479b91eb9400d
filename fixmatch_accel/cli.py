"""`fixmatch-train` / `python train.py`: parse the flags, run, turn input errors into one line."""

import sys
from functools import partial
from typing import List, Optional

from .errors import report_usage_errors


def _train(argv: Optional[List[str]]) -> int:
    from .config import parse_args

    cfg, sources = parse_args(argv)
    from .stop import Stopped  # imported late so `--help` stays fast
    from .trainer import train

    try:
        train(cfg, sources)
    except Stopped as e:
        print(f"fixmatch-train: {'' if e.exit_code == 0 else 'error: '}{e}", file=sys.stderr)
        return e.exit_code
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return report_usage_errors("fixmatch-train", partial(_train, argv))


if __name__ == "__main__":
    sys.exit(main())
