"""The unlabeled objective of a run: one algorithm, optionally with distribution alignment, as one step function.

`Objective(...)(state, logits..., indices, valid) -> (loss, stats, new state)`. Every statistic an
algorithm keeps is reduced over all processes inside the step, by the collectives handed in
(`all_sum`: a flat float tensor summed over processes; `all_gather`: an int tensor concatenated
along dim 0 in process order), so every process holds the same state at every step. With one
process both are identities. The algorithm is chosen once here, never branched on in the loop.
"""

from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import Tensor

from . import dist_align, fixmatch, flexmatch, freematch, softmatch
from .common import weak_probs

ALGORITHMS = ("fixmatch", "flexmatch", "freematch", "softmatch")
DIST_ALIGN = ("none", "uniform", "labeled")
# What each algorithm aligns to when --dist_align is not given: SoftMatch's uniform alignment (its eq. 9).
DEFAULT_DIST_ALIGN = dict(fixmatch="none", flexmatch="none", freematch="none", softmatch="uniform")


class ObjectiveState(NamedTuple):
    algorithm: Optional[NamedTuple]  # the algorithm's state (None for FixMatch, which keeps none)
    dist_align: Optional[dist_align.DistAlignState]  # None without distribution alignment


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def summed(stats: Dict[str, Tensor], all_sum: Callable[[Tensor], Tensor]) -> Dict[str, Tensor]:
    """`stats` summed over processes with one collective: flattened, concatenated, reduced, split back."""
    keys = sorted(stats)
    flat = all_sum(torch.cat([stats[k].float().reshape(-1) for k in keys]))
    out, start = {}, 0
    for k in keys:
        n = stats[k].numel()
        out[k] = flat[start:start + n].reshape(stats[k].shape)
        start += n
    return out


