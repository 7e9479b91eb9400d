"""The optimizer and the learning-rate schedule of a run (the paper's SGD and cosine decay; AdamW,
layer-wise lr decay and a linear warm-up for fine-tuning, from timm)."""

import math
from functools import partial
from typing import Dict, List, Optional, Tuple

import timm.optim
import torch

from .errors import UsageError


def cosine_lr_factor(step: int, total_steps: int) -> float:
    """The paper's schedule: lr(k) = lr * cos(7 * pi * k / (16 * K)); ends at cos(7pi/16) ~ 0.195."""
    return math.cos(7.0 * math.pi * step / (16.0 * total_steps))


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The factor on the peak lr at optimizer step `step` (0-based) of K = `total_steps`, W = `warmup_steps`.

    1. k < W: linear warm-up (k + 1) / W, so the first step already trains (USB's k / W spends it at lr 0)
       and step W - 1 reaches the peak.
    2. k >= W: the paper's cosine over the remaining steps, cos(7 * pi * (k - W) / (16 * (K - W))).
    With W = 0 this is cosine_lr_factor exactly.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return cosine_lr_factor(step - warmup_steps, max(1, total_steps - warmup_steps))


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


def effective_layer_decay(layer_decay: Optional[float]) -> Optional[float]:
    """--layer_decay as timm takes it: None when off (unset, or 1.0: every layer at the full rate)."""
    return None if layer_decay is None or layer_decay == 1.0 else layer_decay


def build_optimizer(cfg, model: torch.nn.Module, device: torch.device) -> Tuple[torch.optim.Optimizer, object]:
    """The optimizer of --optimizer / --layer_decay and the warm-up + cosine schedule over --max_train_steps.

    Plain SGD is the paper's (Nesterov, `param_groups`), built here as it always was. AdamW, or any layer
    decay, goes through timm's create_optimizer_v2: no weight decay on 1-d parameters (biases, norms) nor on
    the model's no_weight_decay() (a ViT's pos_embed, cls_token), and with layer decay one group per layer
    and decay, each with its `lr_scale`.
    """
    fused = device.type == "cuda" or None  # one CUDA kernel for the whole update; elsewhere the foreach default
    layer_decay = effective_layer_decay(cfg.layer_decay)
    if cfg.optimizer == "sgd" and layer_decay is None:
        optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                    momentum=cfg.momentum, nesterov=True, fused=fused)
    else:
        if layer_decay is not None and not hasattr(model, "group_matcher"):
            raise UsageError(f"--layer_decay {cfg.layer_decay}: --model {cfg.model} has no layer groups "
                             "(timm's group_matcher); leave --layer_decay unset or use a timm model")
        momentum = dict(momentum=cfg.momentum) if cfg.optimizer == "sgd" else {}  # timm's sgd is Nesterov
        optimizer = timm.optim.create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.learning_rate,
                                                   weight_decay=cfg.weight_decay, layer_decay=layer_decay,
                                                   filter_bias_and_bn=True, fused=fused, **momentum)
        scale_group_lrs(optimizer)
    schedule = partial(lr_factor, total_steps=cfg.max_train_steps, warmup_steps=cfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler


def scale_group_lrs(optimizer: torch.optim.Optimizer) -> None:
    """Give each of timm's layer-decay groups its rate lr * lr_scale, head first.

    timm's own schedulers multiply by `lr_scale` at every step; torch's LambdaLR multiplies each group's
    initial lr, so the scale goes into that. The head's groups (scale 1) come first, so param_groups[0]
    carries the peak rate, the one the run logs.
    """
    if not any("lr_scale" in g for g in optimizer.param_groups):
        return
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    optimizer.param_groups.sort(key=lambda g: -g.get("lr_scale", 1.0))  # stable: timm's order within a scale
