"""The algorithms by name: each module declares one `Algorithm` and registers it with `@register`.

What a declaration says is all the rest of the project needs: its flags (config fields and
--help), its default distribution alignment, its state (initial value; saved as named
tensors), its step, and how its curves read in the plots. As USB's `@ALGORITHMS.register`,
but the step stays a pure function of tensors with static shapes, and every statistic
its state needs is reduced over processes inside the step through `Collectives`.
"""

import dataclasses
from typing import Any, Callable, ClassVar, Dict, List, NamedTuple, Optional, Tuple

from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Setting:
    """One flag of an algorithm's own: a config field `name` (prefixed with the algorithm's name)."""

    name: str
    default: Any
    help: str
    bound: str = ""  # "positive" or "non-negative": checked with the other flags

    @property
    def type(self) -> type:
        return type(self.default)


class Batch(NamedTuple):
    """One step's logits and what an algorithm may read of the batch; probabilities are detached float32."""

    logits_x: Tensor  # [B, C] labeled
    targets_x: Tensor  # [B] class ids
    logits_u_w: Tensor  # [N, C] unlabeled, weak view
    logits_u_s: Tensor  # [N, C] unlabeled, strong view (the gradient flows through these)
    probs_u_w: Tensor  # [N, C] softmax(logits_u_w / T)
    aligned_u_w: Tensor  # [N, C] probs_u_w after --dist_align (probs_u_w itself without it)
    indices: Tensor  # [N] int64 the unlabeled samples' rows in the unlabeled set
    valid: Tensor  # [N] bool: False for a sample standing in for an unreadable image
    targets_u: Optional[Tensor]  # [N] true labels, for statistics only; None when unknown


class Collectives(NamedTuple):
    """Over all processes, inside the step (identities on one process)."""

    sum: Callable[[Dict[str, Tensor]], Dict[str, Tensor]]  # a dict of float tensors summed, in one collective
    gather: Callable[[Tensor], Tensor]  # an int tensor concatenated along dim 0 in process order


class Algorithm:
    """Base of every algorithm. A subclass sets the class attributes and implements `init_state` and `step`.

    `settings` is the run's config (or any object with its fields as attributes): an algorithm reads
    its own settings and the shared ones (threshold, temperature, lambda_u, stats_momentum) from it.
    """

    name: ClassVar[str]  # --algorithm NAME; also the prefix of its state's tensors in a checkpoint
    title: ClassVar[str]  # as the plots write it
    summary: ClassVar[str]  # one line for --help
    own_settings: ClassVar[Tuple[Setting, ...]] = ()
    uses: ClassVar[Tuple[str, ...]] = ()  # the shared settings it reads besides temperature and lambda_u
    dist_align: ClassVar[str] = "none"  # --dist_align when not given
    dist_align_choices: ClassVar[Tuple[str, ...]] = ("none", "uniform", "labeled")
    console: ClassVar[Tuple[Tuple[str, str], ...]] = (("mask", "mask_ratio"),)  # (label, metrics key) after loss_u
    mask_means: ClassVar[str] = "confidence \u2265 --threshold"  # the plots' mask-ratio panel: what is counted
    equal_thresholds_mean: ClassVar[str] = "one threshold"  # what threshold_per_class is when all classes agree
    threshold_is_ceiling: ClassVar[bool] = False  # --threshold is the highest per-class threshold (plotted)
    # The loss is a mean of per-sample terms once the reduced statistics are known (FreeMatch's fairness term is
    # not): then the processes' mean loss is the loss of their batches together, which a test checks.
    sample_mean_loss: ClassVar[bool] = True

    def __init__(self, settings, *, num_classes: int, num_slots: int = 0, num_unlabeled: Optional[int] = None):
        self.settings, self.num_classes = settings, num_classes
        self.num_slots, self.num_unlabeled = num_slots, num_unlabeled

    def init_state(self, device=None) -> Optional[NamedTuple]:
        """The state before the first step: a NamedTuple of tensors (None fields allowed), or None."""
        return None

    def step(self, state, batch: Batch, collectives: Collectives) -> Tuple[Tensor, Dict[str, Tensor], Any]:
        """`(loss, stats, new state)`: stats as `common.consistency_loss` gives them plus `threshold_per_class`
        [C]; any other 0-d or [C] float statistic is logged under its name, averaged over steps and processes."""
        raise NotImplementedError


ALGORITHMS: Dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make `cls` available as --algorithm cls.name."""
    if cls.name in ALGORITHMS:
        raise ValueError(f"algorithm {cls.name!r} is registered twice")
    for s in cls.own_settings:
        if not s.name.startswith(cls.name + "_"):
            raise ValueError(f"{cls.name}'s setting {s.name!r} must start with '{cls.name}_'")
    ALGORITHMS[cls.name] = cls
    return cls


def get(name: str) -> type:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def all_settings() -> List[Setting]:
    """Every algorithm's own settings, in registration order (the config's fields after the shared ones)."""
    return [s for cls in ALGORITHMS.values() for s in cls.own_settings]
