"""`nan_at_step.py N train.py ARGS...`: runs the trainer with step N's loss (1-based) made NaN, as a bad batch would."""

import sys

import fixmatch_accel.step as step
from fixmatch_accel.cli import main

bad_step, calls = int(sys.argv[1]), [0]
real_loss = step.fixmatch_loss


def loss_with_one_nan(*args, **kwargs):
    calls[0] += 1
    loss, stats = real_loss(*args, **kwargs)
    if calls[0] == bad_step:
        loss = loss * float("nan")
        stats = dict(stats, loss=loss.detach())
    return loss, stats


step.fixmatch_loss = loss_with_one_nan
sys.exit(main(sys.argv[3:]))  # argv[2] is train.py, as conftest.run_train passes it
