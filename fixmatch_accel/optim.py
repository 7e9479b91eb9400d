"""The optimizer and the learning-rate schedule of a run (the paper's SGD and cosine decay)."""

import math
from functools import partial
from typing import Dict, List, Tuple

import torch


def cosine_lr_factor(step: int, total_steps: int) -> float:
    """The paper's schedule: lr(k) = lr * cos(7 * pi * k / (16 * K)); ends at cos(7pi/16) ~ 0.195."""
    return math.cos(7.0 * math.pi * step / (16.0 * total_steps))


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """Weight decay on conv and linear weights only; biases and BatchNorm (ndim <= 1) get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def schedule_at(scheduler, step: int) -> None:
    """Set the learning rates of optimizer step `step` + 1 from the schedule as configured now.

    A resumed optimizer holds the rate its checkpoint's schedule computed; after a change of
    --max_train_steps that rate would be used for one more step.
    """
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper steps only when gradients sync
    inner.last_epoch = step - 1
    inner.step()


def build_optimizer(cfg, model: torch.nn.Module, device: torch.device) -> Tuple[torch.optim.Optimizer, object]:
    """Nesterov SGD and the cosine schedule over --max_train_steps optimizer steps."""
    # fused: one CUDA kernel for the whole update; elsewhere the foreach default.
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                momentum=cfg.momentum, nesterov=True, fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(cosine_lr_factor, total_steps=cfg.max_train_steps))
    return optimizer, scheduler
