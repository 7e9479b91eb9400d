"""train(cfg): set up a run, the FixMatch loop, finish. The loop is the only place that decides the order of things."""

import dataclasses
import functools
import math
import os
import sys
from typing import Dict, Optional

import torch

from . import augment
from .algorithms.objective import Objective
from .checkpoint import (
    Checkpointer,
    Components,
    GeneratorState,
    TrainState,
    saved_step,
    set_aside_previous_run,
    write_json,
)
from .config import Resolved, TrainConfig, resolve
from .data import (
    default_image_size,
    image_sizes,
    labeled_examples,
    labeled_split,
    load_data,
    save_labeled_split,
    stats_rows,
)
from .data.images import sampled_channel_stats, unreadable_in_sample
from .data.pipeline import BadImages, build_loaders, decode_cache, endless, num_workers
from .data.streaming import StreamLoader
from .ema import ModelEMA
from .errors import UsageError
from .evaluate import Evaluator
from .launch import check_same_start, make_accelerator, restart_count, step_collectives
from .models import create_model, model_args
from .optim import build_optimizer, schedule_at
from .preflight import Start, check_start
from .pretrained import model_input_side, pretrained_preprocessing
from .runlog import RunLog, last_logged_step, trackers, write_run_config
from .step import TrainStep, build_objective, model_inputs
from .stop import StopSignal, all_finite, finite_weights, nonfinite
from .xla import give_loader_dataset, is_xla, load_models_on_host


@dataclasses.dataclass
class RunData:
    """What set-up learnt of the data: the dataset, its labeled examples, settings and loaders."""

    data: object
    labeled_idx: list
    resolved: Resolved
    mean: list
    std: list
    bad_images: BadImages
    num_bad_eval: int  # unreadable eval images the decoded cache left out
    loaders: dict  # by name: labeled, unlabeled, eval


@dataclasses.dataclass
class Run:
    """Everything the loop touches, built once by `setup_run`."""

    cfg: TrainConfig
    accelerator: object
    rd: RunData
    model: torch.nn.Module  # prepared (DDP-wrapped with several processes)
    live_model: torch.nn.Module  # the unwrapped model the EMA follows
    optimizer: object
    scheduler: object
    ema: ModelEMA
    state: TrainState
    objective: Objective  # the algorithm; its state changes every step
    train_step: TrainStep
    labeled: object  # endless iterators of batches
    unlabeled: object
    log: RunLog
    evaluator: Evaluator
    checkpointer: Checkpointer

    @property
    def top_k(self) -> str:
        return f"top-{min(5, self.rd.data.num_classes)}"  # what "top5" measures (top_k in the files)

    def nonfinite(self, step: int):
        return self.log.nonfinite(step, step - self.log.window.steps // self.cfg.gradient_accumulation_steps)

    def clip_gradients(self) -> torch.Tensor:
        """The gradients' total norm after unscaling (all processes'), then clipped to --max_grad_norm if given.

        accelerate's clip_grad_norm_ unscales fp16 gradients and reduces XLA's first. Without a limit the
        gradients are multiplied by exactly 1: the norm costs no host sync and changes nothing.
        """
        return self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm or math.inf)

    def save(self, step: int) -> str:
        """A checkpoint, never of non-finite weights (a host sync)."""
        if not finite_weights(self.live_model, self.log.window.sums.get("loss")):
            raise self.nonfinite(step)
        return self.checkpointer.save()

    def evaluate(self, step: int) -> Dict:
        result = self.evaluator(step)
        self.accelerator.print(f"step {step}: EMA top-1 {result['top1']:.2f}  {self.top_k} {result['top5']:.2f}")
        return result


def train(cfg: TrainConfig, sources: Optional[Dict[str, str]] = None, start: Optional[Start] = None) -> Dict:
    """Run FixMatch as configured; return the final evaluation. `start`: check_start's result, when made already."""
    run = setup_run(start or check_start(cfg, sources or {}))
    stop = StopSignal(run.accelerator)
    try:
        loop(run, stop)
    finally:
        stop.restore()
        run.log.close_bar()
    return finish(run)


