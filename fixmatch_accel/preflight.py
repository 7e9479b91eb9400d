"""What a run checks before it imports the training stack or reads data: flags that need more than their own value
(the strong augmentation string, the checkpoint to resume and the settings it fixes, the output folder)."""

import dataclasses
import os
from typing import Dict, List, NamedTuple, Optional

from . import augment
from .checkpoint import (
    check_output_dir,
    incomplete_checkpoints,
    reconcile_resume,
    resolve_resume,
    saved_settings,
    saved_step,
)
from .config import (
    UNLABELED_SOURCE_FLAGS,
    TrainConfig,
    optimizer_lr_note,
    pretrained_defaults_note,
    unlabeled_flags,
    unused_settings_note,
)
from .errors import UsageError


class Start(NamedTuple):
    cfg: TrainConfig  # with a resumed run's settings and labeled split
    sources: Dict[str, str]
    resume_path: Optional[str]  # the checkpoint to resume, None for a new run
    replacing: bool  # a previous run in --output_dir is set aside (--overwrite_output_dir)
    split_from_checkpoint: bool
    notes: List[str]  # to print once


def check_start(cfg: TrainConfig, sources: Dict[str, str]) -> Start:
    """What can be refused before any data is read; a resumed run takes its checkpoint's settings and split."""
    notes = [strong_augment_note(cfg.strong_augment), pretrained_defaults_note(cfg, sources),
             optimizer_lr_note(cfg, sources), unused_settings_note(cfg, sources)]
    resume_path = resolve_resume(cfg)
    replacing = check_output_dir(cfg, resume_path)
    if cfg.resume_from_checkpoint in ("auto", "latest"):
        skipped = incomplete_checkpoints(cfg.output_dir)
        if skipped:  # e.g. a process killed while writing it: some process's part is missing
            notes.append(f"note: not resuming from incomplete checkpoint(s): {', '.join(skipped)}")
    if cfg.resume_from_checkpoint == "auto":
        notes.append(f"--resume_from_checkpoint auto: resuming from {resume_path}" if resume_path else
                     f"--resume_from_checkpoint auto: no complete checkpoint in {cfg.output_dir}/checkpoints, "
                     "starting a new run" + (" (the files of its unfinished start are set aside)" if replacing
                                             else ""))
    # A resumed run's weights are its checkpoint's: the pretrained file may be gone by then.
    if resume_path is None and cfg.pretrained_file is not None and not os.path.isfile(cfg.pretrained_file):
        raise UsageError(f"--pretrained_file {cfg.pretrained_file!r}: no such file")
    if resume_path is not None:
        at, saved = saved_step(resume_path), saved_settings(resume_path)
        if saved is not None:
            check_same_unlabeled_source(cfg, sources, resume_path, saved)
            cfg, sources, changed = reconcile_resume(cfg, sources, resume_path, saved, at)
            notes += changed
        if at > cfg.max_train_steps:
            raise UsageError(f"--resume_from_checkpoint {resume_path!r} is at step {at}, past "
                             f"--max_train_steps {cfg.max_train_steps}")
    saved_split = resume_path and os.path.join(resume_path, "labeled_split.json")
    if saved_split and cfg.labeled_split_file is None:
        if not os.path.exists(saved_split):  # never a silent redraw from today's flags
            raise UsageError(f"--resume_from_checkpoint {resume_path!r}: it has no labeled_split.json, so the run's "
                             "labeled examples are unknown; name them with --labeled_split_file")
        # A resumed run trains on the labels it started with, whatever --seed or --num_labeled say now.
        cfg = dataclasses.replace(cfg, labeled_split_file=saved_split)
        sources = dict(sources, labeled_split_file="checkpoint")
    split_from_checkpoint = bool(saved_split) and cfg.labeled_split_file == saved_split
    return Start(cfg, sources, resume_path, replacing, split_from_checkpoint, [n for n in notes if n])


def _unlabeled_source(settings: Dict) -> str:
    given = unlabeled_flags(settings)
    return f"--{given[0]} {settings[given[0]]!r}" if given else f"the train split ({settings.get('train_split')!r})"


def check_same_unlabeled_source(cfg: TrainConfig, sources: Dict[str, str], path: str, saved: Dict) -> None:
    """A resumed run keeps its unlabeled data: its rows are what the data positions and per-example state count.

    Refused when a source is named now that is not the checkpoint's (naming both); with none named,
    the checkpoint's is kept (reconcile_resume takes unset settings from it).
    """
    now = cfg.to_dict()
    named_now = any(sources.get(name, "flag") not in ("default", "demo") for name in UNLABELED_SOURCE_FLAGS)
    if named_now and _unlabeled_source(now) != _unlabeled_source(saved):
        raise UsageError(f"--resume_from_checkpoint {path!r}: its run trained on unlabeled data from "
                         f"{_unlabeled_source(saved)}, this run names {_unlabeled_source(now)}; a resumed run keeps "
                         "its unlabeled data (resume without naming another, or start a new run in another "
                         "--output_dir)")


def strong_augment_note(config: str) -> str:
    """Refuse a malformed --strong_augment; say when timm will clip its magnitude ('' when nothing to say)."""
    try:
        spec = augment.parse_strong_augment(config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if spec.paper or spec.magnitude <= spec.magnitude_max:
        return ""
    return (f"note: --strong_augment {config}: magnitude {spec.magnitude:g} is clipped to {spec.magnitude_max:g} "
            "(timm's maximum without an 'mmax' section)")
