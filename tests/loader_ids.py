"""Launched by tests under two processes: record the row ids each process draws in one pass (the unlabeled
loader: two passes, 'unlabeled' and 'unlabeled_1').

Uses the trainer's own loader construction and accelerate's prepare (or, for a
stream, the trainer's own split by node), so it checks exactly the sharding that
training uses.
"""

import json
import sys

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed

from fixmatch_accel.config import parse_args
from fixmatch_accel.data import labeled_examples, load_data
from fixmatch_accel.data.pipeline import build_loaders
from fixmatch_accel.data.streaming import StreamLoader

out_path, argv = sys.argv[1], sys.argv[2:]
cfg, _ = parse_args(argv)
accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
set_seed(cfg.seed)  # as the trainer does: every process must draw the same permutation to shard it
data = load_data(cfg)
labeled_idx, labeled_rows, _ = labeled_examples(cfg, data, list(range(0, data.num_train, 7)))
loaders = build_loaders(cfg, data, labeled_idx, labeled_rows, cfg.image_size, 2, "accelerator", accelerator)
ids = {}
for name in ("labeled", "unlabeled"):
    loader = loaders[name]
    if not isinstance(loader, StreamLoader):
        loader = accelerator.prepare(loader)
    for epoch in range(2 if name == "unlabeled" else 1):
        loader.set_epoch(epoch)
        ids[name + (f"_{epoch}" if epoch else "")] = torch.cat([batch[-1] for batch in loader]).tolist()
with open(f"{out_path}.{accelerator.process_index}", "w") as f:
    json.dump(dict(ids, world=accelerator.num_processes, num_train=data.num_train, labeled_idx=labeled_idx,
                   num_unlabeled=data.unlabeled.num_rows), f)
