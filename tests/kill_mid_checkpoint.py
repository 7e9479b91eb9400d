"""`kill_mid_checkpoint.py N train.py ARGS...`: runs the trainer and SIGKILLs it in the middle of writing checkpoint N.

The kill lands after accelerate has written the model and optimizer into `step_N.tmp` and
before the trainer's own files and the rename, as a preemption without grace would.
"""

import os
import signal
import sys

import safetensors.torch

from fixmatch_accel.cli import main

kill_step = int(sys.argv[1])
real_save_file = safetensors.torch.save_file  # save_checkpoint imports it at each call


def save_file_then_die(tensors, path, *args, **kwargs):
    real_save_file(tensors, path, *args, **kwargs)
    if f"step_{kill_step}.tmp" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)


safetensors.torch.save_file = save_file_then_die
sys.exit(main(sys.argv[3:]))  # argv[2] is train.py, as conftest.run_train passes it
