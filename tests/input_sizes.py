"""`input_sizes.py OUT_FILE train.py ARGS...`: runs the trainer; writes the model's input sizes (H, W) to OUT_FILE."""

import json
import sys

import fixmatch_accel.trainer as trainer
from fixmatch_accel.cli import main

out_file, seen = sys.argv[1], set()
real_create_model = trainer.create_model


def create_model_recording_inputs(*args, **kwargs):
    model = real_create_model(*args, **kwargs)
    model.register_forward_pre_hook(lambda module, inputs: seen.add(tuple(inputs[0].shape[-2:])))
    return model


trainer.create_model = create_model_recording_inputs
try:
    code = main(sys.argv[3:])  # argv[2] is train.py, as conftest.run_train passes it
finally:
    with open(out_file, "w") as f:
        json.dump(sorted(seen), f)
sys.exit(code)
