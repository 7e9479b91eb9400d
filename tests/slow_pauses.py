"""`slow_pauses.py SECONDS train.py ARGS...`: runs the trainer with every evaluation and checkpoint SECONDS slower."""

import sys
import time

import fixmatch_accel.trainer as trainer
from fixmatch_accel.cli import main

delay = float(sys.argv[1])


def slowed(real):
    def run(*args, **kwargs):
        time.sleep(delay)
        return real(*args, **kwargs)
    return run


trainer.evaluate = slowed(trainer.evaluate)
trainer.save_checkpoint = slowed(trainer.save_checkpoint)
sys.exit(main(sys.argv[3:]))  # argv[2] is train.py, as conftest.run_train passes it
