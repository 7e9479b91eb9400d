"""Distribution alignment of the weak-view probabilities (ReMixMatch, Berthelot et al., 2020, sec. 3.2).

`aligned = SumNorm(p * p_target / p_model)`, p_model an EMA of the mean weak-view probability
vector (set to the first batch's mean, then momentum 0.999: USB's DistAlignEMAHook), p_target
uniform or the labeled split's class frequencies. Usable with every algorithm: the caller aligns
`common.weak_probs(...)` before handing them on (SoftMatch uses them for its weight only).

Two steps so every process applies the same update: `batch_statistics` (sums over this
process's batch, to be all-reduced with SUM), then `update_state` (pure). USB's order: update
p_model with this batch first, then align this batch with the new p_model.
"""

from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor

from .common import class_counts

EPS = 1e-6  # USB's: keeps a class with p_model (or p_target) 0 finite


class DistAlignState(NamedTuple):
    p_model: Tensor  # [C] EMA of the mean weak-view probability
    p_target: Tensor  # [C] the distribution to align to (fixed)
    steps: Tensor  # 0-d int64: updates so far (0: p_model not yet set)

    @classmethod
    def init(cls, num_classes: int, target: Optional[Tensor] = None, device=None) -> "DistAlignState":
        """target: [C] class frequencies (normalised here); None = uniform."""
        if target is None:
            p_target = torch.full((num_classes,), 1.0 / num_classes, device=device)
        else:
            target = torch.as_tensor(target, dtype=torch.float32, device=device)
            if target.shape != (num_classes,):
                raise ValueError(f"distribution alignment target has shape {tuple(target.shape)}, not ({num_classes},)")
            p_target = target / target.sum()
        p_model = torch.full((num_classes,), 1.0 / num_classes, device=device)
        return cls(p_model, p_target, torch.zeros((), dtype=torch.long, device=device))


def label_frequencies(labels: Tensor, num_classes: int) -> Tensor:
    """[C] share of each class among `labels` (the labeled split): the `labeled` target."""
    counts = class_counts(torch.as_tensor(labels, dtype=torch.long), num_classes)
    return counts / counts.sum()


def batch_statistics(probs_u_w: Tensor) -> Dict[str, Tensor]:
    """prob_sum [C] and count (0-d) of this process's unaligned weak-view probabilities."""
    return {
        "prob_sum": probs_u_w.sum(dim=0),
        "count": torch.tensor(float(probs_u_w.shape[0]), device=probs_u_w.device),
    }


def update_state(state: DistAlignState, stats: Dict[str, Tensor], *, momentum: float = 0.999) -> DistAlignState:
    """p_model <- batch mean on the first update, else `m * p_model + (1 - m) * batch mean`."""
    batch_mean = stats["prob_sum"] / stats["count"].clamp(min=1.0)
    ema = momentum * state.p_model + (1.0 - momentum) * batch_mean
    p_model = torch.where(state.steps == 0, batch_mean, ema)
    return DistAlignState(p_model, state.p_target, state.steps + 1)


def align(probs_u_w: Tensor, state: DistAlignState) -> Tensor:
    """`SumNorm(p * (p_target + eps) / (p_model + eps))` row by row."""
    aligned = probs_u_w * (state.p_target + EPS) / (state.p_model + EPS)
    return aligned / aligned.sum(dim=-1, keepdim=True)
