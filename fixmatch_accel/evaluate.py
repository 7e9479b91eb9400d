"""Top-1, top-5 and per-class accuracy over every process's share of the eval set."""

from functools import partial
from typing import Callable, Dict

import torch
from tqdm.auto import tqdm

from .data.rows import unreadable_mask, valid_mask
from .launch import from_main_process
from .xla import sync


@torch.no_grad()
def evaluate(model, loader, accelerator, prepare_inputs: Callable, num_classes: int, show_progress: bool = False,
             sharded: bool = False) -> Dict:
    """Evaluate `model` (already in eval mode) on a loader of (uint8 images, labels, rows).

    A prepared loader: `gather_for_metrics` drops the samples that the last uneven
    batch repeats, so each image counts once. A `sharded` loader (a stream split by
    node, or a loader padded to full batches on XLA) gives each process a disjoint share: counts stay local and
    are summed once at the end. Unreadable images (data.rows.unreadable_mask) are left out and counted;
    padding (row PAD_ROW, which keeps every batch one shape on XLA) is left out.
    Counts accumulate on the device; one host transfer at the end.
    """
    k = min(5, num_classes)
    device = accelerator.device
    correct1 = torch.zeros(num_classes, device=device)
    correct5 = torch.zeros((), device=device)
    total = torch.zeros(num_classes, device=device)
    skipped = torch.zeros((), device=device)
    xla = device.type == "xla"
    if xla:  # the counters become graph inputs, so every batch is one and the same graph
        sync()
    for images, labels, rows in tqdm(loader, desc="eval", leave=False, disable=not show_progress):
        with accelerator.autocast():
            logits = model(prepare_inputs(images))
        topk = logits.float().topk(k, dim=-1).indices
        if not sharded:
            topk, labels, rows = accelerator.gather_for_metrics((topk, labels, rows))
        valid = valid_mask(rows).float()
        hit1 = (topk[:, 0] == labels).float() * valid
        correct1.index_add_(0, labels, hit1)
        correct5 += ((topk == labels[:, None]).any(dim=-1).float() * valid).sum()
        total.index_add_(0, labels, valid)
        skipped += unreadable_mask(rows).float().sum()
        if xla:  # one graph per batch (a stream's loader does not cut graphs as accelerate's loader does)
            sync()
    counts = torch.cat([correct1, correct5.view(1), total, skipped.view(1)])
    if sharded:
        counts = accelerator.reduce(counts, reduction="sum")  # one collective
    counts = counts.cpu()  # the one host transfer
    correct1, correct5, total, skipped = counts.split([num_classes, 1, num_classes, 1])
    n = total.sum().clamp(min=1)
    return {
        "top1": float(correct1.sum() / n * 100),
        "top5": float(correct5 / n * 100),
        "top_k": k,  # what top5 measures: top-k with k = min(5, classes)
        "per_class": [float(c / t * 100) if t > 0 else None for c, t in zip(correct1, total)],
        "num_eval": int(total.sum()),
        "skipped_images": int(skipped),
    }


class Evaluator:
    """Evaluates the EMA model every --eval_steps (and at the end) and logs the eval row."""

    def __init__(self, accelerator, cfg, ema, loader, prepare_inputs: Callable, num_classes: int, *,
                 sharded: bool, skipped_before: int, log, show_progress: bool):
        self.accelerator, self.ema, self.loader, self.log = accelerator, ema, loader, log
        self.every, self.last = cfg.eval_steps, cfg.max_train_steps
        self.run = partial(self._evaluate, prepare_inputs=prepare_inputs, num_classes=num_classes,
                           show_progress=show_progress, sharded=sharded)
        self.skipped_before = skipped_before  # unreadable eval images the decoded cache left out before the loader

    @staticmethod
    def _evaluate(*args, **kwargs) -> Dict:
        return evaluate(*args, **kwargs)  # looked up at each call, so tests can wrap it

    def due(self, step: int) -> bool:
        """At --eval_steps intervals; the last step's evaluation is the final one."""
        return bool(self.every) and step % self.every == 0 and step != self.last

    def __call__(self, step: int) -> Dict:
        # Each process blends its own BatchNorm statistics into its EMA (DDP re-sends the live buffers only at
        # the next forward), so the processes' EMAs drift apart: all evaluate process 0's, the saved one.
        from_main_process(self.accelerator, self.ema.module)
        result = self.run(self.ema.module, self.loader, self.accelerator)
        result["skipped_images"] += self.skipped_before
        self.log.write_eval(step, result)
        return result
