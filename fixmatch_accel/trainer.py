"""The Accelerate training loop: setup, the FixMatch step, logging, evaluation, checkpoints.

`train(cfg)` is the only place that decides the order of things.
"""

import datetime
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import time
from functools import partial
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import augment
from .config import TrainConfig
from .data import (DecodedImages, ImageDataset, SampleSeeds, batch_identity, channel_stats, collate_fillers, decode_split,
                   default_image_size, image_name, image_sizes, labeled_examples, labeled_split, load_data,
                   repeat_to_fill, save_labeled_split, stats_rows)
from .ema import ModelEMA
from .errors import UsageError, describe
from .evaluate import evaluate
from .fixmatch import fixmatch_loss
from .models import create_model
from .data.streaming import StreamImages, StreamLoader, batches_per_pass, fetch_rows, unlabeled_stream
from .xla import PaddedToMultiple, XlaMetricsLog, give_loader_dataset, is_xla, load_models_on_host, padded_collate
from .xla import sync as xla_sync

# Decoded train splits under this size are kept in memory by default (--cache_decoded).
CACHE_LIMIT_BYTES = 4 * 2**30

# Files that mark an output_dir as holding a run.
RUN_FILES = ("metrics.jsonl", "checkpoints", "model.safetensors")
# Everything a run (and fixmatch-plot / fixmatch-predict) leaves there: set aside by --overwrite_output_dir.
RUN_OUTPUTS = RUN_FILES + ("config.json", "labeled_split.json", "eval_results.json", "xla_metrics.json",
                           "training_curves.png", "per_class.png", "predictions.csv")


def cosine_lr_factor(step: int, total_steps: int) -> float:
    """The paper's schedule: lr(k) = lr * cos(7 * pi * k / (16 * K)); ends at cos(7pi/16) ~ 0.195."""
    return math.cos(7.0 * math.pi * step / (16.0 * total_steps))


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """Weight decay on conv and linear weights only; biases and BatchNorm (ndim <= 1) get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def default_channels_last(device: torch.device) -> bool:
    """channels_last unless asked: faster convolutions on CUDA and on CPUs (oneDNN; 1.1-1.25x forward+backward
    measured, bench/RESULTS.md); XLA and MPS keep the default layout."""
    return device.type in ("cuda", "cpu")


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (CPU work is done when queued; XLA waits when read)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ema_from_main_process(accelerator, ema: ModelEMA) -> None:
    """Give every process the EMA of process 0, the one that is saved.

    Each process blends in the BatchNorm statistics of its own forward passes (DDP re-sends the
    live buffers only at the next forward), so the processes' EMAs drift apart, and an
    evaluation split over processes would score a mix of models.
    """
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast

    tensors = list(ema.module.state_dict().values())
    for mine, main in zip(tensors, broadcast(tensors, from_process=0)):
        if main is not mine:  # XLA's broadcast returns new tensors
            mine.copy_(main)


def strong_view_in_step(device: torch.device) -> bool:
    """Whether the strong view is made inside the step function (compiled with it under --compile).

    Not on a CPU: there eager RandAugment applies each op to its own samples only, while a
    compiled graph (static shapes) computes every op for every sample and selects: 1.3x
    slower for 28 samples, 4.5-9x for 448 (measured, bench/RESULTS.md). The pixels are the
    same either way (tested).
    """
    return device.type != "cpu"


def model_inputs(images, mean, std, channels_last: bool):
    """uint8 [N, C, H, W] -> the normalised float batch the model takes, in its memory layout."""
    inputs = augment.normalize_batch(images, mean, std)
    return inputs.contiguous(memory_format=torch.channels_last) if channels_last else inputs


def forward_loss(model, x, y, u_w, u_s, u_y, *, mean, std, channels_last: bool, threshold: float,
                 temperature: float, lambda_u: float):
    """One forward over cat([x, u_w, u_s]) (uint8 views) and the FixMatch loss: `(loss, stats)`.

    BatchNorm sees all three views at once, as in the paper. Free of host syncs and
    of data-dependent shapes, so it compiles to one graph.
    """
    # A prepared model runs under the run's autocast.
    logits = model(model_inputs(torch.cat([x, u_w, u_s]), mean, std, channels_last))
    b = x.shape[0]
    logits_u_w, logits_u_s = logits[b:].chunk(2)
    return fixmatch_loss(logits[:b], y, logits_u_w, logits_u_s, threshold=threshold, temperature=temperature,
                         lambda_u=lambda_u, targets_u=u_y)


def strong_forward_loss(model, x, y, u_w, strong, u_y, *, strong_config: str, **kwargs):
    """forward_loss with the strong view made on the device: `strong` is (its flipped and cropped
    unlabeled batch, pre-drawn RandAugment parameters), as `unlabeled_batch_views(in_graph=True)` returns.

    The draws happen outside (an explicit torch.Generator cannot be traced), the
    pixel work inside, so augmentation + forward + loss compile together.
    """
    base, params = strong
    u_s = augment.apply_rand_augment(base, params, strong_config)
    return forward_loss(model, x, y, u_w, u_s, u_y, **kwargs)


def unlabeled_batch_views(u, strong_config: str, *, in_graph: bool, generator=None, hflip: bool = True,
                          pad: int = 4):
    """The weak view of an unlabeled uint8 batch and its strong view, or what makes it inside the step.

    The strong view is RandAugment on a flip + crop of its own, drawn apart from the weak
    view's, as the CPU path's PIL transforms, kekmodel and the TF original all do: not on
    u_w itself, which would tie the two views' geometry. Returns (u_w, u_s), or with
    `in_graph` (u_w, (flipped and cropped u, RandAugment draws)) for `strong_forward_loss`.
    """
    u_w = augment.weak_batch(u, hflip=hflip, pad=pad, generator=generator)
    base = augment.weak_batch(u, hflip=hflip, pad=pad, generator=generator)
    params = augment.sample_rand_augment_params(u.shape[0], strong_config, generator=generator, device=u.device,
                                                image_size=tuple(u.shape[-2:]))
    if in_graph:
        return u_w, (base, params)
    return u_w, augment.apply_rand_augment(base, params, strong_config)


class TrainState:
    """Step counter and data positions, saved in every checkpoint as JSON."""

    def __init__(self):
        self.step = 0
        self.skipped = 0  # non-finite steps skipped with --skip_nonfinite_steps
        self.bad_images = 0  # unreadable images the training loaders replaced
        self.positions: Dict[str, List[int]] = {}
        self.layout: Dict[str, int] = {}  # processes and workers: the data order depends on them


class Stopped(Exception):
    """Ends a run early with a message and an exit code: a stop signal (after a checkpoint) or a non-finite step."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignal:
    """SIGTERM / SIGINT ask the loop to finish its step, checkpoint and exit; a second SIGINT aborts."""

    def __init__(self):
        self.signum = None
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. in a notebook's worker): leave signals alone
                pass

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def endless(loader, name: str, state: TrainState, accelerator):
    """Yield batches forever, a new shuffle each pass (set_epoch), resuming mid-pass from `state`."""
    epoch, done = state.positions.get(name, [0, 0])
    while True:
        if isinstance(loader, StreamLoader):
            batches = loader.skip_first(done)
        else:
            batches = accelerator.skip_first_batches(loader, done) if done else loader
        batches.set_epoch(epoch)  # on the loader iterated: accelerate re-applies its own epoch when iteration starts
        if hasattr(getattr(loader, "dataset", None), "set_epoch"):  # per-sample augmentation seeds (CPU path)
            loader.dataset.set_epoch(epoch)
        for batch in batches:
            done += 1
            state.positions[name] = [epoch, done]
            yield batch
        epoch, done = epoch + 1, 0
        state.positions[name] = [epoch, done]


