"""Checkpoints and the output folder: atomic save, strict load, which checkpoint to resume, whose folder it is.

Imports no torch at module level: the resume and output-folder checks run before the training stack is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from functools import partial
from typing import TYPE_CHECKING, Dict, List, Optional

from .errors import UsageError, describe

if TYPE_CHECKING:
    import torch

OBJECTIVE_FILE = "objective.safetensors"  # in a checkpoint: the algorithm's statistics
# Files that mark an output_dir as holding a run.
RUN_FILES = ("metrics.jsonl", "checkpoints", "model.safetensors")
# Everything a run (and fixmatch-plot / fixmatch-predict) leaves there: set aside by --overwrite_output_dir.
RUN_OUTPUTS = RUN_FILES + ("config.json", "labeled_split.json", "eval_results.json", "xla_metrics.json",
                           "training_curves.png", "per_class.png", "predictions.csv")


class TrainState:
    """Step counter and data positions, saved in every checkpoint as JSON."""

    def __init__(self):
        self.step = 0
        self.skipped = 0  # non-finite steps skipped with --skip_nonfinite_steps
        self.bad_images = 0  # unreadable images the training loaders replaced (every read)
        self.bad_rows: List[int] = []  # the distinct unlabeled rows among them (the bad-image budget counts these)
        self.labeled_seen = 0  # images drawn, over all processes (true across a change of world size)
        self.unlabeled_seen = 0
        self.positions: Dict[str, List[int]] = {}
        self.layout: Dict[str, int] = {}  # processes and workers: the data order depends on them
        self.settings: Dict = {}  # the run's settings, which a resume compares with its own
        self.objective = None  # the algorithm's state (tensors, the same on every process): objective.safetensors

    def to_json(self) -> Dict:
        return {"step": self.step, "skipped": self.skipped, "bad_images": self.bad_images, "bad_rows": self.bad_rows,
                "labeled_seen": self.labeled_seen, "unlabeled_seen": self.unlabeled_seen,
                "positions": self.positions, "layout": self.layout, "settings": self.settings}

    def load_json(self, saved: Dict) -> Dict[str, int]:
        """Take a checkpoint's state; return the layout it was saved with."""
        self.step = int(saved["step"])
        self.skipped = int(saved.get("skipped", 0))
        self.bad_images = int(saved.get("bad_images", 0))
        self.bad_rows = [int(r) for r in saved.get("bad_rows", [])]
        layout = saved.get("layout", {})
        # Checkpoints written before these counters: every step drew B (and mu*B) images on each process.
        B, mu = (self.settings.get(k) for k in ("per_device_train_batch_size", "mu"))
        drawn = self.step * (B or 0) * layout.get("processes", 1)
        self.labeled_seen = int(saved.get("labeled_seen", drawn))
        self.unlabeled_seen = int(saved.get("unlabeled_seen", drawn * (mu or 0)))
        self.positions = {k: [int(e), int(b)] for k, (e, b) in saved["positions"].items()}
        return layout


def write_json(path: str, obj) -> None:
    """Write whole or not at all (temp file + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def checkpoint_steps(output_dir: str) -> List[int]:
    """Steps of the complete checkpoints, oldest first: only renamed `step_N` folders count, never `.tmp` ones."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", d)))


def latest_checkpoint(output_dir: str) -> Optional[str]:
    steps = checkpoint_steps(output_dir)
    return os.path.join(output_dir, "checkpoints", f"step_{steps[-1]}") if steps else None


def save_checkpoint(accelerator, output_dir: str, state: TrainState, ema, generator: torch.Generator,
                    total_limit: Optional[int] = None) -> str:
    """Write to a temporary folder, then rename, so a kill mid-write never leaves a half checkpoint.

    Besides accelerate's files: trainer_state.json (step, data positions), ema.safetensors,
    objective.safetensors (the algorithm's statistics, when it keeps any) and one
    generator_<rank>.safetensors per process. Nothing is pickled, so loading runs no code
    from the checkpoint (accelerate would unpickle registered objects).
    """
    from safetensors.torch import save_file

    from .algorithms.objective import state_tensors

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
        objective = state_tensors(state.objective)
        if objective:
            save_file({k: v.cpu().contiguous() for k, v in objective.items()}, os.path.join(tmp, OBJECTIVE_FILE))
        write_json(os.path.join(tmp, "trainer_state.json"), state.to_json())
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