class Objective:
    """FixMatch, FlexMatch, FreeMatch or SoftMatch, with `dist_align` "none", "uniform" or "labeled".

    num_slots: size of the unlabeled index space (the rows `indices` point into); num_unlabeled: how many of
    those slots are unlabeled examples (fewer when labeled rows are left out of the unlabeled data).
    dist_target: [C] class frequencies for dist_align "labeled".
    """

    def __init__(self, algorithm: str, *, num_classes: int, threshold: float, temperature: float, lambda_u: float,
                 dist_align: str = "none", dist_target: Optional[Tensor] = None, momentum: float = 0.999,
                 num_slots: int = 0, num_unlabeled: Optional[int] = None, flexmatch_warmup: bool = True,
                 freematch_fairness: float = 0.001, softmatch_n_sigma: float = 2.0,
                 all_sum: Optional[Callable[[Tensor], Tensor]] = None,
                 all_gather: Optional[Callable[[Tensor], Tensor]] = None):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
        if dist_align not in DIST_ALIGN:
            raise ValueError(f"unknown distribution alignment {dist_align!r}; choose from {', '.join(DIST_ALIGN)}")
        if dist_align == "labeled" and dist_target is None:
            raise ValueError("distribution alignment 'labeled' needs the labeled class frequencies (dist_target)")
        self.algorithm, self.num_classes, self.dist_align = algorithm, num_classes, dist_align
        self.threshold, self.temperature, self.lambda_u, self.momentum = threshold, temperature, lambda_u, momentum
        self.num_slots, self.num_unlabeled = num_slots, num_unlabeled
        self.flexmatch_warmup, self.freematch_fairness = flexmatch_warmup, freematch_fairness
        self.softmatch_n_sigma = softmatch_n_sigma
        self.dist_target = dist_target if dist_align == "labeled" else None
        self.all_sum, self.all_gather = all_sum or _identity, all_gather or _identity  # None: one process
        self._loss = getattr(self, f"_{algorithm}")

    @property
    def averaged_stats(self) -> Dict[str, tuple]:
        """The stats besides FixMatch's that a run log averages over steps and processes, with their shapes."""
        extra = dict(freematch={"loss_f": ()}, softmatch={"mean_weight": ()}).get(self.algorithm, {})
        return {"threshold_per_class": (self.num_classes,), **extra}

    def init_state(self, device=None) -> ObjectiveState:
        c = self.num_classes
        algorithm = dict(
            fixmatch=lambda: None,
            flexmatch=lambda: flexmatch.FlexMatchState.init(c, self.num_slots, device, self.num_unlabeled),
            freematch=lambda: freematch.FreeMatchState.init(c, device),
            softmatch=lambda: softmatch.SoftMatchState.init(c, device),
        )[self.algorithm]()
        aligned = None if self.dist_align == "none" else dist_align.DistAlignState.init(c, self.dist_target, device)
        return ObjectiveState(algorithm, aligned)

    def __call__(self, state: ObjectiveState, logits_x: Tensor, targets_x: Tensor, logits_u_w: Tensor,
                 logits_u_s: Tensor, indices: Tensor, valid: Tensor, targets_u: Optional[Tensor] = None):
        """`(loss, stats, new state)` of one step. indices: [N] the unlabeled samples' slots; valid: [N] bool,
        False for a sample that stands in for an unreadable image (it never updates per-example state)."""
        probs = weak_probs(logits_u_w, self.temperature)
        aligned_state, aligned = state.dist_align, probs
        if aligned_state is not None:  # USB's order: update p_model with this batch, then align it
            aligned_state = dist_align.update_state(
                aligned_state, summed(dist_align.batch_statistics(probs), self.all_sum), momentum=self.momentum)
            aligned = dist_align.align(probs, aligned_state)
        batch = (logits_x, targets_x, logits_u_s, targets_u)
        loss, stats, algorithm_state = self._loss(state.algorithm, probs, aligned, batch, indices, valid)
        return loss, stats, ObjectiveState(algorithm_state, aligned_state)

    # One method per algorithm: (state, raw probs, aligned probs, batch, indices, valid) -> (loss, stats, state).

    def _fixmatch(self, state, probs, aligned, batch, indices, valid):
        logits_x, targets_x, logits_u_s, targets_u = batch
        loss, stats = fixmatch.loss(logits_x, targets_x, aligned, logits_u_s, threshold=self.threshold,
                                    lambda_u=self.lambda_u, targets_u=targets_u)
        return loss, stats, state

    def _flexmatch(self, state, probs, aligned, batch, indices, valid):
        logits_x, targets_x, logits_u_s, targets_u = batch
        # Masked with the state before this batch; the batch's confident labels update it after (USB's order).
        loss, stats = flexmatch.loss(logits_x, targets_x, aligned, logits_u_s, state, lambda_u=self.lambda_u,
                                     threshold=self.threshold, warmup=self.flexmatch_warmup, targets_u=targets_u)
        mine = flexmatch.batch_statistics(aligned, indices.clamp(min=0), threshold=self.threshold)
        mine["confident"] = mine["confident"] * valid.long()
        # One gather of [N, 3] rows: every process receives the same triples in the same order.
        gathered = self.all_gather(torch.stack([mine["index"], mine["label"], mine["confident"]], dim=1))
        return loss, stats, flexmatch.update_state(
            state, dict(index=gathered[:, 0], label=gathered[:, 1], confident=gathered[:, 2]))

    def _freematch(self, state, probs, aligned, batch, indices, valid):
        logits_x, targets_x, logits_u_s, targets_u = batch
        state = freematch.update_state(state, summed(freematch.batch_statistics(aligned), self.all_sum),
                                       momentum=self.momentum)
        loss, stats = freematch.loss(logits_x, targets_x, aligned, logits_u_s, state, lambda_u=self.lambda_u,
                                     lambda_f=self.freematch_fairness, targets_u=targets_u)
        return loss, stats, state

    def _softmatch(self, state, probs, aligned, batch, indices, valid):
        logits_x, targets_x, logits_u_s, targets_u = batch
        # The weight comes from the aligned probabilities, the pseudo-labels from the raw ones (USB).
        state = softmatch.update_state(state, summed(softmatch.batch_statistics(aligned, state), self.all_sum),
                                       momentum=self.momentum)
        loss, stats = softmatch.loss(logits_x, targets_x, probs, logits_u_s, state, lambda_u=self.lambda_u,
                                     n_sigma=self.softmatch_n_sigma, weight_probs=aligned, targets_u=targets_u)
        return loss, stats, state


def state_tensors(state: ObjectiveState) -> Dict[str, Tensor]:
    """The state as named tensors ("flexmatch.selected_label", "dist_align.p_model", ...), for a checkpoint."""
    out = {}
    for part in state or ():
        if part is not None:
            prefix = _PREFIX[type(part)]
            out.update({f"{prefix}.{name}": value for name, value in part._asdict().items() if value is not None})
    return out


def load_state_tensors(state: ObjectiveState, saved: Dict[str, Tensor]) -> ObjectiveState:
    """`state` with every tensor replaced by the saved one of the same name and shape (KeyError / ValueError
    naming the tensor otherwise), on `state`'s devices."""
    parts = []
    for part in state:
        if part is None:
            parts.append(None)
            continue
        prefix, values = _PREFIX[type(part)], {}
        for name, value in part._asdict().items():
            if value is None:
                values[name] = None
                continue
            key = f"{prefix}.{name}"
            if key not in saved:
                raise KeyError(f"no {key}")
            if saved[key].shape != value.shape:
                raise ValueError(f"{key} has shape {tuple(saved[key].shape)}, this run's is {tuple(value.shape)}")
            values[name] = saved[key].to(device=value.device, dtype=value.dtype)
        parts.append(type(part)(**values))
    return ObjectiveState(*parts)


_PREFIX = {flexmatch.FlexMatchState: "flexmatch", freematch.FreeMatchState: "freematch",
           softmatch.SoftMatchState: "softmatch", dist_align.DistAlignState: "dist_align"}
