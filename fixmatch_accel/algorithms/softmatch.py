"""SoftMatch: a truncated-Gaussian weight per unlabeled sample (Chen et al., ICLR 2023,
arXiv:2301.10921), as USB's SoftMatch (n_sigma 2, EMA 0.999, one Gaussian for all classes).

- Mean and variance of the max-probability (eq. 7): `mu_t = m * mu_{t-1} + (1 - m) * mean_b max(p_b)`,
  `var_t = m * var_{t-1} + (1 - m) * var_b max(p_b)` (unbiased batch variance); mu_0 = 1/C, var_0 = 1.
- Weight (eq. 6-7, lambda_max = 1): `w = exp(-(min(max(p) - mu_t, 0))^2 / (2 * var_t / n_sigma^2))`:
  1 at or above mu_t, a Gaussian tail below it.
- Uniform alignment (eq. 9) is distribution alignment to a uniform target: the caller aligns the
  weak-view probabilities with `dist_align` and passes them as `weight_probs`; as in USB, the
  pseudo-labels still come from the unaligned `probs_u_w`.

One step, in USB's order: `batch_statistics` (shifted sums over this process's batch; all-reduce
with SUM), `update_state`, then `loss(..., new_state)`.
"""

from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .common import consistency_loss
from .registry import Algorithm, Setting, register


class SoftMatchState(NamedTuple):
    prob_max_mu: Tensor  # 0-d EMA of the mean max-probability
    prob_max_var: Tensor  # 0-d EMA of its unbiased variance

    @classmethod
    def init(cls, num_classes: int, device=None) -> "SoftMatchState":
        """mu_0 = 1/C, var_0 = 1 (the paper's and USB's)."""
        return cls(torch.tensor(1.0 / num_classes, device=device), torch.tensor(1.0, device=device))


def batch_statistics(weight_probs: Tensor, state: SoftMatchState) -> Dict[str, Tensor]:
    """count, and sums of `d` and `d**2` with `d = max-prob - state.prob_max_mu`, to be all-reduced with SUM.

    The shift (the current mean, the same on every process) keeps `sum d^2 - (sum d)^2 / n` from
    cancelling in float32 the way raw sums of squares would.
    """
    deviation = weight_probs.max(dim=-1).values - state.prob_max_mu
    return {
        "shifted_sum": deviation.sum(),
        "shifted_sq_sum": (deviation * deviation).sum(),
        "count": torch.tensor(float(weight_probs.shape[0]), device=weight_probs.device),
    }


def update_state(state: SoftMatchState, stats: Dict[str, Tensor], *, momentum: float = 0.999) -> SoftMatchState:
    """The EMAs of eq. 7 from the reduced sums. With one sample in all (variance undefined; USB's
    torch.var gives NaN) the variance EMA keeps its value."""
    n = stats["count"]
    s1, s2 = stats["shifted_sum"], stats["shifted_sq_sum"]
    batch_mu = state.prob_max_mu + s1 / n.clamp(min=1.0)
    batch_var = (s2 - s1 * s1 / n.clamp(min=1.0)).clamp(min=0.0) / (n - 1.0).clamp(min=1.0)
    batch_var = torch.where(n > 1, batch_var, state.prob_max_var)
    m = momentum
    return SoftMatchState(
        prob_max_mu=m * state.prob_max_mu + (1.0 - m) * batch_mu,
        prob_max_var=m * state.prob_max_var + (1.0 - m) * batch_var,
    )


def weights(weight_probs: Tensor, state: SoftMatchState, *, n_sigma: float = 2.0) -> Tensor:
    """[N] truncated-Gaussian weight of each sample (eq. 6-7)."""
    below = torch.clamp(weight_probs.max(dim=-1).values - state.prob_max_mu, max=0.0)
    return torch.exp(-(below * below) / (2.0 * state.prob_max_var / (n_sigma**2)))


def loss(
    logits_x: Tensor,
    targets_x: Tensor,
    probs_u_w: Tensor,
    logits_u_s: Tensor,
    state: SoftMatchState,
    *,
    lambda_u: float,
    n_sigma: float = 2.0,
    weight_probs: Optional[Tensor] = None,
    targets_u: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """`loss_x + lambda_u * mean(w * CE(strong, argmax probs_u_w))` with the weights of `state` (updated).

    probs_u_w: [N, C] detached weak-view probabilities; pseudo-labels are their argmax.
    weight_probs: the probabilities the weight is computed from (USB: uniformly aligned); default probs_u_w.
    stats: fixmatch_loss's keys plus `threshold_per_class` ([C], all mu_t: the max-probability from
    which the weight is 1) and `mean_weight`; mask_ratio is the share of non-zero weights.
    """
    weight_probs = probs_u_w if weight_probs is None else weight_probs
    weight = weights(weight_probs, state, n_sigma=n_sigma)
    pseudo_labels = probs_u_w.argmax(dim=-1)
    total, stats = consistency_loss(
        logits_x, targets_x, logits_u_s, pseudo_labels, weight, lambda_u=lambda_u, targets_u=targets_u
    )
    stats["threshold_per_class"] = state.prob_max_mu.expand(probs_u_w.shape[-1]).clone()
    stats["mean_weight"] = weight.mean()
    return total, stats


@register
class SoftMatch(Algorithm):
    name, title = "softmatch", "SoftMatch"
    summary = "softmatch (truncated-Gaussian sample weights)"
    own_settings = (Setting("softmatch_n_sigma", 2.0, "softmatch: standard deviations of the weight's Gaussian "
                                                      "tail.", bound="positive"),)
    uses = ("stats_momentum",)
    dist_align = "uniform"  # its uniform alignment (eq. 9), used for the weights
    console = (("weight", "mean_weight"),)  # every weight is non-zero: the mask ratio is always 1
    mask_means = "a non-zero weight"
    equal_thresholds_mean = "the running mean max-probability"

    def init_state(self, device=None):
        return SoftMatchState.init(self.num_classes, device)

    def step(self, state, batch, collectives):
        s = self.settings
        # The weight comes from the aligned probabilities, the pseudo-labels from the raw ones (USB).
        state = update_state(state, collectives.sum(batch_statistics(batch.aligned_u_w, state)),
                             momentum=s.stats_momentum)
        total, stats = loss(batch.logits_x, batch.targets_x, batch.probs_u_w, batch.logits_u_s, state,
                            lambda_u=s.lambda_u, n_sigma=s.softmatch_n_sigma, weight_probs=batch.aligned_u_w,
                            targets_u=batch.targets_u)
        return total, stats, state
