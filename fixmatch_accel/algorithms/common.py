"""What the algorithms share: the weak-view probabilities, per-class counts, and the
weighted consistency loss with the stats every algorithm reports.

Pure tensor functions with static shapes: no `.item()`, no host sync, no branch on a
tensor's value, so they trace into one graph (torch.compile fullgraph, XLA).
"""

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def weak_probs(logits_u_w: Tensor, temperature: float = 1.0) -> Tensor:
    """`softmax(logits_u_w / T)` in float32, detached: the probabilities pseudo-labels come from."""
    return torch.softmax(logits_u_w.detach().float() / temperature, dim=-1)


def class_counts(labels: Tensor, num_classes: int, weights: Optional[Tensor] = None) -> Tensor:
    """[C] float sum of `weights` (default 1) per class id in `labels`.

    scatter_add_, not bincount (data-dependent output size) nor index_add_ (torch_xla 2.9
    aborts on it with the indices of max()).
    """
    w = torch.ones(labels.shape, device=labels.device) if weights is None else weights.float()
    return torch.zeros(num_classes, device=labels.device, dtype=w.dtype).scatter_add_(0, labels, w)


def consistency_loss(
    logits_x: Tensor,
    targets_x: Tensor,
    logits_u_s: Tensor,
    pseudo_labels: Tensor,
    weight: Tensor,
    *,
    lambda_u: float,
    targets_u: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """`loss_x + lambda_u * mean(weight * CE(logits_u_s, pseudo_labels))` and its stats.

    weight: [N] detached per-sample weight (FixMatch's 0/1 mask, SoftMatch's soft weight).
    loss_u is averaged over all N unlabeled samples (zero-weight ones count as zero).
    A sample is "used" when its weight is non-zero: mask_ratio, mask_count, mask_per_class
    and pseudo_label_acc describe the used ones (for a 0/1 mask, exactly FixMatch's figures).
    """
    loss_x = F.cross_entropy(logits_x.float(), targets_x)
    loss_u = (F.cross_entropy(logits_u_s.float(), pseudo_labels, reduction="none") * weight).mean()
    loss = loss_x + lambda_u * loss_u

    used = (weight > 0).float()
    used_count = used.sum()
    stats = {
        "loss": loss.detach(),
        "loss_x": loss_x.detach(),
        "loss_u": loss_u.detach(),
        "mask_ratio": used.mean(),
        "mask_count": used_count,
        "num_unlabeled": torch.tensor(float(used.numel()), device=used.device),
        "mask_per_class": class_counts(pseudo_labels, logits_u_s.shape[-1], used),
    }
    if targets_u is not None:
        # A sample whose true class is unknown (-1) counts neither way: the accuracy is over the known ones.
        known = used * (targets_u >= 0).float()
        correct = ((pseudo_labels == targets_u).float() * known).sum()
        stats["pseudo_label_correct"] = correct
        stats["pseudo_label_known"] = known.sum()
        # clamp keeps it NaN-free when no sample is used (0 / 1 = 0).
        stats["pseudo_label_acc"] = correct / stats["pseudo_label_known"].clamp(min=1.0)
    return loss, stats
