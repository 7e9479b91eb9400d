"""What a run reports: config.json, metrics.jsonl rows (all-reduced windows), the console line or bar, trackers."""

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
from typing import Dict, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .checkpoint import write_json
from .data.rows import unreadable_mask, unreadable_source_row
from .errors import UsageError
from .launch import num_machines, sync_device
from .xla import XlaMetricsLog, is_xla
from .xla import sync as xla_sync

# The package to install for each accelerate tracker (accelerate itself only warns and logs nothing).
TRACKER_PACKAGES = dict(tensorboard="tensorboard (or tensorboardX)", wandb="wandb", mlflow="mlflow",
                        comet_ml="comet_ml", aim="aim", clearml="clearml", dvclive="dvclive", swanlab="swanlab",
                        trackio="trackio")

# Statistics a row reports as their total over the window and all processes; every other one a step reports is
# averaged over the steps that reported it and all processes. mask_ratio and pseudo_label_acc are derived from the
# totals (a ratio of sums, not a mean of per-step ratios), so the steps' own values are not collected.
TOTALS = ("mask_count", "num_unlabeled", "pseudo_label_correct", "pseudo_label_known", "mask_per_class", "bad_images")
DERIVED = ("mask_ratio", "pseudo_label_acc")


def trackers(report_to: str):
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
            raise UsageError(f"--report_to {name!r}: unknown tracker "
                             f"(choose from none, all, {', '.join(TRACKER_PACKAGES)})")
        if name not in available:
            raise UsageError(f"--report_to {name}: the package is not installed: pip install {TRACKER_PACKAGES[name]}")
    return names


def versions() -> Dict[str, str]:
    import accelerate
    import datasets
    import timm

    return dict(python=platform.python_version(), torch=torch.__version__, accelerate=accelerate.__version__,
                datasets=datasets.__version__, timm=timm.__version__)