def loop(run: Run, stop: StopSignal) -> None:
    """One optimizer step per iteration, as in the paper; then log, evaluate, checkpoint, stop on their intervals."""
    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    run.model.train()
    while state.step < cfg.max_train_steps:
        # One optimizer step of --gradient_accumulation_steps micro-batches (one in the paper): accelerate
        # all-reduces the gradients and steps the optimizer on the last only.
        for _ in range(cfg.gradient_accumulation_steps):
            with accelerator.accumulate(run.model):
                # Batch: B labeled and mu*B unlabeled uint8 images, and their weak and strong views.
                views = run.train_step.views(next(run.labeled), next(run.unlabeled))
                # Forward and loss: one pass over cat([x, u_w, u_s]), so BatchNorm sees the whole batch; the
                # algorithm's statistics are reduced over all processes inside it.
                loss, stats, objective_state = run.train_step.loss(views, run.objective.state)
                # Only with --skip_nonfinite_steps: a host sync (and, with several processes, a collective).
                finite = not cfg.skip_nonfinite_steps or all_finite(accelerator, loss)
                # Backward, gradient norm (and clipping) once the gradients are whole, optimizer step; a skipped
                # micro-batch leaves the algorithm's state as it was.
                if finite:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        stats["grad_norm"] = run.clip_gradients()
                    run.optimizer.step()
                    run.objective.state = objective_state
                # Statistics stay on the device until a logging step.
                run.log.add(stats if finite else None, views.rows)
        # Schedule and EMA. A skipped step (its last micro-batch skipped) still advances the schedule.
        lr = run.scheduler.get_last_lr()[0]  # the rate this step used (a Python float, no sync)
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if finite:
            run.ema.update(run.live_model, state.step)
        run.log.stepped()
        state.step += 1
        step = state.step

        # Log (the one host sync), evaluate, checkpoint, stop.
        logging = run.log.due(step) or stop.forces_log()
        if logging:
            run.log.write(step, lr)
        # Several processes agree at a logging step on a stop and on process 0's --checkpointing_minutes clock.
        stopping, overdue = stop.agreed(logging, logging and run.checkpointer.overdue())
        evaluating = run.evaluator.due(step) and not stopping
        saving = run.checkpointer.due(step) or overdue or stopping
        if evaluating or saving:
            with run.log.paused():
                if evaluating:
                    run.evaluate(step)
                if saving:
                    path = run.save(step)
        if stopping:
            raise stop.stopped(step, path)


def finish(run: Run) -> Dict:
    """Final evaluation and checkpoint, the EMA model, eval_results.json and the plots."""
    cfg, accelerator, state, data = run.cfg, run.accelerator, run.state, run.rd.data
    if not finite_weights(run.live_model, run.log.window.sums.get("loss")):
        raise run.nonfinite(state.step)
    result = run.evaluator(state.step)
    if run.checkpointer.enabled and run.checkpointer.saved_step != state.step:
        run.checkpointer.save()
    accelerator.wait_for_everyone()
    # model.safetensors, main process only. accelerate's safetensors path reads host pointers: on XLA the
    # (finished) EMA model moves to the host first.
    accelerator.save_model(run.ema.module.cpu() if is_xla(accelerator.device) else run.ema.module, cfg.output_dir)
    run.log.finish(state.step)
    skipped_train = run.rd.bad_images.total(state)
    if accelerator.is_main_process:
        write_json(os.path.join(cfg.output_dir, "eval_results.json"),
                   dict(result, step=state.step, eval_split=data.eval_split,
                        per_class=dict(zip(data.class_names, result["per_class"])),
                        skipped_train_images=skipped_train))
        if cfg.plots:
            from .plot import write_plots

            write_plots(cfg.output_dir)  # training_curves.png, per_class.png
    accelerator.end_training()
    accelerator.print(f"final EMA model: top-1 {result['top1']:.2f}%  {run.top_k} {result['top5']:.2f}% "
                      f"on {result['num_eval']} {data.eval_split} images -> {cfg.output_dir}")
    accelerator.print("per class top-1: " + ", ".join(
        f"{name} {'-' if acc is None else f'{acc:.1f}'}" for name, acc in zip(data.class_names, result["per_class"])))
    if skipped_train + result["skipped_images"]:
        accelerator.print(f"skipped unreadable images: {skipped_train} training reads, "
                          f"{result['skipped_images']} of the final evaluation's images")
    return result