def checkpoint_steps(output_dir: str) -> List[int]:
    """Steps of the complete checkpoints, oldest first: only renamed `step_N` folders count, never `.tmp` ones."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", d)))


def latest_checkpoint(output_dir: str) -> Optional[str]:
    steps = checkpoint_steps(output_dir)
    return os.path.join(output_dir, "checkpoints", f"step_{steps[-1]}") if steps else None


def save_checkpoint(accelerator, output_dir: str, state: TrainState, ema: ModelEMA, generator: torch.Generator,
                    total_limit: Optional[int] = None) -> str:
    """Write to a temporary folder, then rename, so a kill mid-write never leaves a half checkpoint.

    Besides accelerate's files: trainer_state.json (step, data positions), ema.safetensors
    and one generator_<rank>.safetensors per process. Nothing is pickled, so loading
    runs no code from the checkpoint (accelerate would unpickle registered objects).
    """
    final = os.path.join(output_dir, "checkpoints", f"step_{state.step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)  # an interrupted write of this very step: incomplete by construction
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    save_file({"state": generator.get_state()}, os.path.join(tmp, f"generator_{accelerator.process_index}.safetensors"))
    if accelerator.is_main_process:
        # .cpu(): safetensors reads host memory (an XLA tensor has none to point at); it copies device tensors anyway.
        save_file({k: v.cpu().contiguous() for k, v in ema.module.state_dict().items()},
                  os.path.join(tmp, "ema.safetensors"))
        _write_json(os.path.join(tmp, "trainer_state.json"),
                    {"step": state.step, "skipped": state.skipped, "bad_images": state.bad_images,
                     "positions": state.positions, "layout": state.layout})
        shutil.copy(os.path.join(output_dir, "labeled_split.json"), tmp)  # the run's labeled examples
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(final):  # the same step saved before a resume: keep the older copy aside
            os.replace(final, f"{final}.replaced_{int(time.time())}")
        os.replace(tmp, final)
        if total_limit:
            for old in checkpoint_steps(output_dir)[:-total_limit]:
                shutil.rmtree(os.path.join(output_dir, "checkpoints", f"step_{old}"))
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str, state: TrainState, ema: ModelEMA, generator: torch.Generator) -> None:
    """Restore a checkpoint written by save_checkpoint; any problem is one clear line."""
    rank = accelerator.process_index
    from accelerate.utils.other import load as weights_only_load

    def read_json(file):
        with open(file) as f:
            return json.load(f)

    # Every file of a checkpoint, each read on its own first so that a missing, truncated or hostile
    # one is named (accelerate reports a missing model.safetensors as a missing pytorch_model.bin, and
    # skips unreadable RNG states with only an info log: read here with weights_only and accelerate's
    # numpy allow-list, they are an error, not a silently inexact resume).
    readers = {"trainer_state.json": read_json, "model.safetensors": load_file, "optimizer.bin":
               partial(weights_only_load, map_location="cpu"), "scheduler.bin": weights_only_load,
               "ema.safetensors": load_file, f"random_states_{rank}.pkl": weights_only_load,
               f"generator_{rank}.safetensors": load_file}
    missing = [name for name in readers if not os.path.exists(os.path.join(path, name))]
    if missing:
        raise UsageError(f"--resume_from_checkpoint {path!r}: cannot load it (missing {', '.join(missing)})")
    used_here = {"trainer_state.json", "ema.safetensors", f"generator_{rank}.safetensors"}  # the rest: accelerate's
    loaded = {}
    for name, read in readers.items():
        try:
            value = read(os.path.join(path, name))
            if name in used_here:  # not kept: a second copy of the weights and optimizer state
                loaded[name] = value
        except Exception as e:
            raise UsageError(f"--resume_from_checkpoint {path!r}: cannot read {name} "
                             f"({describe(e, 'empty or truncated')})") from None
    saved = loaded["trainer_state.json"]
    try:
        accelerator.load_state(path)  # model, optimizer, scheduler, RNGs: weights_only / safetensors
        ema.module.load_state_dict(loaded["ema.safetensors"])
        generator.set_state(loaded[f"generator_{rank}.safetensors"]["state"])
        state.step = int(saved["step"])
        state.skipped = int(saved.get("skipped", 0))
        state.bad_images = int(saved.get("bad_images", 0))
        state.positions = {k: [int(e), int(b)] for k, (e, b) in saved["positions"].items()}
        saved_layout = saved.get("layout", {})
    except Exception as e:  # another model, a malformed state: the user must know, never a silent restart
        raise UsageError(f"--resume_from_checkpoint {path!r}: cannot load it ({describe(e)})") from None
    changed = [f"{k} {state.layout.get(k)} (was {v})" for k, v in saved_layout.items() if state.layout.get(k) != v]
    if changed:
        accelerator.print(f"warning: resumed with {', '.join(changed)}: the data order from here on is not the "
                          "interrupted run's (the run stays valid, but is not an exact continuation)")


def _resolve_resume(cfg: TrainConfig) -> Optional[str]:
    if cfg.resume_from_checkpoint is None:
        return None
    if cfg.resume_from_checkpoint == "latest":
        path = latest_checkpoint(cfg.output_dir)
        if path is None:
            raise UsageError(f"--resume_from_checkpoint latest: no checkpoint under {cfg.output_dir}/checkpoints")
    else:
        path = cfg.resume_from_checkpoint
        if not os.path.isdir(path):
            raise UsageError(f"--resume_from_checkpoint {path!r}: no such folder")
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise UsageError(f"--resume_from_checkpoint {path!r}: not a checkpoint (no trainer_state.json); "
                         "checkpoints are OUTPUT_DIR/checkpoints/step_N")
    return path


def _saved_step(path: str) -> int:
    """The step a checkpoint was saved at; -1 when unreadable (load_checkpoint then says why)."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            return int(json.load(f)["step"])
    except Exception:
        return -1


