"""One training step's views and loss, chosen once per device: views -> one forward over cat([x, u_w, u_s]) -> loss.

Which views the loaders already made (PIL workers) and whether the strong view is made
inside the (compiled) loss are decided here at setup, never branched on in the loop.
"""

from functools import partial
from typing import NamedTuple, Union

import torch

from . import augment
from .algorithms import dist_align, registry
from .algorithms.objective import SHARED_SETTINGS, Objective
from .data.rows import valid_mask


class StrongInputs(NamedTuple):
    """What makes the strong view inside the (compiled) step: the flipped and cropped uint8 batch and the
    RandAugment parameters drawn for it (an explicit torch.Generator cannot be traced)."""

    base: torch.Tensor
    params: object  # augment.sample_rand_augment_params' draws


class Views(NamedTuple):
    """One step's uint8 batches: weak labeled, weak and strong unlabeled (or what makes the strong one), rows."""

    x: torch.Tensor
    y: torch.Tensor
    u_w: torch.Tensor
    u_s: Union[torch.Tensor, StrongInputs]  # StrongInputs when the strong view is made inside the step
    u_y: torch.Tensor
    rows: torch.Tensor  # the unlabeled examples' rows (negative: an unreadable image the loader replaced)


def strong_view_in_step(device: torch.device) -> bool:
    """Whether the strong view is made inside the step function (compiled with it under --compile).

    Not on a CPU: eager RandAugment there applies each op to its own samples only, while a
    static-shape graph computes every op for every sample (bench/RESULTS.md). Same pixels.
    """
    return device.type != "cpu"


def model_inputs(images, mean, std, channels_last: bool):
    """uint8 [N, C, H, W] -> the normalised float batch the model takes, in its memory layout."""
    inputs = augment.normalize_batch(images, mean, std)
    return inputs.contiguous(memory_format=torch.channels_last) if channels_last else inputs


def forward_loss(model, objective_state, x, y, u_w, u_s, u_y, rows, *, objective, mean, std, channels_last: bool):
    """One forward over cat([x, u_w, u_s]) (uint8 views) and the objective: `(loss, stats, new objective state)`.

    BatchNorm sees all three views at once, as in the paper. The objective reduces its statistics
    over processes itself. Free of host syncs and of data-dependent shapes, so it compiles to one graph.
    """
    # A prepared model runs under the run's autocast.
    logits = model(model_inputs(torch.cat([x, u_w, u_s]), mean, std, channels_last))
    b = x.shape[0]
    logits_u_w, logits_u_s = logits[b:].chunk(2)
    # A replaced unreadable image has a negative row: it is trained on as a black filler but never indexes state.
    return objective(objective_state, logits[:b], y, logits_u_w, logits_u_s, rows.clamp(min=0), valid_mask(rows),
                     u_y)


def strong_forward_loss(model, objective_state, x, y, u_w, strong: StrongInputs, u_y, rows, *, strong_config: str,
                        **kwargs):
    """forward_loss with the strong view made on the device from `strong`, as
    `unlabeled_batch_views(in_graph=True)` returns it.

    The draws happen outside (an explicit torch.Generator cannot be traced), the pixel
    work inside, so augmentation + forward + loss compile together.
    """
    u_s = augment.apply_rand_augment(strong.base, strong.params, strong_config)
    return forward_loss(model, objective_state, x, y, u_w, u_s, u_y, rows, **kwargs)


def unlabeled_batch_views(u, strong_config: str, *, in_graph: bool, generator=None, hflip: bool = True,
                          pad: int = 4):
    """The weak view of an unlabeled uint8 batch and its strong view, or what makes it inside the step.

    The strong view is RandAugment on a flip + crop of its own, drawn apart from the weak
    view's, as the PIL path, kekmodel and the TF original all do (not on u_w, which would
    tie the two views' geometry). Returns (u_w, u_s), or with `in_graph` (u_w, StrongInputs) for
    `strong_forward_loss`.
    """
    u_w = augment.weak_batch(u, hflip=hflip, pad=pad, generator=generator)
    base = augment.weak_batch(u, hflip=hflip, pad=pad, generator=generator)
    params = augment.sample_rand_augment_params(u.shape[0], strong_config, generator=generator, device=u.device,
                                                image_size=tuple(u.shape[-2:]))
    if in_graph:
        return u_w, StrongInputs(base, params)
    return u_w, augment.apply_rand_augment(base, params, strong_config)