def _read_json(file):
    with open(file) as f:
        return json.load(f)


def _read_all(path: str, rank: int, with_objective: bool) -> Dict:
    """Read every file of a checkpoint on its own first, so a missing, truncated or hostile one is named.

    accelerate reports a missing model.safetensors as a missing pytorch_model.bin, and skips
    unreadable RNG states with only an info log; read here with weights_only and accelerate's
    numpy allow-list they are an error, not a silently inexact resume. Returns the files used
    here (trainer state, EMA, generator); accelerate reads the rest again in load_state.
    """
    from accelerate.utils.other import load as weights_only_load
    from safetensors.torch import load_file

    readers = {"trainer_state.json": _read_json, "model.safetensors": load_file, "optimizer.bin":
               partial(weights_only_load, map_location="cpu"), "scheduler.bin": weights_only_load,
               "ema.safetensors": load_file, f"random_states_{rank}.pkl": weights_only_load,
               f"generator_{rank}.safetensors": load_file, **({OBJECTIVE_FILE: load_file} if with_objective else {})}
    missing = [name for name in readers if not os.path.exists(os.path.join(path, name))]
    if missing:
        raise UsageError(f"--resume_from_checkpoint {path!r}: cannot load it (missing {', '.join(missing)})")
    used_here = {"trainer_state.json", "ema.safetensors", f"generator_{rank}.safetensors", OBJECTIVE_FILE}
    loaded = {}
    for name, read in readers.items():
        try:
            value = read(os.path.join(path, name))
            if name in used_here:  # not kept: a second copy of the weights and optimizer state
                loaded[name] = value
        except Exception as e:
            raise UsageError(f"--resume_from_checkpoint {path!r}: cannot read {name} "
                             f"({describe(e, 'empty or truncated')})") from None
    return loaded


def load_checkpoint(accelerator, path: str, state: TrainState, ema, generator: torch.Generator) -> None:
    """Restore a checkpoint written by save_checkpoint; any problem is one clear line."""
    from .algorithms.objective import load_state_tensors, state_tensors

    rank = accelerator.process_index
    with_objective = bool(state_tensors(state.objective))
    loaded = _read_all(path, rank, with_objective)
    try:
        accelerator.load_state(path)  # model, optimizer, scheduler, RNGs: weights_only / safetensors
        ema.module.load_state_dict(loaded["ema.safetensors"])
        generator.set_state(loaded[f"generator_{rank}.safetensors"]["state"])
        if with_objective:
            state.objective = load_state_tensors(state.objective, loaded[OBJECTIVE_FILE])
        saved_layout = state.load_json(loaded["trainer_state.json"])
    except Exception as e:  # another model, a malformed state: the user must know, never a silent restart
        raise UsageError(f"--resume_from_checkpoint {path!r}: cannot load it ({describe(e)})") from None
    changed = [f"{k} {state.layout.get(k)} (was {v})" for k, v in saved_layout.items() if state.layout.get(k) != v]
    if changed:
        accelerator.print(f"warning: resumed with {', '.join(changed)}: the data order from here on is not the "
                          "interrupted run's (the run stays valid, but is not an exact continuation)")


def resolve_resume(cfg) -> Optional[str]:
    """The checkpoint folder --resume_from_checkpoint names (None for a new run), checked to be one."""
    if cfg.resume_from_checkpoint is None:
        return None
    if cfg.resume_from_checkpoint == "auto":
        path = latest_checkpoint(cfg.output_dir)
        if path is None:
            return None
    elif cfg.resume_from_checkpoint == "latest":
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


def saved_settings(path: str) -> Optional[Dict]:
    """The settings of the run that wrote a checkpoint: its trainer_state.json, else (older checkpoints)
    the config.json of its run folder; None when neither says."""
    for file, key in (("trainer_state.json", "settings"), (os.path.join("..", "..", "config.json"), "settings")):
        try:
            settings = _read_json(os.path.join(path, file)).get(key)
        except Exception:
            continue
        if isinstance(settings, dict) and settings:
            return settings
    return None


def saved_step(path: str) -> int:
    """The step a checkpoint was saved at; -1 when unreadable (load_checkpoint then says why)."""
    try:
        return int(_read_json(os.path.join(path, "trainer_state.json"))["step"])
    except Exception:
        return -1


