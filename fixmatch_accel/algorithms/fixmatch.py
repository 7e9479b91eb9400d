"""The FixMatch objective (Sohn et al., 2020, eq. 2-4) as one pure function.

No optimizer, no Accelerator, no host sync: every statistic is a detached tensor
that stays on the device until the trainer reduces it at a logging step.
"""

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def fixmatch_loss(
    logits_x: Tensor,
    targets_x: Tensor,
    logits_u_w: Tensor,
    logits_u_s: Tensor,
    *,
    threshold: float,
    temperature: float,
    lambda_u: float,
    targets_u: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Return `(loss, stats)` for one FixMatch step.

    logits_x: [B, C] labeled logits; targets_x: [B] class ids.
    logits_u_w / logits_u_s: [mu*B, C] logits of the weak / strong views.
    targets_u: [mu*B] true labels of the unlabeled batch, used only for statistics.

    loss_u is averaged over all mu*B unlabeled samples, masked ones counting as
    zero (the paper's normalisation), not over the confident ones only.
    stats: 0-d tensors loss_x, loss_u, mask_ratio, mask_count, num_unlabeled and,
    with targets_u, pseudo_label_correct and pseudo_label_acc (0 when nothing is
    masked); plus mask_per_class, a [C] count of confident pseudo-labels per class.
    """
    loss_x = F.cross_entropy(logits_x.float(), targets_x)

    # Pseudo-labels from the weak view; no gradient flows through them.
    probs = torch.softmax(logits_u_w.detach().float() / temperature, dim=-1)
    confidence, pseudo_labels = probs.max(dim=-1)
    mask = (confidence >= threshold).float()
    loss_u = (F.cross_entropy(logits_u_s.float(), pseudo_labels, reduction="none") * mask).mean()

    loss = loss_x + lambda_u * loss_u

    mask_count = mask.sum()
    stats = {
        "loss": loss.detach(),
        "loss_x": loss_x.detach(),
        "loss_u": loss_u.detach(),
        "mask_ratio": mask.mean(),
        "mask_count": mask_count,
        "num_unlabeled": torch.tensor(float(mask.numel()), device=mask.device),
        # scatter_add_, not index_add_: torch_xla 2.9 aborts on index_add_ with the indices of max().
        "mask_per_class": torch.zeros(logits_u_w.shape[-1], device=mask.device).scatter_add_(0, pseudo_labels, mask),
    }
    if targets_u is not None:
        correct = ((pseudo_labels == targets_u).float() * mask).sum()
        stats["pseudo_label_correct"] = correct
        # clamp keeps it NaN-free when nothing passes the threshold (0 / 1 = 0).
        stats["pseudo_label_acc"] = correct / mask_count.clamp(min=1.0)
    return loss, stats