def pretrained_weights(cfg) -> Optional[Dict]:
    """What a run started from: None (random init), timm's weights for --model, or a file and its sha256 (null when
    a resumed run's file is gone: its weights came from the checkpoint)."""
    if cfg.pretrained_file is not None:
        digest = None
        if os.path.isfile(cfg.pretrained_file):
            sha = hashlib.sha256()
            with open(cfg.pretrained_file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            digest = sha.hexdigest()
        return dict(file=os.path.abspath(cfg.pretrained_file), sha256=digest)
    return dict(timm=cfg.model) if cfg.pretrained else None


def write_run_config(cfg, sources: Dict[str, str], accelerator, *, data, resolved, mean, std, num_labeled: int,
                     model_args: Dict) -> None:
    """config.json: timm-style model keys (so timm and fixmatch-predict prepare images alike) and every setting."""
    world = accelerator.num_processes
    B, U = cfg.per_device_train_batch_size, cfg.mu * cfg.per_device_train_batch_size
    size = resolved.image_size
    write_json(os.path.join(cfg.output_dir, "config.json"), dict(
        architecture=cfg.model,
        num_classes=data.num_classes,
        label_names=data.class_names,
        model_args=model_args,
        # interpolation / crop: timm's eval transform then resizes as training did (the shorter side to the size,
        # the centre square). mean / std: the dataset's, or with --pretrained the model's own.
        pretrained_cfg=dict(input_size=[3, size, size], mean=mean, std=std, num_classes=data.num_classes,
                            interpolation=resolved.interpolation, crop_pct=1.0, crop_mode="center"),
        pretrained_weights=pretrained_weights(cfg),
        settings=cfg.to_dict(),
        setting_sources=sources,
        resolved=dict(image_size=size, image_size_reason=resolved.size_reason, load_size=resolved.load_size,
                      interpolation=resolved.interpolation,
                      normalization=resolved.normalization,
                      crop_padding=resolved.crop_padding, augment_device=resolved.augment_device,
                      cache_decoded=resolved.cache_decoded, channels_last=resolved.channels_last,
                      eval_split=data.eval_split, image_column=data.image_column, label_column=data.label_column,
                      num_train=data.num_train, num_eval=len(data.eval_labels), num_labeled=num_labeled,
                      streaming=data.streaming, unlabeled=data.unlabeled.record()),
        world_size=world,
        num_machines=num_machines(world),
        # per optimizer step: B and mu*B on every process, --gradient_accumulation_steps times
        global_batch=dict(labeled=B * world * cfg.gradient_accumulation_steps,
                          unlabeled=U * world * cfg.gradient_accumulation_steps),
        mixed_precision=accelerator.mixed_precision,
        device=str(accelerator.device),
        versions=versions(),
    ))


def last_logged_step(output_dir: str) -> Optional[int]:
    """The last step metrics.jsonl logged a training row for (None: no such row); a line cut short is skipped."""
    last = None
    try:
        with open(os.path.join(output_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "loss" in row and isinstance(row.get("step"), int):
                    last = row["step"]
    except OSError:
        return None
    return last


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


class Window:
    """A logging window's running sums by name, on the device: every step adds, so every step is the same graph.

    The names are those the steps report (learnt from the run's first step and kept by `reset`), plus
    bad_images and bad_row from the batch's rows; a new statistic is a new key where it is computed.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: Dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.counts = {k: 0 for k in self.sums}  # how many steps reported each statistic
        self.sums = {k: torch.zeros_like(v) for k, v in self.sums.items()}
        self.sums.update(bad_images=torch.zeros((), dtype=torch.long, device=self.device),
                         bad_row=torch.full((), -1, dtype=torch.long, device=self.device))  # below any bad row
        if is_xla(self.device):  # made now, so the next step's graph finds them as inputs, not as constants
            xla_sync()

    def add(self, stats: Optional[Dict[str, torch.Tensor]], rows: torch.Tensor) -> None:
        """One step's statistics (None for a skipped step) and its unlabeled rows (negative: replaced images)."""
        s = self.sums
        s["bad_images"] = s["bad_images"] + unreadable_mask(rows).sum()
        s["bad_row"] = torch.maximum(s["bad_row"], unreadable_source_row(rows).max())
        if stats is not None:
            for k, v in stats.items():
                if k not in DERIVED:
                    s[k] = s[k] + v if k in s else v.detach().float().clone()
                    self.counts[k] = self.counts.get(k, 0) + 1
            self.steps += 1

    def summarise(self, accelerator) -> Dict:
        """All-reduce the sums in one collective and turn them into one log row (the host sync of a logging step)."""
        names = sorted(k for k in self.sums if k != "bad_row")
        flat = torch.cat([self.sums[k].float().reshape(-1) for k in names])
        flat = accelerator.reduce(flat, reduction="sum").tolist()
        row, start = {}, 0
        for k in names:
            size = self.sums[k].numel()
            values, start = flat[start:start + size], start + size
            if k not in TOTALS:  # a mean over the steps that reported it, on every process
                n = self.counts.get(k, 0) * accelerator.num_processes
                values = [v / n for v in values] if n else [None] * size
            row[k] = values if self.sums[k].dim() else values[0]
        masked, unlabeled, correct, known = (row.pop(k, 0.0) for k in ("mask_count", "num_unlabeled",
                                                                       "pseudo_label_correct", "pseudo_label_known"))
        row["mask_ratio"] = masked / max(unlabeled, 1.0)
        # over the confident images whose true class is known; none in the window: no accuracy
        row["pseudo_label_acc"] = correct / known if known else None
        row["mask_per_class"] = [int(c) for c in row.get("mask_per_class", [])]
        row["bad_images"] = int(row["bad_images"])
        return row


def _fmt(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class RunLog:
    """metrics.jsonl rows at --logging_steps, the console line (or a bar on a terminal) and xla_metrics.json.

    Training throughput leaves out the time spent in `paused()` (evaluations, checkpoints).
    """

    def __init__(self, accelerator, cfg, state, *, resumed: bool, bad_images, nonfinite,
                 console: Tuple[Tuple[str, str], ...] = (("mask", "mask_ratio"),)):
        self.accelerator, self.cfg, self.state = accelerator, cfg, state
        self.bad_images, self.nonfinite = bad_images, nonfinite
        self.show_bar = accelerator.is_main_process and sys.stderr.isatty()  # plain lines in logs
        self.metrics = MetricsLog(accelerator, os.path.join(cfg.output_dir, "metrics.jsonl"), append=resumed)
        # On XLA: compile and CPU-fallback counts at each logging step, so a TPU run can be checked for recompiles.
        self.xla_metrics = (XlaMetricsLog(os.path.join(cfg.output_dir, "xla_metrics.json"),
                                          resume_step=state.step if resumed else None)
                            if is_xla(accelerator.device) and accelerator.is_main_process else None)
        self.start_step = state.step
        self.bar = tqdm(total=cfg.max_train_steps, initial=state.step, desc="fixmatch", disable=not self.show_bar,
                        dynamic_ncols=True)
        self.window = Window(accelerator.device)
        self.console = console  # (label, metrics key) pairs shown after loss_u: the algorithm's own figures
        self.window_start, self.paused_s = time.perf_counter(), 0.0
        # Images drawn a (micro-)batch over all processes.
        self.labeled_per_step = cfg.per_device_train_batch_size * accelerator.num_processes
        self.unlabeled_per_step = cfg.mu * self.labeled_per_step
        self.images_per_step = self.labeled_per_step + self.unlabeled_per_step

    def add(self, stats: Optional[Dict[str, torch.Tensor]], rows: torch.Tensor) -> None:
        """One (micro-)batch's statistics (None: skipped); they stay on the device until a logging step."""
        self.window.add(stats, rows)
        self.bad_images.note(rows)
        self.state.labeled_seen += self.labeled_per_step
        self.state.unlabeled_seen += self.unlabeled_per_step
        if stats is None:
            self.state.skipped += 1

    def stepped(self) -> None:
        """An optimizer step is done."""
        self.bar.update(1)
        if is_xla(self.accelerator.device):  # one graph per training step, launched before a logging step reads it
            xla_sync()

    def due(self, step: int) -> bool:
        return step % self.cfg.logging_steps == 0 or step == self.cfg.max_train_steps

    def write(self, step: int, lr: float) -> None:
        """Reduce the window over processes and write its row (the host sync of a logging step)."""
        if not self.window.steps:
            return
        summary = self.window.summarise(self.accelerator)
        if not math.isfinite(summary["loss"]):
            raise self.nonfinite(step, step - self.window.steps)
        if summary["bad_images"]:
            self.state.bad_images += summary["bad_images"]
            bad_row = int(self.accelerator.gather(self.window.sums["bad_row"].view(1)).max())
            self.bad_images.check_training(self.state, bad_row, self.accelerator)
        elapsed = time.perf_counter() - self.window_start - self.paused_s
        row = dict(step=step, lr=lr, images_per_s=self.images_per_step * self.window.steps / max(elapsed, 1e-9),
                   labeled_seen=self.state.labeled_seen, unlabeled_seen=self.state.unlabeled_seen,
                   skipped_steps=self.state.skipped, skipped_images=self.bad_images.total(self.state),
                   **{k: v for k, v in summary.items() if k != "bad_images"})
        self.metrics.write(row)
        self._show(row)
        self.window.reset()
        self.window_start, self.paused_s = time.perf_counter(), 0.0
        if self.xla_metrics is not None:  # after the window's reset, so the row holds all of this step's graphs
            self.xla_metrics.write(step, since_step=self.start_step)

    def _show(self, row: Dict) -> None:
        pl_acc = "-" if row["pseudo_label_acc"] is None else f"{row['pseudo_label_acc']:.3f}"
        figures = {label: row.get(key) for label, key in self.console}
        if self.show_bar:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", **{k: _fmt(v, 2) for k, v in figures.items()},
                                 pl_acc=pl_acc, img_s=f"{row['images_per_s']:.0f}")
        else:
            shown = " ".join(f"{k} {_fmt(v, 3 if k == 'mask' else 4)}" for k, v in figures.items())
            self.accelerator.print(f"step {row['step']}/{self.cfg.max_train_steps} loss {row['loss']:.4f} "
                                   f"loss_u {row['loss_u']:.4f} {shown} "
                                   f"pl_acc {pl_acc} lr {row['lr']:.5f} img/s {row['images_per_s']:.0f}", flush=True)

    @contextlib.contextmanager
    def paused(self):
        """Evaluation and checkpoints run off the window's clock; the queued training work finishes on it."""
        sync_device(self.accelerator.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def restarted(self, count: int, allowed: int, resumed: bool, last_logged: Optional[int]) -> None:
        """Record a restart by torchrun's agent in trainer_state.json (the next checkpoint's), metrics.jsonl and on
        the console. `last_logged`: the step the run had logged before (main process; None elsewhere)."""
        step = self.state.step
        lost = None if last_logged is None else max(0, last_logged - step)
        record = dict(restart=count, max_restarts=allowed, resumed_from=step if resumed else None, lost_steps=lost,
                      time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        self.state.restarts.append(record)
        self.metrics.write(dict(step=step, **record))
        how = f"resumed from step {step}" if resumed else "no complete checkpoint, started again at step 0"
        self.accelerator.print(f"restart {count} of {allowed}: {how}"
                               + ("" if lost is None else f" (lost {lost} step{'' if lost == 1 else 's'})"),
                               flush=True)

    def write_eval(self, step: int, result: Dict) -> None:
        self.metrics.write(dict(step=step, top1=result["top1"], top5=result["top5"], top_k=result["top_k"],
                                per_class=result["per_class"],
                                # not "skipped_images": trackers would mix it up with the training rows' count
                                num_eval=result["num_eval"], eval_skipped_images=result["skipped_images"]))

    def close_bar(self) -> None:
        self.bar.close()

    def finish(self, step: int) -> None:
        if self.xla_metrics is not None:  # the whole run's counts: the last evaluation and checkpoint included
            self.xla_metrics.write(step, since_step=self.start_step, end=True)
        self.metrics.close()
