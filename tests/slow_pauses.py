"""`slow_pauses.py SECONDS train.py ARGS...`: runs the trainer with every evaluation and checkpoint SECONDS slower."""

import sys
import time

import fixmatch_accel.checkpoint as checkpoint
import fixmatch_accel.evaluate as evaluate_module
from fixmatch_accel.cli import main

delay = float(sys.argv[1])


def slowed(real):
    def run(*args, **kwargs):
        time.sleep(delay)
        return real(*args, **kwargs)
    return run


evaluate_module.evaluate = slowed(evaluate_module.evaluate)
checkpoint.save_checkpoint = slowed(checkpoint.save_checkpoint)
sys.exit(main(sys.argv[3:]))  # argv[2] is train.py, as conftest.run_train passes it
