"""`fixmatch-train` / `python train.py`: parse the flags, run, turn input errors into one line."""

import sys
from functools import partial
from typing import List, Optional

from .errors import UsageError, report_usage_errors


def _train(argv: Optional[List[str]]) -> int:
    from .config import name_the_source, parse_args

    cfg, sources = parse_args(argv)
    from .preflight import check_start  # imported late: a flag error stops before the augmentation modules load

    try:
        start = check_start(cfg, sources)  # before the training stack is imported
    except UsageError as e:
        raise name_the_source(e, cfg, sources) from None
    from .stop import Stopped
    from .trainer import train

    try:
        train(start.cfg, start.sources, start)
    except UsageError as e:  # a value a preset, config file or checkpoint set is named as theirs
        raise name_the_source(e, start.cfg, start.sources) from None
    except Stopped as e:
        print(f"fixmatch-train: {'error: ' if e.error else ''}{e}", file=sys.stderr)
        return e.exit_code
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return report_usage_errors("fixmatch-train", partial(_train, argv))


if __name__ == "__main__":
    sys.exit(main())
