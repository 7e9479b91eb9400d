"""Exponential moving average of a model's parameters and buffers.

The EMA is a separate module that is evaluated and saved directly; weights are
never swapped into the live model. timm's ModelEmaV3 does the averaging but not
the step-dependent warm-up below, which short runs need, so this is written here.
"""

import copy

import torch
from torch import nn


def ema_decay_at(step: int, decay: float) -> float:
    """Decay used after optimizer step `step` (0-based): min(decay, (1+t)/(10+t)).

    Without the warm-up an EMA at 0.999 still holds mostly the random
    initialisation after a few hundred steps.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


class ModelEMA(nn.Module):
    """Holds `module`, an eval-mode copy of the model whose weights track the live one."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend the live model in after optimizer step `step`; no host sync."""
        d = ema_decay_at(step, self.decay)
        ema_float, live_float, ema_other, live_other = [], [], [], []
        live_state = model.state_dict()
        for name, ema_t in self.module.state_dict().items():
            live_t = live_state[name].detach()
            if ema_t.is_floating_point():
                ema_float.append(ema_t)
                live_float.append(live_t.to(ema_t.dtype))
            else:
                ema_other.append(ema_t)
                live_other.append(live_t)
        if ema_float and ema_float[0].device.type == "xla":
            # XLA gives equal Python scalars one shared graph input: a weight that now and then equals another
            # constant of the step (0.5, 0.45, ...) would change the graph and recompile it. A 1-element
            # tensor is always an input of its own.
            weight = torch.tensor([1.0 - d], dtype=torch.float32).to(ema_float[0].device).view(())
            for e, live in zip(ema_float, live_float):
                e.lerp_(live, weight)
        else:
            # One fused foreach kernel per group instead of a Python loop of small ops.
            torch._foreach_lerp_(ema_float, live_float, 1.0 - d)
        for e, live in zip(ema_other, live_other):
            e.copy_(live)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