def setup_run(start: Start) -> Run:
    """Data, model, optimizer, EMA, resume, and what the run writes."""
    from accelerate.utils import set_seed

    cfg = start.cfg
    accelerator = make_accelerator(cfg, trackers(cfg.report_to))
    for note in start.notes:
        accelerator.print(note)
    set_seed(cfg.seed)
    resuming = start.resume_path is not None
    check_same_start(accelerator, saved_step(start.resume_path) if resuming else -1)
    # Restarted by torchrun's agent: how far the run had logged, before a new start sets those files aside.
    restarts, max_restarts = restart_count()
    last_logged = last_logged_step(cfg.output_dir) if restarts and accelerator.is_main_process else None
    rd = setup_data(cfg, start.sources, accelerator, start.resume_path if start.split_from_checkpoint else None,
                    start.replacing)
    model, optimizer, scheduler, loaders = setup_model(cfg, accelerator, rd, resuming=resuming)
    live_model = accelerator.unwrap_model(model)
    ema = ModelEMA(live_model, cfg.ema_decay)
    ema.module.to(accelerator.device)  # the EMA copy is never prepared: it is evaluated and saved as it is
    state = TrainState()
    state.settings = cfg.to_dict()
    state.layout = dict(processes=accelerator.num_processes, unlabeled_rows=rd.data.unlabeled.num_rows,
                        **({"workers": num_workers(cfg)} if rd.data.streaming else {}))
    # XLA has no torch.Generator: draw the (small) augmentation parameters on the host, the same numbers as a
    # CPU run, and copy them to the device with the batch; the pixel work stays on the device.
    device = accelerator.device
    generator = torch.Generator(device="cpu" if device.type == "xla" else device).manual_seed(
        cfg.seed * 1_000_003 + accelerator.process_index)
    mean = torch.tensor(rd.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(rd.std, device=device).view(1, -1, 1, 1)
    objective = setup_objective(cfg, rd, accelerator)
    objective.init_state(device)
    # What a checkpoint holds besides accelerate's model, optimizer, schedule and RNG states, by file name.
    checkpointer = Checkpointer(accelerator, cfg, state, Components(
        shared=dict(trainer_state=state, ema=ema.module, objective=objective),
        per_process=dict(generator=GeneratorState(generator))))
    if resuming:
        checkpointer.load(start.resume_path)
        schedule_at(scheduler, state.step)
        accelerator.print(f"resumed from {start.resume_path} at step {state.step}"
                          + (", labeled split from the checkpoint" if start.split_from_checkpoint else ""))
    resolved = rd.resolved
    resize = (functools.partial(augment.resize_batch, size=resolved.image_size, interpolation=resolved.interpolation)
              if resolved.load_size != resolved.image_size else None)
    train_step = TrainStep(cfg, model, objective, mean=mean, std=std, channels_last=resolved.channels_last,
                           augment_device=resolved.augment_device, pad=resolved.crop_padding, generator=generator,
                           device=device, resize=resize)
    if accelerator.is_main_process:
        write_run_config(cfg, start.sources, accelerator, data=rd.data, resolved=rd.resolved, mean=rd.mean,
                         std=rd.std, num_labeled=len(rd.labeled_idx), model_args=model_args(live_model))
    if cfg.report_to != "none":
        accelerator.init_trackers("fixmatch", config={k: v for k, v in cfg.to_dict().items() if v is not None})
    log = RunLog(accelerator, cfg, state, resumed=resuming, bad_images=rd.bad_images,
                 console=objective.algorithm.console,
                 nonfinite=lambda step, since: nonfinite(step, since, checkpointer.latest(),
                                                         accelerator.mixed_precision))  # an error to raise
    if restarts:
        log.restarted(restarts, max_restarts, resuming, last_logged)
    eval_loader = loaders["eval"]
    evaluator = Evaluator(
        accelerator, cfg, ema, eval_loader,
        lambda images: model_inputs(resize(images) if resize else images, mean, std,
                                    channels_last=resolved.channels_last),
        rd.data.num_classes, sharded=isinstance(eval_loader, StreamLoader) or is_xla(device),
        skipped_before=rd.num_bad_eval, log=log, show_progress=log.show_bar)
    return Run(cfg=cfg, accelerator=accelerator, rd=rd, model=model, live_model=live_model, optimizer=optimizer,
               scheduler=scheduler, ema=ema, state=state, objective=objective, train_step=train_step,
               labeled=endless(loaders["labeled"], "labeled", state.positions, accelerator),
               unlabeled=endless(loaders["unlabeled"], "unlabeled", state.positions, accelerator),
               log=log, evaluator=evaluator, checkpointer=checkpointer)


def setup_data(cfg: TrainConfig, sources: Dict[str, str], accelerator, split_checkpoint: Optional[str],
               replacing: bool) -> RunData:
    """Splits, labeled examples, the auto settings, channel statistics, the decoded cache and the loaders.

    `split_checkpoint`: the checkpoint whose labeled split a resumed run reads, if it does.
    """
    show_progress = accelerator.is_main_process and sys.stderr.isatty()  # bars on a terminal; plain lines in logs
    with accelerator.main_process_first():
        data = load_data(cfg, show_progress=show_progress)
    for note in data.notes:  # e.g. a held-out split carved from train, or evaluating on the train split
        accelerator.print(f"note: {note}")
    if data.unlabeled.kind != "train" or data.unlabeled.num_with_label < data.unlabeled.num_rows:
        accelerator.print(data.unlabeled.describe())
    split_source = (f"--resume_from_checkpoint {split_checkpoint!r}: its labeled_split.json"
                    if split_checkpoint else None)
    labeled_idx, labeled_rows, bad_labeled = labeled_examples(cfg, data, labeled_split(cfg, data, split_source))
    if split_checkpoint and sources.get("num_labeled") not in (None, "default", "demo") \
            and cfg.num_labeled != len(labeled_idx):
        accelerator.print(f"note: --num_labeled {cfg.num_labeled} does not apply: a resumed run keeps the "
                          f"{len(labeled_idx)} labeled examples of its checkpoint")
    try:  # only now that the data and split are known good: a refused run leaves no empty folder behind
        os.makedirs(cfg.output_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output_dir {cfg.output_dir!r}: cannot create it ({e.strerror})") from None
    if accelerator.is_main_process:
        if replacing:  # only now: --labeled_split_file may have named the previous run's split
            why = "--overwrite_output_dir" if cfg.overwrite_output_dir else "--resume_from_checkpoint auto"
            accelerator.print(f"{why}: the previous run's files are now in {set_aside_previous_run(cfg.output_dir)}")
        save_labeled_split(os.path.join(cfg.output_dir, "labeled_split.json"), labeled_idx, cfg, data)
    # Image size and channel statistics from a seeded sample (a stream: its labeled examples).
    stats_source, rows = ((labeled_rows, range(len(labeled_rows))) if data.streaming
                          else (data.train, stats_rows(data.num_train, cfg.seed)))
    sizes = functools.cache(lambda: image_sizes(stats_source, data.image_column, rows))
    model_data = pretrained_preprocessing(cfg.model) if cfg.pretrained or cfg.pretrained_file else None
    uniform = functools.cache(lambda: default_image_size(sizes()) if len(sizes()) == 1 else None)
    # num_train decides whether the decoded cache fits: the unlabeled source is the bulk of it.
    resolved = resolve(cfg, device_type=accelerator.device.type, num_train=data.unlabeled.num_rows,
                       streaming=data.streaming, dataset_image_size=uniform, model_data=model_data,
                       dataset_native_size=uniform, model_size=model_input_side(cfg.model))
    accelerator.print(f"images: {resolved.image_size} px ({resolved.size_reason})")
    if model_data is None:
        mean, std, bad_sampled = sampled_channel_stats(stats_source, data.image_column, resolved.load_size, rows)
    else:  # the statistics the pretrained weights were trained with; the sample is only checked for bad images
        mean, std = model_data["mean"], model_data["std"]
        bad_sampled = unreadable_in_sample(stats_source, data.image_column, rows)
    bad_images = BadImages(cfg, data, accelerator.print, accelerator.device)  # only training reads count
    bad_images.read(labeled_idx, bad_labeled)
    if not data.streaming:  # a stream's sample is its (readable) labeled examples
        bad_images.read(rows, bad_sampled)
    cache, bad_eval = None, []  # (row, file) of each unreadable eval image the cache leaves out
    if resolved.cache_decoded:
        cache, bad_unlabeled, bad_eval, decoded = decode_cache(cfg, data, labeled_rows, resolved.load_size,
                                                               show_progress, resolved.interpolation)
        bad_images.read(range(decoded), bad_unlabeled, space="unlabeled")
        if bad_eval:
            accelerator.print(f"evaluation leaves out {len(bad_eval)} unreadable image(s), e.g. {bad_eval[0][1]}")
    how = f"left out of {cfg.labeled_split_file}" if cfg.labeled_split_file else "redrawn within their class"
    bad_images.check_setup(f"{len(bad_labeled)} of them labeled, {how}" if bad_labeled else "")
    loaders = build_loaders(cfg, data, labeled_idx, labeled_rows, resolved.load_size, resolved.crop_padding,
                            resolved.augment_device, accelerator, cache=cache, interpolation=resolved.interpolation)
    return RunData(data=data, labeled_idx=labeled_idx, resolved=resolved, mean=mean, std=std, bad_images=bad_images,
                   num_bad_eval=len(bad_eval), loaders=loaders)


def setup_objective(cfg: TrainConfig, rd: RunData, accelerator):
    """The algorithm of --algorithm / --dist_align; its per-example state is indexed by the unlabeled source's rows."""
    data = rd.data
    excluded = len(rd.labeled_idx) if cfg.unlabeled_excludes_labeled else 0
    num_rows = data.unlabeled.num_rows
    return build_objective(cfg, data.num_classes, data.train_labels[rd.labeled_idx], num_slots=num_rows,
                           num_unlabeled=num_rows - excluded, collectives=step_collectives(accelerator))


def setup_model(cfg: TrainConfig, accelerator, rd: RunData, resuming: bool):
    """The model (in its memory layout), optimizer and schedule, prepared with the DataLoaders.

    A resumed run's weights come from its checkpoint: the pretrained ones are not read again.
    """
    pretrained = not resuming and (cfg.pretrained or cfg.pretrained_file is not None)
    model = create_model(cfg.model, rd.data.num_classes, pretrained=pretrained,
                         pretrained_file=cfg.pretrained_file if pretrained else None,
                         image_size=rd.resolved.image_size)
    if rd.resolved.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(cfg, model, accelerator.device)
    # Streams are split by node already; accelerate prepares (shards, places) the DataLoaders.
    model, optimizer, scheduler, *prepared = accelerator.prepare(
        model, optimizer, scheduler, *(lo for lo in rd.loaders.values() if not isinstance(lo, StreamLoader)))
    prepared = iter(prepared)
    loaders = {name: lo if isinstance(lo, StreamLoader) else next(prepared) for name, lo in rd.loaders.items()}
    if is_xla(accelerator.device):
        for lo in loaders.values():
            give_loader_dataset(lo)
        accelerator.register_load_state_pre_hook(load_models_on_host)
    return model, optimizer, scheduler, loaders