def check_output_dir(cfg, resume_path: Optional[str]) -> bool:
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
            "resume it with --resume_from_checkpoint latest, choose another --output_dir, "
            "or pass --overwrite_output_dir"
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


class Checkpointer:
    """Saves the run every --checkpointing_steps (and when asked), keeping the newest --checkpoints_total_limit."""

    def __init__(self, accelerator, cfg, state: TrainState, ema, generator: torch.Generator):
        self.every = cfg.checkpointing_steps
        self.save = partial(self._save, accelerator, cfg.output_dir, state, ema, generator,
                            total_limit=cfg.checkpoints_total_limit)
        self.output_dir = cfg.output_dir

    @staticmethod
    def _save(*args, **kwargs) -> str:
        return save_checkpoint(*args, **kwargs)  # looked up at each call, so tests can wrap it

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def latest(self) -> Optional[str]:
        return latest_checkpoint(self.output_dir)


# What a resumed run does with a setting given now that differs from its checkpoint's run. A setting not given
# now (a default, or the demo's) is the checkpoint's, silently.
# Refused: the algorithm and alignment whose state it holds, the model and data it trained on, and the batch shape
# its data positions count in.
FIXED_ON_RESUME = ("algorithm", "dist_align", "model", "dataset_name", "dataset_config_name", "train_dir",
                   "validation_dir", "train_split", "train_val_split", "image_column_name", "label_column_name",
                   "max_train_samples", "image_size", "streaming", "unlabeled_excludes_labeled", "unlabeled_split",
                   "unlabeled_dataset_name", "unlabeled_dataset_config_name", "unlabeled_image_column_name",
                   "unlabeled_dir",
                   "per_device_train_batch_size", "mu")
# Kept from the checkpoint, with a note: its optimizer and schedule state hold these, and the seed drew its
# statistics sample, data order and augmentation streams.
KEPT_ON_RESUME = {"learning_rate": "the optimizer and schedule state", "momentum": "the optimizer state",
                  "weight_decay": "the optimizer state", "optimizer": "the optimizer state",
                  "layer_decay": "the optimizer's parameter groups",
                  "seed": "the data order, augmentation and statistics"}
# Where this invocation writes and how it was configured: never compared (the labeled split has its own rule).
NOT_COMPARED = ("resume_from_checkpoint", "output_dir", "overwrite_output_dir", "config", "preset",
                "labeled_split_file", "num_labeled", "report_to", "plots", "dataloader_num_workers", "ddp_timeout")


def reconcile_resume(cfg, sources: Dict[str, str], path: str, saved: Dict, step: int):
    """A resumed run's settings and the notes that say what changed: returns (cfg, sources, notes)."""
    from .optim import lr_factor

    now_values, values, notes = cfg.to_dict(), {}, []
    for name, then in saved.items():
        now = now_values.get(name, then)
        if name not in now_values or name in NOT_COMPARED or now == then:
            continue
        if sources.get(name, "flag") in ("default", "demo", "pretrained"):  # not asked for now: continue as it was
            values[name] = then
        elif name in FIXED_ON_RESUME:
            raise UsageError(f"--resume_from_checkpoint {path!r}: cannot load it with --{name} {now!r}: its run was "
                             f"trained with --{name} {then!r}, which a resumed run cannot change (resume with "
                             f"--{name} {then!r}, or start a new run in another --output_dir)")
        elif name in KEPT_ON_RESUME:
            values[name] = then
            notes.append(f"note: --{name} {now} does not apply: a resumed run keeps {then} ({KEPT_ON_RESUME[name]} "
                         "of its checkpoint holds it)")
        elif name == "max_train_steps":
            lr = values.get("learning_rate", saved.get("learning_rate", cfg.learning_rate))
            was = lr * lr_factor(step, then, saved.get("warmup_steps", 0))
            will = lr * lr_factor(step, now, values.get("warmup_steps", cfg.warmup_steps))
            notes.append(f"note: --max_train_steps {now} (was {then}): the cosine schedule now spans {now} steps, so "
                         f"the learning rate of step {step + 1} moves from {was:.6g} to {will:.6g}")
        else:
            notes.append(f"note: --{name} {now!r} (was {then!r}) takes effect from step {step + 1}")
    sources = dict(sources, **{name: "checkpoint" for name in values})
    return dataclasses.replace(cfg, **values), sources, notes
