"""`fixmatch-train` / `python train.py`: parse the flags, run, turn input errors into one line."""

import sys
from typing import List, Optional

from .errors import UsageError


def main(argv: Optional[List[str]] = None) -> int:
    from .config import parse_args

    try:
        cfg, sources = parse_args(argv)
        from .trainer import Stopped, train  # imported late so `--help` stays fast

        try:
            train(cfg, sources)
        except Stopped as e:
            print(f"fixmatch-train: {'' if e.exit_code == 0 else 'error: '}{e}", file=sys.stderr)
            return e.exit_code
    except UsageError as e:
        print(f"fixmatch-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
