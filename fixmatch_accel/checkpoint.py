"""Checkpoints and the output folder: atomic save, strict load, which checkpoint to resume, whose folder it is.

The resume and output-folder checks run before the data and model are loaded (preflight).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from functools import partial
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional

from .config import IMPLIED_SOURCES
from .errors import UsageError, describe

if TYPE_CHECKING:
    import torch

# Files that mark an output_dir as holding a run.
RUN_FILES = ("metrics.jsonl", "checkpoints", "model.safetensors")
# Everything a run (and fixmatch-plot / fixmatch-predict) leaves there: set aside by --overwrite_output_dir.
RUN_OUTPUTS = RUN_FILES + ("config.json", "labeled_split.json", "eval_results.json", "xla_metrics.json",
                           "training_curves.png", "per_class.png", "predictions.csv")


class TrainState:
    """Step counter, counts and data positions: a checkpoint component saved as JSON (trainer_state.json)."""

    def __init__(self):
        self.step = 0
        self.skipped = 0  # non-finite steps skipped with --skip_nonfinite_steps
        self.bad_images = 0  # unreadable images the training loaders replaced (every read)
        self.bad_rows: List[int] = []  # the distinct unlabeled rows among them (the bad-image budget counts these)
        self.labeled_seen = 0  # images drawn, over all processes (true across a change of world size)
        self.unlabeled_seen = 0
        self.positions: Dict[str, List[int]] = {}  # each loader's [pass, batches done in it], kept by data.endless
        self.layout: Dict[str, int] = {}  # processes and workers: the data order depends on them
        self.settings: Dict = {}  # the run's settings, which a resume compares with its own
        self.saved_layout: Dict[str, int] = {}  # the layout of the checkpoint loaded, if any
        self.restarts: List[Dict] = []  # each restart by torchrun's agent: count, step resumed from, steps lost, when

    def state_dict(self) -> Dict:
        return {"step": self.step, "skipped": self.skipped, "bad_images": self.bad_images, "bad_rows": self.bad_rows,
                "labeled_seen": self.labeled_seen, "unlabeled_seen": self.unlabeled_seen,
                "positions": self.positions, "layout": self.layout, "settings": self.settings,
                "restarts": self.restarts}

    def load_state_dict(self, saved: Dict) -> None:
        """Take a checkpoint's state; `saved_layout` says what layout it was saved with."""
        self.step = int(saved["step"])
        self.skipped = int(saved.get("skipped", 0))
        self.bad_images = int(saved.get("bad_images", 0))
        self.bad_rows = [int(r) for r in saved.get("bad_rows", [])]
        self.saved_layout = layout = saved.get("layout", {})
        # Checkpoints written before these counters: every step drew B (and mu*B) images on each process.
        B, mu = (self.settings.get(k) for k in ("per_device_train_batch_size", "mu"))
        drawn = self.step * (B or 0) * layout.get("processes", 1)
        self.labeled_seen = int(saved.get("labeled_seen", drawn))
        self.unlabeled_seen = int(saved.get("unlabeled_seen", drawn * (mu or 0)))
        self.positions = {k: [int(e), int(b)] for k, (e, b) in saved["positions"].items()}
        self.restarts = list(saved.get("restarts", []))


class GeneratorState:
    """A torch.Generator as a checkpoint component (its state is one uint8 tensor)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> Dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, saved: Dict) -> None:
        self.generator.set_state(saved["state"])


class Components(NamedTuple):
    """What a checkpoint holds besides accelerate's files (model, optimizer, schedule, RNGs), by file name.

    Each has `state_dict()` / `load_state_dict()`. A state of tensors is written as NAME.safetensors, any
    other as NAME.json; an empty one is not written and, when empty now too, not required on load.
    `shared`: the same on every process, written by the main one; `per_process`: NAME_<rank> by each.
    """

    shared: Dict[str, object]
    per_process: Dict[str, object]

    def files(self, rank: int) -> Dict[str, object]:
        """file name -> component, for this process's view of a checkpoint (empty states left out)."""
        named = dict(self.shared, **{f"{name}_{rank}": c for name, c in self.per_process.items()})
        states = {name: c.state_dict() for name, c in named.items()}
        return {_file_name(name, states[name]): c for name, c in named.items() if states[name] != {}}