def build_objective(cfg, num_classes: int, labeled_labels, *, num_slots: int, num_unlabeled: int, collectives=None):
    """The run's Objective from its settings. labeled_labels: class ids of the labeled split (the 'labeled'
    alignment target); num_slots / num_unlabeled: rows unlabeled samples index / how many are unlabeled examples;
    collectives: launch.step_collectives' (all_sum, all_gather), None on one process."""
    all_sum, all_gather = collectives or (None, None)
    target = (dist_align.label_frequencies(torch.as_tensor(labeled_labels, dtype=torch.long), num_classes)
              if cfg.dist_align == "labeled" else None)
    settings = {name: getattr(cfg, name) for name in (*SHARED_SETTINGS, *(s.name for s in registry.all_settings()))}
    return Objective(cfg.algorithm, num_classes=num_classes, dist_align=cfg.dist_align, dist_target=target,
                     num_slots=num_slots, num_unlabeled=num_unlabeled, all_sum=all_sum, all_gather=all_gather,
                     **settings)


class TrainStep:
    """`views(labeled batch, unlabeled batch)` and `loss(views, objective state) -> (loss, stats, new state)`
    for one device.

    With --augment_device cpu the loaders' workers made the views; otherwise they are made
    here from uint8 batches with `generator`, the strong one inside `loss` off the CPU.
    """

    def __init__(self, cfg, model, objective, *, mean, std, channels_last: bool, augment_device: str, pad: int,
                 generator: torch.Generator, device: torch.device, resize=None):
        self.strong_config, self.hflip, self.pad, self.generator = cfg.strong_augment, cfg.hflip, pad, generator
        self.resize = resize  # uint8 batch -> the model's input size, when images are loaded smaller
        self.in_workers = augment_device == "cpu"
        self.in_graph = not self.in_workers and strong_view_in_step(device)
        loss_kwargs = dict(objective=objective, mean=mean, std=std, channels_last=channels_last)
        core = (partial(strong_forward_loss, model, strong_config=cfg.strong_augment, **loss_kwargs)
                if self.in_graph else partial(forward_loss, model, **loss_kwargs))
        self._core = compiled(core, cfg.compile_mode) if cfg.compile else core

    def views(self, batch_x, batch_u) -> Views:
        if self.in_workers:
            (x, y, _), (u_w, u_s, u_y, rows) = batch_x, batch_u
            return Views(x, y, u_w, u_s, u_y, rows)
        (x, y, _), (u, u_y, rows) = batch_x, batch_u
        if self.resize is not None:  # views are made at the model's input size
            x, u = self.resize(x), self.resize(u)
        x = augment.weak_batch(x, hflip=self.hflip, pad=self.pad, generator=self.generator)
        u_w, u_s = unlabeled_batch_views(u, self.strong_config, in_graph=self.in_graph, generator=self.generator,
                                         hflip=self.hflip, pad=self.pad)
        return Views(x, y, u_w, u_s, u_y, rows)

    def loss(self, views: Views, objective_state):
        return self._core(objective_state, views.x, views.y, views.u_w, views.u_s, views.u_y, views.rows)


def compiled(core, mode: str):
    """torch.compile of the step's core; with CUDA graphs each call marks a new step first."""
    graph = torch.compile(core, mode=mode)
    if mode != "reduce-overhead":
        return graph

    def core_step(*args):
        torch.compiler.cudagraph_mark_step_begin()  # a new step: earlier graph outputs may be reused
        loss, stats, objective_state = graph(*args)
        # The state lives on into the next step, whose replay overwrites this one's outputs.
        return loss, stats, torch.utils._pytree.tree_map(torch.clone, objective_state)
    return core_step
