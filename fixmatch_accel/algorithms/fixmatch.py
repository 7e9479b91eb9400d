"""The FixMatch objective (Sohn et al., 2020, eq. 2-4) as one pure function.

No optimizer, no Accelerator, no host sync: every statistic is a detached tensor
that stays on the device until the trainer reduces it at a logging step.
"""

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .common import consistency_loss, weak_probs
from .registry import Algorithm, register


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
    # Pseudo-labels from the weak view; no gradient flows through them.
    probs = weak_probs(logits_u_w, temperature)
    return _fixmatch(logits_x, targets_x, probs, logits_u_s, threshold, lambda_u, targets_u)


def loss(
    logits_x: Tensor,
    targets_x: Tensor,
    probs_u_w: Tensor,
    logits_u_s: Tensor,
    *,
    threshold: float,
    lambda_u: float,
    targets_u: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """FixMatch from given weak-view probabilities (e.g. distribution-aligned ones).

    probs_u_w: [N, C] detached, usually `common.weak_probs(logits_u_w, T)`, then `dist_align.align`.
    The same `(loss, stats)` as fixmatch_loss, plus `threshold_per_class` ([C], all `threshold`),
    the key every algorithm's `loss` reports.
    """
    total, stats = _fixmatch(logits_x, targets_x, probs_u_w, logits_u_s, threshold, lambda_u, targets_u)
    stats["threshold_per_class"] = torch.full((probs_u_w.shape[-1],), float(threshold), device=probs_u_w.device)
    return total, stats


def _fixmatch(logits_x, targets_x, probs_u_w, logits_u_s, threshold, lambda_u, targets_u):
    confidence, pseudo_labels = probs_u_w.max(dim=-1)
    mask = (confidence >= threshold).float()
    return consistency_loss(
        logits_x, targets_x, logits_u_s, pseudo_labels, mask, lambda_u=lambda_u, targets_u=targets_u
    )


@register
class FixMatch(Algorithm):
    name, title = "fixmatch", "FixMatch"
    summary = "fixmatch (fixed --threshold)"
    uses = ("threshold",)

    def step(self, state, batch, collectives):
        total, stats = loss(batch.logits_x, batch.targets_x, batch.aligned_u_w, batch.logits_u_s,
                            threshold=self.settings.threshold, lambda_u=self.settings.lambda_u,
                            targets_u=batch.targets_u)
        return total, stats, state