def _is_tensors(state: Dict) -> bool:
    import torch

    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _file_name(name: str, state: Dict) -> str:
    return f"{name}.safetensors" if _is_tensors(state) else f"{name}.json"


def _write(path: str, state: Dict) -> None:
    from safetensors.torch import save_file  # looked up at each call (tests kill the run inside it)

    if path.endswith(".safetensors"):
        # .cpu(): safetensors reads host memory (an XLA tensor has none to point at); it copies device tensors anyway.
        save_file({k: v.cpu().contiguous() for k, v in state.items()}, path)
    else:
        write_json(path, state)


def write_json(path: str, obj) -> None:
    """Write whole or not at all (temp file + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _step_folders(output_dir: str) -> List[int]:
    """Steps of the renamed `step_N` folders, oldest first (never `.tmp` ones)."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", d)))


def _marker(rank: int) -> str:
    return f"complete_{rank}.json"


def incomplete_reason(path: str) -> Optional[str]:
    """Why a checkpoint folder is incomplete (what it lacks), or None when every process wrote its part.

    Each process writes its marker after its own files; the checkpoint's processes are those of
    its trainer_state.json. A renamed folder without any marker was written before the markers
    (a write cut short is never renamed): it counts when every process's RNG states are there.
    """
    try:
        processes = int(_read_json(os.path.join(path, "trainer_state.json")).get("layout", {}).get("processes", 1))
    except Exception:
        return "no readable trainer_state.json"
    names = os.listdir(path)
    legacy = not any(name.startswith("complete_") for name in names)
    expected = [f"random_states_{r}.pkl" if legacy else _marker(r) for r in range(processes)]
    missing = [name for name in expected if name not in names]
    return f"no {', '.join(missing)}" if missing else None


def checkpoint_steps(output_dir: str) -> List[int]:
    """Steps of the complete checkpoints, oldest first: renamed `step_N` folders that every process wrote its part
    of; never `.tmp` ones."""
    root = os.path.join(output_dir, "checkpoints")
    return [s for s in _step_folders(output_dir) if incomplete_reason(os.path.join(root, f"step_{s}")) is None]


def incomplete_checkpoints(output_dir: str) -> List[str]:
    """`step_N (why)` for each step folder newer than the newest complete checkpoint that is not complete."""
    complete, root = checkpoint_steps(output_dir), os.path.join(output_dir, "checkpoints")
    newest = complete[-1] if complete else -1
    return [f"step_{s} ({incomplete_reason(os.path.join(root, f'step_{s}'))})"
            for s in _step_folders(output_dir) if s > newest]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    steps = checkpoint_steps(output_dir)
    return os.path.join(output_dir, "checkpoints", f"step_{steps[-1]}") if steps else None


