"""Top-1, top-5 and per-class accuracy over every process's share of the eval set."""

from typing import Callable, Dict

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate(model, loader, accelerator, prepare_inputs: Callable, num_classes: int, show_progress: bool = False) -> Dict:
    """Evaluate `model` (already in eval mode) on a prepared loader of (uint8 images, labels, indices).

    Correct counts accumulate on the device; `gather_for_metrics` drops the
    samples that the last uneven batch repeats, so each image counts once.
    """
    k = min(5, num_classes)
    correct1 = torch.zeros(num_classes, device=accelerator.device)
    correct5 = torch.zeros((), device=accelerator.device)
    total = torch.zeros(num_classes, device=accelerator.device)
    for images, labels, _ in tqdm(loader, desc="eval", leave=False, disable=not show_progress):
        with accelerator.autocast():
            logits = model(prepare_inputs(images))
        topk = logits.float().topk(k, dim=-1).indices
        topk, labels = accelerator.gather_for_metrics((topk, labels))
        hit1 = (topk[:, 0] == labels).float()
        correct1.index_add_(0, labels, hit1)
        correct5 += (topk == labels[:, None]).any(dim=-1).float().sum()
        total.index_add_(0, labels, torch.ones_like(hit1))
    # One host transfer for the whole evaluation.
    correct1, correct5, total = correct1.cpu(), correct5.cpu(), total.cpu()
    n = total.sum().clamp(min=1)
    return {
        "top1": float(correct1.sum() / n * 100),
        "top5": float(correct5 / n * 100),
        "per_class": [float(c / t * 100) if t > 0 else None for c, t in zip(correct1, total)],
        "num_eval": int(total.sum()),
    }