def _check_output_dir(cfg: TrainConfig, resume_path: Optional[str]) -> bool:
    """Whether a new run replaces the run in --output_dir (with --overwrite_output_dir); refuse without it.

    Resuming continues the run in --output_dir only from one of its own checkpoints; one of
    another run's starts a new run here, which must not write over (or append to) a run found here.
    """
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise UsageError(f"--output_dir {cfg.output_dir!r} is a file, not a folder")
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.output_dir, f))]
    own = resume_path is not None and (os.path.dirname(os.path.realpath(resume_path))
                                       == os.path.realpath(os.path.join(cfg.output_dir, "checkpoints")))
    if own and cfg.overwrite_output_dir:
        raise UsageError(f"--overwrite_output_dir with --resume_from_checkpoint {resume_path!r}: that checkpoint is "
                         "this --output_dir's own run, which resuming continues; drop one of the two")
    if present and not own and not cfg.overwrite_output_dir:
        other = (f" and --resume_from_checkpoint {resume_path!r} is not one of its checkpoints"
                 if resume_path is not None else "")
        raise UsageError(
            f"--output_dir {cfg.output_dir!r} already holds a run ({', '.join(present)}){other}: "
            "resume it with --resume_from_checkpoint latest, choose another --output_dir, or pass --overwrite_output_dir"
        )
    return bool(present) and not own


def set_aside_previous_run(output_dir: str) -> str:
    """Move the previous run's files into output_dir/replaced_<time>/ and return that folder.

    Its checkpoints must not stay beside the new run's: `--resume_from_checkpoint latest`
    would continue the old run, and --checkpoints_total_limit would count its steps as the
    newest and delete the new run's. Nothing is deleted.
    """
    dest = os.path.join(output_dir, time.strftime("replaced_%Y%m%d-%H%M%S"))
    while os.path.exists(dest):
        dest += "_"
    os.makedirs(dest)
    for name in RUN_OUTPUTS:
        if os.path.exists(os.path.join(output_dir, name)):
            os.replace(os.path.join(output_dir, name), os.path.join(dest, name))
    return dest


# The package to install for each accelerate tracker (accelerate itself only warns and logs nothing).
TRACKER_PACKAGES = dict(tensorboard="tensorboard (or tensorboardX)", wandb="wandb", mlflow="mlflow", comet_ml="comet_ml",
                        aim="aim", clearml="clearml", dvclive="dvclive", swanlab="swanlab", trackio="trackio")


def _trackers(report_to: str):
    """`--report_to` as accelerate's log_with: None, 'all', or a list of installed trackers."""
    from accelerate.tracking import get_available_trackers

    if report_to == "none":
        return None
    if report_to == "all":
        return "all"
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise UsageError(f"--report_to {name!r}: unknown tracker (choose from none, all, {', '.join(TRACKER_PACKAGES)})")
        if name not in available:
            raise UsageError(f"--report_to {name}: the package is not installed: pip install {TRACKER_PACKAGES[name]}")
    return names


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import InitProcessGroupKwargs

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # A multi-process launch on a machine without GPUs must use gloo on the CPU;
    # otherwise every process would train alone, believing it is the only one.
    cpu = world_size > 1 and not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_XLA") is None
    mixed_precision = cfg.mixed_precision
    if mixed_precision is None and "1" in (os.environ.get("XLA_USE_BF16"), os.environ.get("XLA_DOWNCAST_BF16")):
        # accelerate's TPU launcher hands a config's bf16 on only as these variables, which torch_xla 2.6+ ignores.
        mixed_precision = "bf16"
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        log_with=_trackers(cfg.report_to),
        project_dir=cfg.output_dir,
        # The schedule counts optimizer steps, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # A peer that stops answering (a machine lost without a connection reset) fails the next collective
        # after this long instead of the backend default; a peer that crashed fails it at once.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.ddp_timeout))],
    )
    # XLA's launcher (xmp.spawn) starts its processes without WORLD_SIZE.
    if accelerator.num_processes != world_size and not is_xla(accelerator.device):
        raise UsageError(
            f"the launcher started {world_size} processes but accelerate sees {accelerator.num_processes}: "
            "on a machine without GPUs launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N"
        )
    return accelerator


