"""FreeMatch: self-adaptive thresholds and the self-adaptive fairness loss (Wang et al., ICLR 2023,
arXiv:2205.07246), as USB's FreeMatch (EMA 0.999, fairness weight 0.001 in its CIFAR configs).

- Global threshold (eq. 6): `tau_t = m * tau_{t-1} + (1 - m) * mean_b max(q_b)`, tau_0 = 1/C.
- Local model (eq. 7): `p_t = m * p_{t-1} + (1 - m) * mean_b q_b`, p_0 = 1/C per class.
- Self-adaptive per-class threshold (eq. 8-9): `tau_t(c) = MaxNorm(p_t)[c] * tau_t`;
  a sample is used when max-prob >= tau_t(its pseudo-label).
- Histogram (eq. 11): `h_t = m * h_{t-1} + (1 - m) * Hist_b(argmax q_b) / |b|`, h_0 = 1/C.
- Fairness loss (eq. 12): `L_f = -H(SumNorm(p_t / h_t), SumNorm(pbar / hbar))`, pbar the mean
  strong-view probability and hbar the strong-view argmax histogram, both over the used samples;
  0 when no sample is used. Its sign is USB's: a negative value, minimised (see USB issue #182).

One step, in USB's order: `batch_statistics` (sums over this process's batch; all-reduce with SUM),
`update_state`, then `loss(..., new_state)`: the batch's own statistics count in its thresholds.
"""

from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .common import class_counts, consistency_loss
from .registry import Algorithm, Setting, register


class FreeMatchState(NamedTuple):
    time_p: Tensor  # 0-d global threshold tau_t
    p_model: Tensor  # [C] EMA of the mean weak-view probability
    label_hist: Tensor  # [C] EMA of the weak-view pseudo-label histogram

    @classmethod
    def init(cls, num_classes: int, device=None) -> "FreeMatchState":
        """The paper's initial values: 1/C everywhere (USB's too since its commit 9a24e00, April 2023)."""
        uniform = torch.full((num_classes,), 1.0 / num_classes, device=device)
        return cls(torch.tensor(1.0 / num_classes, device=device), uniform, uniform.clone())


def batch_statistics(probs_u_w: Tensor) -> Dict[str, Tensor]:
    """Sums over this process's weak-view probabilities, to be all-reduced with SUM."""
    confidence, pseudo_labels = probs_u_w.max(dim=-1)
    return {
        "max_prob_sum": confidence.sum(),
        "prob_sum": probs_u_w.sum(dim=0),
        "label_hist": class_counts(pseudo_labels, probs_u_w.shape[-1]),
        "count": torch.tensor(float(probs_u_w.shape[0]), device=probs_u_w.device),
    }


# USB's cap on the global threshold with clip_thresh (its SVHN settings).
CLIP_THRESHOLD = 0.95


def update_state(state: FreeMatchState, stats: Dict[str, Tensor], *, momentum: float = 0.999,
                 clip: bool = False) -> FreeMatchState:
    """The three EMAs (eq. 6, 7, 11) with the batch means sum / count; with `clip`, tau_t capped at 0.95 after
    its update and kept so (USB's clip_thresh)."""
    count = stats["count"].clamp(min=1.0)
    m = momentum
    time_p = m * state.time_p + (1.0 - m) * stats["max_prob_sum"] / count
    return FreeMatchState(
        time_p=time_p.clamp(max=CLIP_THRESHOLD) if clip else time_p,
        p_model=m * state.p_model + (1.0 - m) * stats["prob_sum"] / count,
        label_hist=m * state.label_hist + (1.0 - m) * stats["label_hist"] / count,
    )


def thresholds(state: FreeMatchState) -> Tensor:
    """[C] `tau_t * p_t[c] / max(p_t)` (eq. 9)."""
    return state.time_p * state.p_model / state.p_model.max()


def fairness_loss(logits_u_s: Tensor, mask: Tensor, state: FreeMatchState) -> Tensor:
    """Eq. 12 over the used samples (mask [N] 0/1), as USB's `entropy_loss`; 0 when none is used.

    USB scales the mean strong-view probability by 1 / hbar (inf -> 0), i.e. per class
    `sum of probabilities / number of argmaxes` over the used samples (0 for a class never argmax).
    """
    probs_s = torch.softmax(logits_u_s.float(), dim=-1)
    num_classes = probs_s.shape[-1]
    used_count = class_counts(probs_s.detach().argmax(dim=-1), num_classes, mask)
    prob_sum = (probs_s * mask[:, None]).sum(dim=0)
    mean_s = torch.where(used_count > 0, prob_sum / used_count.clamp(min=1.0), 0.0)
    # Some class has used_count > 0 whenever mask does, and then its mean is >= 1/C: the clamp only
    # keeps the unused (masked-out) branch finite.
    mean_s = mean_s / mean_s.sum().clamp(min=1e-12)
    target = torch.where(state.label_hist > 0, state.p_model / state.label_hist, 0.0)
    target = target / target.sum()
    loss_f = (target * torch.log(mean_s + 1e-12)).sum()
    return torch.where(mask.sum() > 0, loss_f, 0.0)


def loss(
    logits_x: Tensor,
    targets_x: Tensor,
    probs_u_w: Tensor,
    logits_u_s: Tensor,
    state: FreeMatchState,
    *,
    lambda_u: float,
    lambda_f: float = 0.001,
    targets_u: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """`loss_x + lambda_u * loss_u + lambda_f * loss_f` with the thresholds of `state` (updated with this batch).

    probs_u_w: [N, C] detached weak-view probabilities (`common.weak_probs`, optionally aligned).
    stats: fixmatch_loss's keys (`loss` the total) plus `threshold_per_class` [C] and `loss_f`.
    """
    per_class = thresholds(state)
    confidence, pseudo_labels = probs_u_w.max(dim=-1)
    mask = (confidence >= per_class[pseudo_labels]).float()
    total, stats = consistency_loss(
        logits_x, targets_x, logits_u_s, pseudo_labels, mask, lambda_u=lambda_u, targets_u=targets_u
    )
    loss_f = fairness_loss(logits_u_s, mask, state)
    total = total + lambda_f * loss_f
    stats["loss"] = total.detach()
    stats["loss_f"] = loss_f.detach()
    stats["threshold_per_class"] = per_class
    return total, stats


@register
class FreeMatch(Algorithm):
    name, title = "freematch", "FreeMatch"
    summary = "freematch (self-adaptive thresholds + fairness loss)"
    own_settings = (Setting("freematch_fairness", 0.001, "freematch: weight of the self-adaptive fairness loss "
                                                         "(USB's CIFAR setting).", bound="non-negative"),
                    Setting("freematch_clip_threshold", False, "freematch: cap the global threshold at 0.95 "
                                                               "(USB's clip_thresh, on in its SVHN settings)."))
    uses = ("stats_momentum",)
    console = (("mask", "mask_ratio"), ("loss_f", "loss_f"))
    sample_mean_loss = False
    mask_means = "confidence \u2265 their class's threshold"

    def init_state(self, device=None):
        return FreeMatchState.init(self.num_classes, device)

    def step(self, state, batch, collectives):
        s = self.settings
        state = update_state(state, collectives.sum(batch_statistics(batch.aligned_u_w)), momentum=s.stats_momentum,
                             clip=s.freematch_clip_threshold)
        total, stats = loss(batch.logits_x, batch.targets_x, batch.aligned_u_w, batch.logits_u_s, state,
                            lambda_u=s.lambda_u, lambda_f=s.freematch_fairness, targets_u=batch.targets_u)
        return total, stats, state
