"""`nan_at_step.py N train.py ARGS...`: runs the trainer with step N's loss (1-based) made NaN, as a bad batch would."""

import sys

from fixmatch_accel.algorithms.objective import Objective
from fixmatch_accel.cli import main

bad_step, calls = int(sys.argv[1]), [0]
real_loss = Objective.__call__


def loss_with_one_nan(*args, **kwargs):
    calls[0] += 1
    loss, stats, state = real_loss(*args, **kwargs)
    if calls[0] == bad_step:
        loss = loss * float("nan")
        stats = dict(stats, loss=loss.detach())
    return loss, stats, state


Objective.__call__ = loss_with_one_nan
sys.exit(main(sys.argv[3:]))  # argv[2] is train.py, as conftest.run_train passes it