def _versions() -> Dict[str, str]:
    import accelerate
    import datasets
    import timm

    return dict(python=platform.python_version(), torch=torch.__version__, accelerate=accelerate.__version__,
                datasets=datasets.__version__, timm=timm.__version__)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl on the main process, mirrored to accelerate's trackers."""

    def __init__(self, accelerator, path: str, append: bool):
        self.accelerator = accelerator
        self.file = open(path, "a" if append else "w") if accelerator.is_main_process else None

    def write(self, row: Dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(scalars, step=row["step"])

    def close(self):
        if self.file is not None:
            self.file.close()


# Order of the statistics in the one flat tensor that is all-reduced at logging steps.
SUMMED = ("loss", "loss_x", "loss_u", "mask_count", "num_unlabeled", "pseudo_label_correct")


def _processes_with(accelerator, flag) -> int:
    """How many processes hold a true `flag` (a collective and a host sync: call only where allowed)."""
    count = torch.as_tensor(flag, dtype=torch.float32, device=accelerator.device)
    return int(accelerator.reduce(count, reduction="sum"))


def _all_finite(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process."""
    return _processes_with(accelerator, torch.isfinite(loss.detach())) == accelerator.num_processes


def _any_process(accelerator, stop: StopSignal) -> bool:
    """Whether any process received a stop signal (called only at logging steps)."""
    return _processes_with(accelerator, stop.signum is not None) > 0


def _summarise(sums: Dict[str, torch.Tensor], steps: int, accelerator) -> Dict:
    """All-reduce the window's sums and turn them into one log row (the host sync of a logging step)."""
    flat = torch.cat([torch.stack([sums[k] for k in (*SUMMED, "bad_images")]), sums["mask_per_class"]])
    flat = accelerator.reduce(flat, reduction="sum").tolist()
    loss, loss_x, loss_u, masked, unlabeled, correct, bad = flat[: len(SUMMED) + 1]
    n = steps * accelerator.num_processes
    return dict(
        loss=loss / n, loss_x=loss_x / n, loss_u=loss_u / n,
        mask_ratio=masked / max(unlabeled, 1.0),
        pseudo_label_acc=correct / masked if masked else None,  # no confident image in the window: no accuracy
        mask_per_class=[int(c) for c in flat[len(SUMMED) + 1:]],
        bad_images=int(bad),
    )


def check_bad_images(count: int, read: int, example, max_fraction: float) -> None:
    """Stop when more than --max_bad_image_fraction of the images read could not be decoded.

    `example` names one of them: a string, or a function called only when stopping (naming
    a stream's image means reading its shard again).
    """
    if count > max_fraction * max(read, 1):
        raise UsageError(f"{count} of {read} images read could not be decoded ({count / max(read, 1):.2%} > "
                         f"--max_bad_image_fraction {max_fraction}), e.g. {example() if callable(example) else example}")


def num_workers(cfg: TrainConfig) -> int:
    return min(cfg.dataloader_num_workers, os.cpu_count() or 1)


def build_loaders(cfg: TrainConfig, data, labeled_idx: List[int], labeled_rows, size: int, pad: int,
                  augment_device: str, accelerator, cache=None):
    """Labeled (B), unlabeled (mu*B) and eval loaders; the DataLoaders among them are for accelerate to prepare.

    Items are (uint8 views..., label, row). On the CPU path the workers make the
    weak / strong views; on the accelerator path they only decode, or, with `cache`
    ((train images, labels, usable rows), (eval images, labels, usable rows)), only
    index. A stream (--streaming) is split by node here and is not prepared.
    """
    B, U = cfg.per_device_train_batch_size, cfg.mu * cfg.per_device_train_batch_size
    world, device = accelerator.num_processes, accelerator.device
    columns = (data.image_column, data.label_column)
    workers = num_workers(cfg)
    pin_memory = device.type == "cuda"
    excluded = set(labeled_idx) if cfg.unlabeled_excludes_labeled else set()
    if len(excluded) >= data.num_train:
        raise UsageError(f"--unlabeled_excludes_labeled: all {data.num_train} train examples are labeled, which leaves "
                         "no unlabeled data (lower --num_labeled or leave the flag out)")
    if cache is not None:
        # Decoded in memory: a batch is one tensor index, no workers, no per-sample collate.
        (train_images, train_labels, train_ok), (eval_images, eval_labels, eval_ok) = cache
        loader = partial(DataLoader, pin_memory=pin_memory, collate_fn=batch_identity)
        labeled_ds = DecodedImages(train_images, train_labels, repeat_to_fill(labeled_idx, B * world))
        unlabeled_ds = DecodedImages(train_images, train_labels,
                                     repeat_to_fill([r for r in train_ok if r not in excluded], U * world))
        eval_ds = DecodedImages(eval_images, eval_labels, eval_ok)
    else:
        if augment_device == "cpu":
            weak = augment.weak_transform(size, hflip=cfg.hflip, pad=pad)
            strong = augment.strong_transform(size, cfg.strong_augment, hflip=cfg.hflip, pad=pad)
            labeled_views, unlabeled_views = [weak], [weak, strong]
            labeled_seeds, unlabeled_seeds = SampleSeeds(cfg.seed, 0), SampleSeeds(cfg.seed, 1)
        else:
            labeled_views, unlabeled_views = [], []
            labeled_seeds = unlabeled_seeds = None
        local = repeat_to_fill(list(range(len(labeled_idx))), B * world)
        labeled_ds = ImageDataset(labeled_rows, local, *columns, size, labeled_views, ids=[labeled_idx[i] for i in local],
                                  seeds=labeled_seeds)
        loader = partial(DataLoader, num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                         collate_fn=collate_fillers)
        if data.streaming:
            from datasets.distributed import split_dataset_by_node

            rank = accelerator.process_index
            stream, counts = unlabeled_stream(data.train, data.shard_sizes, data.num_train, world=world, rank=rank,
                                              workers=workers, seed=cfg.seed, buffer_size=cfg.shuffle_buffer_size,
                                              exclude=excluded)
            per_pass = batches_per_pass(counts, world, workers, U)
            if per_pass < 1:
                raise UsageError(f"--streaming: {sum(counts)} unlabeled examples over {world} process(es) and "
                                 f"{max(1, workers)} worker(s) each do not fill one batch of {U} "
                                 "(lower --per_device_train_batch_size, --mu or --dataloader_num_workers)")
            unlabeled = StreamLoader(loader(StreamImages(stream, *columns, size, unlabeled_views, data.label_map,
                                                         unlabeled_seeds),
                                            batch_size=U, drop_last=True), device, per_pass)
            eval_stream = StreamImages(split_dataset_by_node(data.eval, rank=rank, world_size=world), *columns, size,
                                       label_map=data.label_map)
            # datasets reads each shard in one worker: more workers than this process's shards would sit idle.
            n = data.eval.n_shards
            eval_workers = min(workers, n // world if n % world == 0 else n)
            eval_collate = collate_fillers
            if is_xla(device):  # full batches only: a short last batch would be a new graph to compile
                eval_collate = partial(padded_collate, collate_fillers, cfg.per_device_eval_batch_size)
            evaluation = StreamLoader(loader(eval_stream, batch_size=cfg.per_device_eval_batch_size,
                                             num_workers=eval_workers, persistent_workers=eval_workers > 0,
                                             collate_fn=eval_collate), device)
            return loader(labeled_ds, batch_size=B, shuffle=True, drop_last=True), unlabeled, evaluation
        unlabeled_rows = repeat_to_fill([r for r in range(data.num_train) if r not in excluded], U * world)
        unlabeled_ds = ImageDataset(data.train, unlabeled_rows, *columns, size, unlabeled_views, seeds=unlabeled_seeds)
        eval_ds = ImageDataset(data.eval, range(len(data.eval_labels)), *columns, size)
    if is_xla(device):  # every batch of every process full and distinct: one shape, evaluated as `sharded`
        eval_ds = PaddedToMultiple(eval_ds, cfg.per_device_eval_batch_size * world)
    return (loader(labeled_ds, batch_size=B, shuffle=True, drop_last=True),
            loader(unlabeled_ds, batch_size=U, shuffle=True, drop_last=True),
            loader(eval_ds, batch_size=cfg.per_device_eval_batch_size, shuffle=False))


def train(cfg: TrainConfig, sources: Optional[Dict[str, str]] = None) -> Dict:
    """Run FixMatch as configured; return the final evaluation."""
    from accelerate.utils import set_seed

    try:
        augment.parse_strong_augment(cfg.strong_augment)  # fail before any data is read
    except ValueError as e:
        raise UsageError(str(e)) from None
    resume_path = _resolve_resume(cfg)
    replacing = _check_output_dir(cfg, resume_path)
    if resume_path is not None and (saved_step := _saved_step(resume_path)) > cfg.max_train_steps:  # before any data
        raise UsageError(f"--resume_from_checkpoint {resume_path!r} is at step {saved_step}, past "
                         f"--max_train_steps {cfg.max_train_steps}")
    saved_split = resume_path and os.path.join(resume_path, "labeled_split.json")
    if saved_split and cfg.labeled_split_file is None:
        if not os.path.exists(saved_split):  # never a silent redraw from today's flags
            raise UsageError(f"--resume_from_checkpoint {resume_path!r}: it has no labeled_split.json, so the run's "
                             "labeled examples are unknown; name them with --labeled_split_file")
        # A resumed run trains on the labels it started with, whatever --seed or --num_labeled say now.
        cfg = dataclasses.replace(cfg, labeled_split_file=saved_split)
        sources = dict(sources or {}, labeled_split_file="checkpoint")
    accelerator = _make_accelerator(cfg)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # accelerate would run fp32
        raise UsageError("--mixed_precision fp16 does not run on a CPU (accelerate trains in fp32 there); "
                         "use bf16 or no")
    if cfg.compile and is_xla(accelerator.device):
        raise UsageError("--compile (torch.compile) is not for XLA devices: there every training step is already "
                         "traced and compiled as one graph; leave it out")
    is_main = accelerator.is_main_process
    bar_on = is_main and sys.stderr.isatty()  # progress bars on a terminal; plain lines in logs
    set_seed(cfg.seed)
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output_dir {cfg.output_dir!r}: cannot create it ({e.strerror})") from None

    # ---- Data: splits, labeled subset, image size, normalisation.
    with accelerator.main_process_first():
        data = load_data(cfg, show_progress=bar_on)
    from_checkpoint = saved_split and cfg.labeled_split_file == saved_split
    split_source = f"--resume_from_checkpoint {resume_path!r}: its labeled_split.json" if from_checkpoint else None
    labeled_idx, labeled_rows, bad_labeled = labeled_examples(cfg, data, labeled_split(cfg, data, split_source))
    if from_checkpoint and (sources or {}).get("num_labeled") not in (None, "default", "demo") \
            and cfg.num_labeled != len(labeled_idx):
        accelerator.print(f"note: --num_labeled {cfg.num_labeled} does not apply: a resumed run keeps the "
                          f"{len(labeled_idx)} labeled examples of its checkpoint")
    if is_main:
        if replacing:  # only now: --labeled_split_file may have named the previous run's split
            accelerator.print(f"--overwrite_output_dir: the previous run's files are now in "
                              f"{set_aside_previous_run(cfg.output_dir)}")
        save_labeled_split(os.path.join(cfg.output_dir, "labeled_split.json"), labeled_idx, cfg, data)
    # Image size and channel statistics from a seeded sample (a stream: its labeled examples).
    stats_source, rows = ((labeled_rows, range(len(labeled_rows))) if data.streaming
                          else (data.train, stats_rows(data.num_train, cfg.seed)))
    size = cfg.image_size or default_image_size(image_sizes(stats_source, data.image_column, rows))
    pad = cfg.crop_padding if cfg.crop_padding is not None else max(1, size // 8)
    if pad >= size:
        raise UsageError(f"--crop_padding {pad} must be smaller than the image side ({size} px)")
    mean, std = channel_stats(stats_source, data.image_column, size, rows)
    device = accelerator.device
    augment_device = cfg.augment_device or ("cpu" if device.type == "cpu" else "accelerator")

    B, U = cfg.per_device_train_batch_size, cfg.mu * cfg.per_device_train_batch_size
    world = accelerator.num_processes
    # Unreadable images: [(row, name, reason)] found before training, and how many images were read to find them.
    bad_images = [(i, name, reason) for i, name, reason in bad_labeled]
    images_checked = len(labeled_idx) + len(bad_labeled)
    cache_decoded = cfg.cache_decoded
    if cache_decoded is None:
        cache_decoded = (augment_device == "accelerator" and not data.streaming
                         and data.num_train * 3 * size * size < CACHE_LIMIT_BYTES)
    elif cache_decoded and augment_device == "cpu":
        raise UsageError("--cache_decoded needs --augment_device accelerator (the CPU path augments PIL images)")
    cache, bad_eval = None, []  # bad_eval: unreadable eval images found while decoding, left out of every evaluation
    if cache_decoded:
        cache = []
        for split in (data.train, data.eval):
            images, labels, bad = decode_split(split, data.image_column, data.label_column, size, num_workers(cfg),
                                               show_progress=bar_on)
            named = [(r, image_name(split[r][data.image_column], r), "cannot be decoded") for r in bad]
            if split is data.train:  # only training reads count towards --max_bad_image_fraction
                bad_images += named
                images_checked += len(labels)
            else:
                bad_eval = named
            cache.append((images, labels, sorted(set(range(len(labels))) - set(bad))))
        if bad_eval:
            accelerator.print(f"evaluation leaves out {len(bad_eval)} unreadable image(s), e.g. {bad_eval[0][1]}")
    if bad_images:
        row, name, reason = bad_images[0]
        check_bad_images(len(bad_images), images_checked, f"{name}: {reason}", cfg.max_bad_image_fraction)
        accelerator.print(f"skipped {len(bad_images)} unreadable image(s) of {images_checked} read, e.g. {name}: {reason}")
    loaders = build_loaders(cfg, data, labeled_idx, labeled_rows, size, pad, augment_device, accelerator, cache=cache)

    # ---- Model, optimizer, schedule, EMA.
    channels_last = cfg.channels_last if cfg.channels_last is not None else default_channels_last(device)
    model = create_model(cfg.model, data.num_classes)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # fused: one CUDA kernel for the whole update; elsewhere the foreach default.
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                momentum=cfg.momentum, nesterov=True, fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(cosine_lr_factor, total_steps=cfg.max_train_steps))
    # Streams are split by node already; accelerate prepares (shards, places) the DataLoaders.
    model, optimizer, scheduler, *prepared = accelerator.prepare(
        model, optimizer, scheduler, *(lo for lo in loaders if not isinstance(lo, StreamLoader)))
    prepared = iter(prepared)
    labeled_loader, unlabeled_loader, eval_loader = (
        lo if isinstance(lo, StreamLoader) else next(prepared) for lo in loaders)
    if is_xla(device):
        for lo in (labeled_loader, unlabeled_loader, eval_loader):
            give_loader_dataset(lo)
        accelerator.register_load_state_pre_hook(load_models_on_host)
    live_model = accelerator.unwrap_model(model)
    ema = ModelEMA(live_model, cfg.ema_decay)
    ema.module.to(device)  # the EMA copy is never prepared: it is evaluated and saved as it is
    state = TrainState()
    state.layout = dict(processes=world, **({"workers": num_workers(cfg)} if data.streaming else {}))
    # XLA has no torch.Generator: draw the (small) augmentation parameters on the host, the same numbers as a
    # CPU run, and copy them to the device with the batch; the pixel work stays on the device.
    generator = torch.Generator(device="cpu" if device.type == "xla" else device).manual_seed(
        cfg.seed * 1_000_003 + accelerator.process_index)
    if resume_path is not None:
        load_checkpoint(accelerator, resume_path, state, ema, generator)
        accelerator.print(f"resumed from {resume_path} at step {state.step}"
                          + (", labeled split from the checkpoint" if from_checkpoint else ""))
    checkpoint = partial(save_checkpoint, accelerator, cfg.output_dir, state, ema, generator,
                         total_limit=cfg.checkpoints_total_limit)

    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    loss_kwargs = dict(mean=mean_t, std=std_t, channels_last=channels_last, threshold=cfg.threshold,
                       temperature=cfg.temperature, lambda_u=cfg.lambda_u)

    # The views of one step and the function they feed, chosen once here rather than branched on in the loop.
    core = partial(forward_loss, model, **loss_kwargs)
    if augment_device == "cpu":
        def views(batch_x, batch_u):
            (x, y, _), (u_w, u_s, u_y, rows) = batch_x, batch_u
            return x, y, u_w, u_s, u_y, rows
    else:
        in_graph = strong_view_in_step(device)
        if in_graph:
            core = partial(strong_forward_loss, model, strong_config=cfg.strong_augment, **loss_kwargs)

        def views(batch_x, batch_u):
            (x, y, _), (u, u_y, rows) = batch_x, batch_u
            x = augment.weak_batch(x, hflip=cfg.hflip, pad=pad, generator=generator)
            u_w, strong = unlabeled_batch_views(u, cfg.strong_augment, in_graph=in_graph, generator=generator,
                                                hflip=cfg.hflip, pad=pad)
            return x, y, u_w, strong, u_y, rows
    if cfg.compile:
        compiled = torch.compile(core, mode=cfg.compile_mode)
        core = compiled
        if cfg.compile_mode == "reduce-overhead":
            def core(*args):
                torch.compiler.cudagraph_mark_step_begin()  # a new step: earlier graph outputs may be reused
                return compiled(*args)

    eval_inputs = partial(model_inputs, mean=mean_t, std=std_t, channels_last=channels_last)

    # ---- What the run leaves: config.json (timm-style model keys + every setting), metrics.jsonl.
    if is_main:
        _write_json(os.path.join(cfg.output_dir, "config.json"), dict(
            architecture=cfg.model,
            num_classes=data.num_classes,
            label_names=data.class_names,
            # interpolation / crop: timm's eval transform then resizes exactly as training did (bilinear, whole image).
            pretrained_cfg=dict(input_size=[3, size, size], mean=mean, std=std, num_classes=data.num_classes,
                                interpolation="bilinear", crop_pct=1.0, crop_mode="squash"),
            settings=cfg.to_dict(),
            setting_sources=sources or {},
            resolved=dict(image_size=size, crop_padding=pad, augment_device=augment_device,
                          cache_decoded=cache is not None, channels_last=channels_last, eval_split=data.eval_split,
                          image_column=data.image_column, label_column=data.label_column,
                          num_train=data.num_train, num_eval=len(data.eval_labels), num_labeled=len(labeled_idx),
                          streaming=data.streaming),
            world_size=world,
            # torchrun's count of machines (its agents); else (mpirun) processes in all / processes on this machine.
            num_machines=int(os.environ.get("GROUP_WORLD_SIZE")
                             or world // int(os.environ.get("LOCAL_WORLD_SIZE", world))),
            global_batch=dict(labeled=B * world, unlabeled=U * world),
            mixed_precision=accelerator.mixed_precision,
            device=str(device),
            versions=_versions(),
        ))
    if cfg.report_to != "none":
        accelerator.init_trackers("fixmatch", config={k: v for k, v in cfg.to_dict().items() if v is not None})
    metrics = MetricsLog(accelerator, os.path.join(cfg.output_dir, "metrics.jsonl"), append=resume_path is not None)
    # On XLA: compile and CPU-fallback counts at each logging step, so a TPU run can be checked for recompiles.
    xla_metrics = (XlaMetricsLog(os.path.join(cfg.output_dir, "xla_metrics.json"),
                                 resume_step=state.step if resume_path is not None else None)
                   if is_xla(device) and is_main else None)
    start_step = state.step
    top_k = f"top-{min(5, data.num_classes)}"  # what "top5" measures with fewer than five classes

    labeled_iter = endless(labeled_loader, "labeled", state, accelerator)
    unlabeled_iter = endless(unlabeled_loader, "unlabeled", state, accelerator)

    def run_eval(step: int) -> Dict:
        ema_from_main_process(accelerator, ema)
        result = evaluate(ema.module, eval_loader, accelerator, eval_inputs, data.num_classes, show_progress=bar_on,
                          sharded=isinstance(eval_loader, StreamLoader) or is_xla(device))
        result["skipped_images"] += len(bad_eval)  # the decoded cache left them out before the loader
        metrics.write(dict(step=step, top1=result["top1"], top5=result["top5"], per_class=result["per_class"],
                           # not "skipped_images": trackers would mix it up with the training rows' count
                           num_eval=result["num_eval"], eval_skipped_images=result["skipped_images"]))
        return result

    def report_bad(row: int, read: int) -> None:
        """Name one unreadable image of the window; stop when too many of those read were bad."""
        total = len(bad_images) + state.bad_images
        if data.streaming:
            example = f"position {row} of the {cfg.train_split!r} stream"

            def named():  # its file: the shard read again, only when stopping
                return image_name(fetch_rows(data.train, data.shard_sizes, [row])[0][data.image_column], row)
        else:
            example = named = image_name(data.train[row][data.image_column], row)
        check_bad_images(total, images_checked + read, named, cfg.max_bad_image_fraction)
        accelerator.print(f"skipped {total} unreadable image(s) so far, e.g. {example}")

    def safe_to_save() -> bool:
        """Finite losses since the last log and finite weights now (a host sync: only when saving)."""
        flags = [torch.isfinite(t).all() for t in live_model.state_dict().values() if t.is_floating_point()]
        if "loss" in sums:
            flags.append(torch.isfinite(sums["loss"]))
        return bool(torch.stack(flags).all())

    def nonfinite(step: int) -> Stopped:
        good = latest_checkpoint(cfg.output_dir)
        return Stopped(f"the loss or the weights are not finite at step {step} (checked since step {step - window_steps}); "
                       f"stopped without saving. Last good checkpoint: {good or 'none'}. "
                       "Try a lower --learning_rate" + (" or --mixed_precision bf16 instead of fp16"
                                                         if accelerator.mixed_precision == "fp16" else "") + ".", 1)

    def zero_sums() -> Dict[str, torch.Tensor]:
        """A logging window's running sums, at zero: every step then adds, so every step is the same graph."""
        sums = {k: torch.zeros((), device=device) for k in SUMMED}
        sums.update(mask_per_class=torch.zeros(data.num_classes, device=device),
                    bad_images=torch.zeros((), dtype=torch.long, device=device),
                    bad_row=torch.full((), -1, dtype=torch.long, device=device))  # below any bad row's -row-1 >= 0
        if is_xla(device):  # made now, so the next step's graph finds them as inputs, not as constants
            xla_sync()
        return sums

    stop = StopSignal()
    bar = tqdm(total=cfg.max_train_steps, initial=state.step, desc="fixmatch", disable=not bar_on,
               dynamic_ncols=True)
    sums = zero_sums()
    window_steps, window_start = 0, time.perf_counter()
    paused = 0.0  # seconds of the window spent evaluating and checkpointing: not training throughput
    model.train()
    try:
        while state.step < cfg.max_train_steps:
            # Batch: B labeled and mu*B unlabeled images (uint8), weak and strong views.
            x, y, u_w, strong, u_y, rows = views(next(labeled_iter), next(unlabeled_iter))
            # Unreadable images the loaders replaced have negative rows: counted on the device.
            bad, bad_row = (rows < 0).sum(), (-rows - 1).max()
            sums["bad_images"] = sums["bad_images"] + bad
            sums["bad_row"] = torch.maximum(sums["bad_row"], bad_row)
            # Forward and loss: one pass over all three views, so BatchNorm sees the whole batch.
            loss, stats = core(x, y, u_w, strong, u_y)
            # Only on request: a host sync (and, with several processes, a collective) every step.
            finite = not cfg.skip_nonfinite_steps or _all_finite(accelerator, loss)
            # Backward, optimizer step, schedule, EMA. A skipped step still advances the schedule.
            if finite:
                accelerator.backward(loss)
                optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the rate this step used (a Python float, no sync)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if finite:
                ema.update(live_model, state.step)
                # Statistics stay on the device until a logging step.
                for k in (*SUMMED, "mask_per_class"):
                    sums[k] = sums[k] + stats[k]
                window_steps += 1
            else:
                state.skipped += 1
            state.step += 1
            bar.update(1)
            step = state.step
            if is_xla(device):  # one graph per training step, launched here, before a logging step reads values
                xla_sync()

            # A signal stops a single process at once (its window logged first); several processes agree at a
            # logging step.
            signalled = world == 1 and stop.signum is not None
            logging = step % cfg.logging_steps == 0 or step == cfg.max_train_steps or signalled
            if logging and window_steps:
                row = _summarise(sums, window_steps, accelerator)  # host sync: once per logging step
                if not math.isfinite(row["loss"]):
                    raise nonfinite(step)
                if row["bad_images"]:
                    state.bad_images += row["bad_images"]
                    report_bad(int(accelerator.gather(sums["bad_row"].view(1)).max()), step * (B + U) * world)
                elapsed = time.perf_counter() - window_start - paused
                row = dict(step=step, lr=lr,
                           images_per_s=(B + U) * world * window_steps / max(elapsed, 1e-9),
                           labeled_seen=step * B * world, unlabeled_seen=step * U * world,
                           skipped_steps=state.skipped, skipped_images=len(bad_images) + state.bad_images,
                           **{k: v for k, v in row.items() if k != "bad_images"})
                metrics.write(row)
                pl_acc = "-" if row["pseudo_label_acc"] is None else f"{row['pseudo_label_acc']:.3f}"
                if bar_on:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", mask=f"{row['mask_ratio']:.2f}", pl_acc=pl_acc,
                                    img_s=f"{row['images_per_s']:.0f}")
                else:
                    accelerator.print(f"step {step}/{cfg.max_train_steps} loss {row['loss']:.4f} "
                                      f"loss_u {row['loss_u']:.4f} mask {row['mask_ratio']:.3f} "
                                      f"pl_acc {pl_acc} lr {row['lr']:.5f} "
                                      f"img/s {row['images_per_s']:.0f}", flush=True)
                sums, window_steps, window_start, paused = zero_sums(), 0, time.perf_counter(), 0.0
                if xla_metrics is not None:  # after the window's reset, so the row holds all of this step's graphs
                    xla_metrics.write(step, since_step=start_step)
            stopping = signalled if world == 1 else logging and _any_process(accelerator, stop)
            pause_start = None  # evaluating and checkpointing run off the window's clock
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step != cfg.max_train_steps and not stopping:
                sync_device(device)  # the queued training work finishes on the clock
                pause_start = time.perf_counter()
                result = run_eval(step)
                accelerator.print(f"step {step}: EMA top-1 {result['top1']:.2f}  {top_k} {result['top5']:.2f}")
            if (cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0) or stopping:
                if not safe_to_save():  # a host sync: the queued training work is done
                    raise nonfinite(step)
                pause_start = pause_start or time.perf_counter()
                path = checkpoint()
            if pause_start is not None:
                paused += time.perf_counter() - pause_start
            if stopping:
                name = signal.Signals(stop.signum).name if stop.signum else "a signal on another process"
                raise Stopped(f"stopped by {name} after step {step}; checkpoint {path}; "
                              "continue with --resume_from_checkpoint latest",
                              0 if stop.signum in (None, signal.SIGTERM) else 128 + stop.signum)
    finally:
        stop.restore()
        bar.close()

    # ---- End: final evaluation, final checkpoint, the EMA model.
    if not safe_to_save():
        raise nonfinite(state.step)
    result = run_eval(state.step)
    if cfg.checkpointing_steps and state.step % cfg.checkpointing_steps:
        checkpoint()
    accelerator.wait_for_everyone()
    # model.safetensors, main process only. accelerate's safetensors path reads host pointers: on XLA the
    # (finished) EMA model moves to the host first.
    accelerator.save_model(ema.module.cpu() if is_xla(device) else ema.module, cfg.output_dir)
    if xla_metrics is not None:  # the whole run's counts: the last evaluation and checkpoint included
        xla_metrics.write(state.step, since_step=start_step, end=True)
    if is_main:
        _write_json(os.path.join(cfg.output_dir, "eval_results.json"),
                    dict(result, step=state.step, eval_split=data.eval_split,
                         per_class=dict(zip(data.class_names, result["per_class"])),
                         skipped_train_images=len(bad_images) + state.bad_images))
        from .plot import write_plots

        write_plots(cfg.output_dir)  # training_curves.png, per_class.png
    metrics.close()
    accelerator.end_training()
    accelerator.print(f"final EMA model: top-1 {result['top1']:.2f}%  {top_k} {result['top5']:.2f}% "
                      f"on {result['num_eval']} {data.eval_split} images -> {cfg.output_dir}")
    accelerator.print("per class top-1: " + ", ".join(
        f"{name} {'-' if acc is None else f'{acc:.1f}'}" for name, acc in zip(data.class_names, result["per_class"])))
    if len(bad_images) + state.bad_images + result["skipped_images"]:
        accelerator.print(f"skipped unreadable images: {len(bad_images) + state.bad_images} training reads, "
                          f"{result['skipped_images']} of the final evaluation's images")
    return result