def save_checkpoint(accelerator, output_dir: str, step: int, components: Components,
                    total_limit: Optional[int] = None) -> str:
    """Write to a temporary folder, then rename, so a kill mid-write never leaves a half checkpoint.

    Besides accelerate's files: one file per component (trainer_state.json, ema.safetensors,
    objective.safetensors, generator_<rank>.safetensors, ...) and the run's labeled_split.json.
    Nothing is pickled, so loading runs no code from the checkpoint (accelerate would unpickle
    registered objects).
    """
    final = os.path.join(output_dir, "checkpoints", f"step_{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)  # an interrupted write of this very step: incomplete by construction
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    for name, component in components.per_process.items():
        _write(os.path.join(tmp, _file_name(f"{name}_{accelerator.process_index}", state := component.state_dict())),
               state)
    if accelerator.is_main_process:
        for name, component in components.shared.items():
            state = component.state_dict()
            if state != {}:
                _write(os.path.join(tmp, _file_name(name, state)), state)
        shutil.copy(os.path.join(output_dir, "labeled_split.json"), tmp)  # the run's labeled examples
    # Last, this process's part is whole: a checkpoint counts only with every process's marker, which a
    # process killed mid-write (or on a machine that writes to a disk of its own) never leaves.
    write_json(os.path.join(tmp, _marker(accelerator.process_index)), {"step": step})
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


def _read_all(path: str, rank: int, components: Components) -> Dict:
    """Read every file of a checkpoint on its own first, so a missing, truncated or hostile one is named.

    accelerate reports a missing model.safetensors as a missing pytorch_model.bin, and skips
    unreadable RNG states with only an info log; read here with weights_only and accelerate's
    numpy allow-list they are an error, not a silently inexact resume. Returns the components'
    files; accelerate reads the rest again in load_state.
    """
    from accelerate.utils.other import load as weights_only_load
    from safetensors.torch import load_file

    mine = components.files(rank)
    readers = {"model.safetensors": load_file, "optimizer.bin": partial(weights_only_load, map_location="cpu"),
               "scheduler.bin": weights_only_load, f"random_states_{rank}.pkl": weights_only_load,
               **{name: load_file if name.endswith(".safetensors") else _read_json for name in mine}}
    missing = [name for name in readers if not os.path.exists(os.path.join(path, name))]
    if missing:
        raise UsageError(f"--resume_from_checkpoint {path!r}: cannot load it (missing {', '.join(missing)})")
    loaded = {}
    for name, read in readers.items():
        try:
            value = read(os.path.join(path, name))
            if name in mine:  # not kept: a second copy of the weights and optimizer state
                loaded[name] = value
        except Exception as e:
            raise UsageError(f"--resume_from_checkpoint {path!r}: cannot read {name} "
                             f"({describe(e, 'empty or truncated')})") from None
    return loaded


def load_checkpoint(accelerator, path: str, components: Components) -> None:
    """Restore a checkpoint written by save_checkpoint into accelerate's objects and every component;
    any problem is one clear line."""
    rank = accelerator.process_index
    files = components.files(rank)
    loaded = _read_all(path, rank, components)
    try:
        accelerator.load_state(path)  # model, optimizer, scheduler, RNGs: weights_only / safetensors
        for name, component in files.items():
            component.load_state_dict(loaded[name])
    except Exception as e:  # another model, a malformed state: the user must know, never a silent restart
        raise UsageError(f"--resume_from_checkpoint {path!r}: cannot load it ({describe(e)})") from None


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
            raise UsageError(f"--resume_from_checkpoint latest: no complete checkpoint under "
                             f"{cfg.output_dir}/checkpoints")
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
    if cfg.resume_from_checkpoint == "auto" and resume_path is None and "model.safetensors" not in present:
        # Only the start of a run, which never wrote a complete checkpoint (e.g. killed and restarted
        # early): nothing worth continuing, so start again with its files set aside, not refuse.
        return bool(present)
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
    """Saves the run's components every --checkpointing_steps or --checkpointing_minutes (and when asked), keeping
    the newest --checkpoints_total_limit; `load` restores them."""

    def __init__(self, accelerator, cfg, state: TrainState, components: Components):
        self.accelerator, self.state, self.components = accelerator, state, components
        self.every, self.total_limit = cfg.checkpointing_steps, cfg.checkpoints_total_limit
        self.minutes = cfg.checkpointing_minutes
        self.output_dir = cfg.output_dir
        self.last_saved = time.monotonic()
        self.saved_step: Optional[int] = None  # the step of the checkpoint written or loaded last

    def save(self) -> str:
        path = save_checkpoint(self.accelerator, self.output_dir, self.state.step, self.components,
                               total_limit=self.total_limit)
        self.last_saved, self.saved_step = time.monotonic(), self.state.step
        return path

    @property
    def enabled(self) -> bool:
        return bool(self.every) or self.minutes is not None

    def overdue(self) -> bool:
        """--checkpointing_minutes have passed since the last checkpoint, by this process's clock: only process 0's
        counts (the run agrees on it at a logging step), so another process always says no."""
        return (self.minutes is not None and self.accelerator.is_main_process
                and time.monotonic() - self.last_saved >= 60 * self.minutes)

    def load(self, path: str) -> None:
        load_checkpoint(self.accelerator, path, self.components)
        self.saved_step = self.state.step
        now, saved = self.state.layout, self.state.saved_layout
        changed = [f"{k} {now.get(k)} (was {v})" for k, v in saved.items() if now.get(k) != v]
        if changed:
            self.accelerator.print(f"warning: resumed with {', '.join(changed)}: the data order from here on is "
                                   "not the interrupted run's (the run stays valid, but is not an exact continuation)")

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
        if sources.get(name, "flag") in IMPLIED_SOURCES:  # not asked for now: continue as it was
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
