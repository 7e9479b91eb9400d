"""FlexMatch: curriculum pseudo-labelling with per-class flexible thresholds (Zhang et al., 2021,
arXiv:2110.08263), as USB's FlexMatch (convex mapping, threshold warm-up, tau 0.95).

- Learning effect (eq. 5, warm-up eq. 7): `sigma_c` = number of unlabeled examples whose latest
  confident pseudo-label (max-prob >= tau) is c; `beta_c = sigma_c / max(max_c sigma_c, N_unused)`
  with warm-up (N_unused = examples never confidently labeled), `sigma_c / max_c sigma_c` without.
- Flexible threshold (eq. 6 with the convex mapping M(x) = x / (2 - x)):
  `T_c = tau * beta_c / (2 - beta_c)`; a sample is used when max-prob >= T_{pseudo-label}.

State: the latest confident label of every unlabeled example (-1 = none yet); beta is derived
from it. One step, in USB's order: `loss(..., state)` masks with the state BEFORE this batch;
`batch_statistics` gives this process's (index, label, confident) triples, which the caller
all-gathers (concatenated in rank order, the same on every process) for `update_state`.
"""

from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .common import consistency_loss
from .registry import Algorithm, Setting, register


class FlexMatchState(NamedTuple):
    selected_label: Tensor  # [slots] int64: latest confident pseudo-label of each example, -1 = none yet
    # 0-d int64: how many slots are unlabeled examples, when not all are (labeled rows left out of the
    # unlabeled data keep -1 forever and must not count as unused); None: every slot is one.
    num_unlabeled: Optional[Tensor] = None

    @classmethod
    def init(cls, num_classes: int, num_slots: int, device=None, num_unlabeled: Optional[int] = None
             ) -> "FlexMatchState":
        """All examples unused (-1). num_classes is taken for a signature shared with the other states."""
        del num_classes
        count = None if num_unlabeled is None else torch.tensor(num_unlabeled, dtype=torch.long, device=device)
        return cls(torch.full((num_slots,), -1, dtype=torch.long, device=device), count)


def learning_effect(state: FlexMatchState, num_classes: int, *, warmup: bool = True) -> Tensor:
    """[C] beta_c (eq. 5; with warmup, eq. 7's denominator max(max_c sigma_c, N_unused))."""
    label = state.selected_label
    # Slot 0 counts the unused examples (-1), slots 1..C the classes.
    counts = torch.zeros(num_classes + 1, dtype=torch.long, device=label.device)
    counts = counts.scatter_add_(0, label + 1, torch.ones_like(label))
    sigma = counts[1:]
    unused = counts[0] if state.num_unlabeled is None else state.num_unlabeled - sigma.sum()
    denominator = sigma.max()
    if warmup:
        denominator = torch.maximum(denominator, unused)
    # All unused without warm-up: 0 / 0; clamp gives beta = 0, the initial value USB keeps then.
    return sigma.float() / denominator.clamp(min=1).float()


def thresholds(state: FlexMatchState, num_classes: int, *, threshold: float = 0.95, warmup: bool = True) -> Tensor:
    """[C] flexible thresholds `tau * beta / (2 - beta)` (convex mapping)."""
    beta = learning_effect(state, num_classes, warmup=warmup)
    return threshold * beta / (2.0 - beta)


def batch_statistics(probs_u_w: Tensor, indices: Tensor, *, threshold: float = 0.95) -> Dict[str, Tensor]:
    """This process's triples, to be all-gathered: dataset `index`, pseudo-`label`, `confident` (max-prob >= tau).

    indices: [N] int64 positions of the unlabeled examples in the unlabeled set (0..N_unlabeled-1).
    """
    confidence, pseudo_labels = probs_u_w.max(dim=-1)
    return {
        "index": indices.long(),
        "label": pseudo_labels,
        "confident": (confidence >= threshold).long(),
    }


def update_state(state: FlexMatchState, gathered: Dict[str, Tensor]) -> FlexMatchState:
    """Write every confident label to its example; where an index occurs more than once among the
    confident entries, the last one in gathered order wins (deterministic, unlike a plain scatter)."""
    index, label, confident = gathered["index"], gathered["label"], gathered["confident"]
    position = torch.arange(index.shape[0], device=index.device)
    keyed = torch.where(confident > 0, position, -1)
    last = torch.full_like(state.selected_label, -1).scatter_reduce(0, index, keyed, reduce="amax")
    new_label = label[last.clamp(min=0)]
    return FlexMatchState(torch.where(last >= 0, new_label, state.selected_label), state.num_unlabeled)


def loss(
    logits_x: Tensor,
    targets_x: Tensor,
    probs_u_w: Tensor,
    logits_u_s: Tensor,
    state: FlexMatchState,
    *,
    lambda_u: float,
    threshold: float = 0.95,
    warmup: bool = True,
    targets_u: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """FixMatch's loss with the per-class thresholds of `state` (the state before this batch's update).

    probs_u_w: [N, C] detached weak-view probabilities (`common.weak_probs`, optionally aligned).
    stats: fixmatch_loss's keys plus `threshold_per_class` [C].
    """
    num_classes = probs_u_w.shape[-1]
    per_class = thresholds(state, num_classes, threshold=threshold, warmup=warmup)
    confidence, pseudo_labels = probs_u_w.max(dim=-1)
    mask = (confidence >= per_class[pseudo_labels]).float()
    total, stats = consistency_loss(
        logits_x, targets_x, logits_u_s, pseudo_labels, mask, lambda_u=lambda_u, targets_u=targets_u
    )
    stats["threshold_per_class"] = per_class
    return total, stats


@register
class FlexMatch(Algorithm):
    name, title = "flexmatch", "FlexMatch"
    summary = "flexmatch (per-class thresholds from each class's learning effect)"
    own_settings = (Setting("flexmatch_warmup", True, "flexmatch: threshold warm-up (examples not yet pseudo-labeled "
                                                       "count in the learning effect's denominator)."),)
    uses = ("threshold",)
    mask_means = "confidence \u2265 their class's threshold"
    threshold_is_ceiling = True

    def init_state(self, device=None):
        return FlexMatchState.init(self.num_classes, self.num_slots, device, self.num_unlabeled)

    def step(self, state, batch, collectives):
        s = self.settings
        # Masked with the state before this batch; the batch's confident labels update it after (USB's order).
        total, stats = loss(batch.logits_x, batch.targets_x, batch.aligned_u_w, batch.logits_u_s, state,
                            lambda_u=s.lambda_u, threshold=s.threshold, warmup=s.flexmatch_warmup,
                            targets_u=batch.targets_u)
        mine = batch_statistics(batch.aligned_u_w, batch.indices, threshold=s.threshold)
        mine["confident"] = mine["confident"] * batch.valid.long()
        # One gather of [N, 3] rows: every process receives the same triples in the same order.
        gathered = collectives.gather(torch.stack([mine["index"], mine["label"], mine["confident"]], dim=1))
        return total, stats, update_state(
            state, dict(index=gathered[:, 0], label=gathered[:, 1], confident=gathered[:, 2]))
