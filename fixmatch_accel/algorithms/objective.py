"""The unlabeled objective of a run: one algorithm, optionally with distribution alignment, as one step function.

`Objective(...)(state, logits..., indices, valid) -> (loss, stats, new state)`. Every statistic an
algorithm keeps is reduced over all processes inside the step, by the collectives handed in
(`all_sum`: a flat float tensor summed over processes; `all_gather`: an int tensor concatenated
along dim 0 in process order), so every process holds the same state at every step. With one
process both are identities. The algorithm is chosen once here, never branched on in the loop.
"""

from types import SimpleNamespace
from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import Tensor

from . import dist_align, registry
from .common import weak_probs
from .registry import Batch, Collectives

DIST_ALIGN = ("none", "uniform", "labeled")
# The settings every algorithm may read, with the config's defaults (the paper's).
SHARED_SETTINGS = dict(threshold=0.95, temperature=1.0, lambda_u=1.0, stats_momentum=0.999)


class ObjectiveState(NamedTuple):
    algorithm: Optional[NamedTuple]  # the algorithm's state (None for one that keeps none)
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
    """The registered algorithm of `algorithm`, with `dist_align` "none", "uniform" or "labeled".

    settings: the shared and algorithm settings by config name (threshold, lambda_u, flexmatch_warmup, ...);
    unnamed ones take the config's defaults. num_slots: size of the unlabeled index space (the rows `indices`
    point into); num_unlabeled: how many of those slots are unlabeled examples (fewer when labeled rows are
    left out of the unlabeled data). dist_target: [C] class frequencies for dist_align "labeled".
    `state` is the run's current state; `state_dict()` / `load_state_dict()` save and restore it as named
    tensors ("flexmatch.selected_label", "dist_align.p_model", ...).
    """

    def __init__(self, algorithm: str, *, num_classes: int, dist_align: Optional[str] = None,
                 dist_target: Optional[Tensor] = None, num_slots: int = 0, num_unlabeled: Optional[int] = None,
                 all_sum: Optional[Callable[[Tensor], Tensor]] = None,
                 all_gather: Optional[Callable[[Tensor], Tensor]] = None, **settings):
        cls = registry.get(algorithm)
        dist_align = cls.dist_align if dist_align is None else dist_align
        if dist_align not in cls.dist_align_choices:
            raise ValueError(f"distribution alignment {dist_align!r} does not apply to {algorithm}; choose from "
                             f"{', '.join(cls.dist_align_choices)}")
        if dist_align == "labeled" and dist_target is None:
            raise ValueError("distribution alignment 'labeled' needs the labeled class frequencies (dist_target)")
        known = dict(SHARED_SETTINGS, **{s.name: s.default for s in registry.all_settings()})
        unknown = set(settings) - set(known)
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}")
        self.settings = SimpleNamespace(**dict(known, **settings))
        self.algorithm = cls(self.settings, num_classes=num_classes, num_slots=num_slots,
                             num_unlabeled=num_unlabeled)
        self.num_classes, self.dist_align = num_classes, dist_align
        self.dist_target = dist_target if dist_align == "labeled" else None
        all_sum = all_sum or _identity  # None: one process
        self.collectives = Collectives(lambda stats: summed(stats, all_sum), all_gather or _identity)
        self.state: Optional[ObjectiveState] = None

    def init_state(self, device=None) -> ObjectiveState:
        """The state before the first step; also made the current `state`."""
        aligned = (None if self.dist_align == "none"
                   else dist_align.DistAlignState.init(self.num_classes, self.dist_target, device))
        self.state = ObjectiveState(self.algorithm.init_state(device), aligned)
        return self.state

    def __call__(self, state: ObjectiveState, logits_x: Tensor, targets_x: Tensor, logits_u_w: Tensor,
                 logits_u_s: Tensor, indices: Tensor, valid: Tensor, targets_u: Optional[Tensor] = None):
        """`(loss, stats, new state)` of one step. indices: [N] the unlabeled samples' slots; valid: [N] bool,
        False for a sample that stands in for an unreadable image (it never updates per-example state)."""
        probs = weak_probs(logits_u_w, self.settings.temperature)
        aligned_state, aligned = state.dist_align, probs
        if aligned_state is not None:  # USB's order: update p_model with this batch, then align it
            aligned_state = dist_align.update_state(aligned_state,
                                                    self.collectives.sum(dist_align.batch_statistics(probs)),
                                                    momentum=self.settings.stats_momentum)
            aligned = dist_align.align(probs, aligned_state)
        batch = Batch(logits_x, targets_x, logits_u_w, logits_u_s, probs, aligned, indices, valid, targets_u)
        loss, stats, algorithm_state = self.algorithm.step(state.algorithm, batch, self.collectives)
        return loss, stats, ObjectiveState(algorithm_state, aligned_state)

    def tensors(self, state: ObjectiveState) -> Dict[str, Tensor]:
        """`state` as named tensors, prefixed with the algorithm's name or "dist_align"."""
        out = {}
        for prefix, part in self._parts(state):
            out.update({f"{prefix}.{name}": value for name, value in part._asdict().items() if value is not None})
        return out

    def from_tensors(self, state: ObjectiveState, saved: Dict[str, Tensor]) -> ObjectiveState:
        """`state` with every tensor replaced by the saved one of the same name and shape (KeyError / ValueError
        naming the tensor otherwise), on `state`'s devices."""
        loaded = {}
        for prefix, part in self._parts(state):
            values = {}
            for name, value in part._asdict().items():
                key = f"{prefix}.{name}"
                if value is not None and key not in saved:
                    raise KeyError(f"no {key}")
                if value is not None and saved[key].shape != value.shape:
                    raise ValueError(f"{key} has shape {tuple(saved[key].shape)}, this run's is {tuple(value.shape)}")
                values[name] = None if value is None else saved[key].to(device=value.device, dtype=value.dtype)
            loaded[prefix] = type(part)(**values)
        return ObjectiveState(loaded.get(self.algorithm.name), loaded.get("dist_align"))

    def _parts(self, state: ObjectiveState):
        return [(prefix, part) for prefix, part in ((self.algorithm.name, state.algorithm),
                                                    ("dist_align", state.dist_align)) if part is not None]

    # A component of the checkpoint: the current state as named tensors (empty for a state-free algorithm).

    def state_dict(self) -> Dict[str, Tensor]:
        return self.tensors(self.state)

    def load_state_dict(self, saved: Dict[str, Tensor]) -> None:
        self.state = self.from_tensors(self.state, saved)
