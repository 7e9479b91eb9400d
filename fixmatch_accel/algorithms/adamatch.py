"""AdaMatch in its semi-supervised setting (Berthelot et al., 2021, "AdaMatch: A Unified Approach to
Semi-Supervised Learning and Domain Adaptation", arXiv:2106.04732), as USB's AdaMatch.

- Distribution alignment to the model's own labeled predictions (sec. 3.2, "distribution alignment"):
  `p_aligned = Normalize(p_u * p_target / p_model)`, p_target the running mean of the labeled batch's
  probabilities, p_model that of the unlabeled weak view's. Running means as USB's
  `DistAlignEMAHook(p_target_type='model')`: p_target starts uniform, p_model at the first batch's
  mean, then both `m * old + (1 - m) * batch mean` (m = --stats_momentum), updated before aligning.
- Relative confidence threshold (sec. 3.2, "relative confidence threshold"):
  `c_tau = tau * mean_b max(p_x_b)` over the labeled batch; a sample is used when `max(p_aligned) >= c_tau`.
  tau is --threshold: 0.95 by default, USB's `p_cutoff`; the paper uses 0.9.
- `loss = CE(x) + lambda_u * mean(mask * CE(strong, argmax p_aligned))`; USB's SSL AdaMatch has no
  random logit interpolation and no warm-up of lambda_u.

Every mean is over all processes: the batch sums are reduced with one collective inside the step.
"""

from typing import Dict, NamedTuple

import torch
from torch import Tensor

from .common import consistency_loss, weak_probs
from .dist_align import EPS
from .registry import Algorithm, register


class AdaMatchState(NamedTuple):
    p_model: Tensor  # [C] running mean of the unlabeled weak view's probabilities
    p_target: Tensor  # [C] running mean of the labeled batch's probabilities
    steps: Tensor  # 0-d int64: updates so far (0: p_model not yet set)

    @classmethod
    def init(cls, num_classes: int, device=None) -> "AdaMatchState":
        uniform = torch.full((num_classes,), 1.0 / num_classes, device=device)
        return cls(uniform, uniform.clone(), torch.zeros((), dtype=torch.long, device=device))


def batch_statistics(probs_x: Tensor, probs_u_w: Tensor) -> Dict[str, Tensor]:
    """This process's sums, to be all-reduced with SUM: labeled and unlabeled probability sums, the labeled
    max-probability sum and both counts."""
    return {
        "labeled_prob_sum": probs_x.sum(dim=0),
        "labeled_max_sum": probs_x.max(dim=-1).values.sum(),
        "labeled_count": torch.tensor(float(probs_x.shape[0]), device=probs_x.device),
        "unlabeled_prob_sum": probs_u_w.sum(dim=0),
        "unlabeled_count": torch.tensor(float(probs_u_w.shape[0]), device=probs_u_w.device),
    }


def update_state(state: AdaMatchState, stats: Dict[str, Tensor], *, momentum: float = 0.999) -> AdaMatchState:
    """Both running means with this batch (p_model set to it on the first update)."""
    labeled_mean = stats["labeled_prob_sum"] / stats["labeled_count"].clamp(min=1.0)
    unlabeled_mean = stats["unlabeled_prob_sum"] / stats["unlabeled_count"].clamp(min=1.0)
    p_model = torch.where(state.steps == 0, unlabeled_mean,
                          momentum * state.p_model + (1.0 - momentum) * unlabeled_mean)
    p_target = momentum * state.p_target + (1.0 - momentum) * labeled_mean
    return AdaMatchState(p_model, p_target, state.steps + 1)


def align(probs_u_w: Tensor, state: AdaMatchState) -> Tensor:
    """`Normalize(p * (p_target + eps) / (p_model + eps))` row by row (USB's eps)."""
    aligned = probs_u_w * (state.p_target + EPS) / (state.p_model + EPS)
    return aligned / aligned.sum(dim=-1, keepdim=True)


def relative_threshold(stats: Dict[str, Tensor], threshold: float) -> Tensor:
    """0-d `tau * mean max-probability of the labeled batch`, from the reduced sums."""
    return threshold * stats["labeled_max_sum"] / stats["labeled_count"].clamp(min=1.0)


@register
class AdaMatch(Algorithm):
    name, title = "adamatch", "AdaMatch"
    summary = "adamatch (alignment to the labeled predictions + a threshold relative to the labeled confidence)"
    uses = ("threshold", "stats_momentum")
    dist_align_choices = ("none",)  # it aligns to its own target
    mask_means = "confidence \u2265 --threshold \u00d7 the labeled batch's mean confidence"
    equal_thresholds_mean = "--threshold \u00d7 the labeled batch's mean confidence"

    def init_state(self, device=None):
        return AdaMatchState.init(self.num_classes, device)

    def step(self, state, batch, collectives):
        s = self.settings
        probs_x = weak_probs(batch.logits_x, s.temperature)
        stats = collectives.sum(batch_statistics(probs_x, batch.probs_u_w))
        state = update_state(state, stats, momentum=s.stats_momentum)
        aligned = align(batch.probs_u_w, state)
        cutoff = relative_threshold(stats, s.threshold)
        confidence, pseudo_labels = aligned.max(dim=-1)
        mask = (confidence >= cutoff).float()
        total, out = consistency_loss(batch.logits_x, batch.targets_x, batch.logits_u_s, pseudo_labels, mask,
                                      lambda_u=s.lambda_u, targets_u=batch.targets_u)
        out["threshold_per_class"] = cutoff.expand(self.num_classes).clone()
        return total, out, state
