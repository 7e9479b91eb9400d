"""Every knob of a run in one dataclass; the command line is generated from it.

Order of precedence, lowest first: the field defaults (the paper's settings), the
built-in demo (only when no dataset is named), the fine-tuning defaults of a pretrained
run, a --preset (presets.yaml), a --config YAML file, then flags given on the command
line. `config.json` records where each value came from.
"""

import argparse
import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import yaml

from .algorithms import registry
from .errors import UsageError

# The models written here (fixmatch_accel/models.py BUILTIN_MODELS; a test keeps the two equal): timm has no
# pretrained weights for them, though --pretrained_file loads a run's model.safetensors into one.
BUILTIN_MODEL_NAMES = ("wrn28_2", "wrn28_8", "wrn37_2", "small_cnn")
# The side each built-in model was made for (the paper's CIFAR/SVHN 32 px, STL-10's 96 px): the default image size
# when the data's images are larger.
BUILTIN_INPUT_SIZES = dict(wrn28_2=32, wrn28_8=32, wrn37_2=96, small_cnn=32)


def builtin_without_weights(model: str) -> str:
    return (f"--pretrained: the built-in --model {model} has no pretrained weights to download; start from a "
            "finished run's model.safetensors with --pretrained_file PATH, or pick a timm model")


def labeled_count(value) -> Union[int, str]:
    """--num_labeled: a count, or 'all' (every row with a class)."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    if isinstance(value, bool):
        raise ValueError(value)
    return int(value)


labeled_count.__name__ = "a count or 'all'"  # what argparse names in its error


def _f(default, help: str, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class SharedConfig:
    """The settings of every run; TrainConfig below adds each algorithm's own."""

    # Data
    dataset_name: Optional[str] = _f(None, "Hub dataset id, local dataset folder, or 'digits' (scikit-learn's, no download). Default: the built-in demo when no dataset is named.")
    dataset_config_name: Optional[str] = _f(None, "Dataset configuration name (the `name` argument of datasets.load_dataset).")
    train_dir: Optional[str] = _f(None, "Image folder for training, one subfolder per class (datasets' imagefolder builder).")
    validation_dir: Optional[str] = _f(None, "Image folder for evaluation, one subfolder per class.")
    image_column_name: Optional[str] = _f(None, "Image column; default: the one column of feature type Image.")
    label_column_name: Optional[str] = _f(None, "Label column; default: the one column of feature type ClassLabel, else a column named 'label' or 'labels' (integers or strings).")
    train_split: str = _f("train", "Split holding the labeled pool (and the unlabeled data, unless an --unlabeled_* flag names another source).")
    eval_split: Optional[str] = _f(None, "Evaluation split; default: 'validation', else 'test', else --train_val_split of the train split held out.")
    train_val_split: float = _f(0.15, "Fraction of the train split held out for evaluation (seeded by --seed, stratified by class, never trained on); only when the data has no 'validation' or 'test' split and --eval_split is not given.")
    max_train_samples: Optional[int] = _f(None, "Use only the first N rows of the train split (for debugging).")
    max_eval_samples: Optional[int] = _f(None, "Use only the first N rows of the eval split (for debugging).")
    num_labeled: Union[int, str] = _f(4000, "Total labeled examples, class-balanced (num_labeled / num_classes per class); 'all': every row with a class, unbalanced as it is. Default 'all' when the unlabeled data has its own source.", parse=labeled_count)
    labeled_split_file: Optional[str] = _f(None, "Reuse the labeled indices of a saved labeled_split.json instead of drawing them.")
    image_size: Optional[int] = _f(None, "Square side in pixels: every image's shorter side is resized to it and the centre square kept; default: the model's input size with pretrained weights, else the dataset's size when a sample of its images all have one size and the model's input size (timm's pretrained_cfg; 32 for wrn28_*, 96 for wrn37_2) is not smaller, else the model's input size (32 when unknown).")
    dataloader_num_workers: int = _f(4, "DataLoader worker processes per training process (capped by the CPU count).")
    streaming: bool = _f(False, "Read the train and eval splits as streams (datasets' streaming=True): the labeled examples are kept in memory, the unlabeled data is read piece by piece and never held whole.")
    shuffle_buffer_size: int = _f(2000, "With --streaming: examples in each DataLoader worker's shuffle buffer (raw bytes in memory).")
    unlabeled_split: Optional[str] = _f(None, "The unlabeled data is this split of the labeled dataset, in datasets' split syntax: 'unlabeled', 'train+unlabeled' (STL-10's paper setting); default: the train split.")
    unlabeled_dataset_name: Optional[str] = _f(None, "The unlabeled data is (the train split of) this hub id or local dataset folder; any labels it has are never trained on.")
    unlabeled_dataset_config_name: Optional[str] = _f(None, "Configuration name of --unlabeled_dataset_name.")
    unlabeled_image_column_name: Optional[str] = _f(None, "Image column of the unlabeled data; default: --image_column_name's column when it has one, else its one column of feature type Image.")
    unlabeled_dir: Optional[str] = _f(None, "The unlabeled data is every image file under this folder, at any depth (no class folders needed; other files are ignored).")
    unlabeled_excludes_labeled: bool = _f(False, "Leave the labeled examples out of the unlabeled data (the paper keeps them in); only where the unlabeled data holds them (the train split, or a split expression that starts with it).")
    max_bad_image_fraction: float = _f(0.01, "Unreadable images are skipped and counted; the run stops when more than this fraction of the images read were bad.")

    # Model
    model: str = _f("wrn28_2", "wrn28_2, wrn28_8, wrn37_2, small_cnn, or any timm model name (random init unless --pretrained).")
    pretrained: bool = _f(False, "Start from timm's pretrained weights for --model (downloaded or from the HF cache); the classifier is new, sized to the dataset's classes.")
    pretrained_file: Optional[str] = _f(None, "Load the pretrained weights from this local .safetensors or weights-only torch file (implies --pretrained; for machines without hub access).")

    # FixMatch
    per_device_train_batch_size: int = _f(64, "Labeled images per process per step (B); unlabeled = mu * B.")
    per_device_eval_batch_size: int = _f(256, "Images per process per evaluation batch.")
    mu: int = _f(7, "Ratio of unlabeled to labeled images in a batch.")
    threshold: float = _f(0.95, "Confidence a weak-view prediction needs to become a pseudo-label (fixmatch; flexmatch's tau, the highest of its per-class thresholds).")
    lambda_u: float = _f(1.0, "Weight of the unlabeled loss; 0 trains on the labels alone.")
    temperature: float = _f(1.0, "Softmax temperature for the pseudo-label distribution.")
    algorithm: str = _f("fixmatch", "The unlabeled objective: " + ", ".join(a.summary for a in registry.ALGORITHMS.values()) + "; their statistics are reduced over all processes every step. Each one's own settings are the flags named after it.", choices=tuple(registry.ALGORITHMS))
    dist_align: Optional[str] = _f(None, "Distribution alignment of the weak-view probabilities (ReMixMatch): p * p_target / p_model, p_model an EMA of their mean; target 'uniform' or 'labeled' (the labeled split's class frequencies); default: the algorithm's (" + ", ".join(f"{a.dist_align} for {a.name}" for a in registry.ALGORITHMS.values() if a.dist_align != "none") + ", else none).", choices=("none", "uniform", "labeled"))
    stats_momentum: float = _f(0.999, "EMA momentum of the class statistics kept by freematch, softmatch and distribution alignment.")
    strong_augment: str = _f("rand-m9-mstd0.5", "Strong augmentation: a timm RandAugment string, or 'paper' (RA with random magnitude + 16px Cutout).")
    augment_device: Optional[str] = _f(None, "Where augmentation runs: 'cpu' (PIL/timm in DataLoader workers) or 'accelerator' (batched tensors on the training device). Default: accelerator when a GPU/TPU is used, else cpu.", choices=("cpu", "accelerator"))
    cache_decoded: Optional[bool] = _f(None, "Decode the train and eval splits once into uint8 tensors in memory (accelerator augmentation only); default: on when the train split takes under 4 GiB decoded.")
    hflip: bool = _f(True, "Random horizontal flip in the weak view (turn off for digits and text).")
    crop_padding: Optional[int] = _f(None, "Reflect-pad-and-crop shift of the weak view in pixels; default: image_size / 8 (4 px at 32, the paper's 12.5%).")

    # Optimisation
    learning_rate: float = _f(0.03, "Peak learning rate (of the last layers, with --layer_decay); default: the optimizer's, 0.03 for sgd (the paper's), 5e-4 for adamw (a fine-tuning rate; 0.03 is far too high for AdamW).")
    optimizer: str = _f("sgd", "sgd (Nesterov, the paper's) or adamw (a pretrained run's default); timm's create_optimizer_v2 builds adamw and any --layer_decay.", choices=("sgd", "adamw"))
    layer_decay: Optional[float] = _f(None, "Layer-wise learning-rate decay (timm's): a layer d blocks below the head trains at lr * layer_decay**d; needs a timm model with layer groups (ViTs, ResNets, ...); default: off (1.0 is off too), 0.65 for a pretrained ViT.")
    warmup_steps: int = _f(0, "Optimizer steps of linear warm-up, lr * (k+1)/W for k < W, before the cosine decay, which then spans the remaining K - W steps; a pretrained run's default: K / 40.")
    momentum: float = _f(0.9, "SGD (Nesterov) momentum.")
    weight_decay: float = _f(5e-4, "Weight decay on conv/linear weights (never on biases or BatchNorm).")
    ema_decay: float = _f(0.999, "Decay of the EMA model that is evaluated and saved (warmed up as (1+t)/(10+t)).")
    max_train_steps: int = _f(2**20, "Optimizer steps K; the cosine schedule lr*cos(7*pi*k/(16K)) spans them.")
    max_grad_norm: Optional[float] = _f(None, "Clip the gradients' total norm (over all parameters and processes) to this before each optimizer step (timm's --clip-grad); grad_norm is logged before clipping. Default: no clipping (the paper's).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches of B labeled and mu*B unlabeled images per optimizer step (accelerate's accumulate): the batch of one step is N times larger in the same memory. The algorithm's statistics are updated per micro-batch; BatchNorm normalises each micro-batch on its own.")
    compile: bool = _f(False, "torch.compile the augmentation + forward + loss (one graph without host syncs); on a CPU forward + loss only (eager augmentation is faster there).")
    compile_mode: str = _f("default", "torch.compile mode with --compile; 'reduce-overhead' (CUDA graphs) was fastest on one H100 (bench/RESULTS.md).", choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    channels_last: Optional[bool] = _f(None, "channels_last memory layout for model and inputs; default: on for CUDA and CPU (off on XLA and MPS).")
    mixed_precision: Optional[str] = _f(None, "no, fp16 or bf16; default: from `accelerate launch` / accelerate config.", choices=("no", "fp16", "bf16"))

    # Logging, evaluation, checkpoints
    logging_steps: int = _f(50, "Steps between metrics.jsonl rows (the only host syncs of the loop).")
    eval_steps: int = _f(1024, "Steps between evaluations of the EMA model (and one at the end); 0: only at the end.")
    checkpointing_steps: int = _f(4096, "Steps between checkpoints under output_dir/checkpoints; 0: none.")
    checkpointing_minutes: Optional[float] = _f(None, "Also checkpoint once this many minutes have passed since the last checkpoint (or the start), whichever of this and --checkpointing_steps comes first, so a slow run on a preemptible machine loses at most about this long. Process 0's clock decides, read at logging steps only (no extra sync). Default: steps only.")
    skip_nonfinite_steps: bool = _f(False, "Skip (and count) a step whose loss is not finite instead of stopping; costs a host sync per step.")
    checkpoints_total_limit: Optional[int] = _f(None, "Keep only the newest K checkpoints (older ones are deleted); default: keep all.")
    resume_from_checkpoint: Optional[str] = _f(None, "Checkpoint folder to resume from; 'latest' (newest in output_dir/checkpoints); or 'auto': resume from the newest complete one when there is one, else start (setting aside the files of a start that wrote no complete checkpoint): one command for preemptible and restarted jobs. A resumed run keeps its checkpoint's model, data, batch shape, optimizer settings and seed; other settings given now take effect, with a note.")
    output_dir: str = _f("outputs/fixmatch", "Where the run writes config.json, metrics.jsonl, checkpoints and the model.")
    overwrite_output_dir: bool = _f(False, "Start a new run in an output_dir that holds another run; its files are moved into OUTPUT_DIR/replaced_<time>/ (nothing is deleted).")
    plots: bool = _f(True, "Draw training_curves.png and per_class.png when the run ends (fixmatch-plot OUTPUT_DIR draws them at any time).")
    report_to: str = _f("none", "Trackers for accelerate (tensorboard, wandb, ..., all) besides metrics.jsonl; 'none' for none.")
    ddp_timeout: int = _f(1800, "Seconds a process waits for the others in a collective before failing: how long the other machines wait for one that hangs or drops off the network (a crashed one is noticed at once); transformers' name and default.")
    seed: int = _f(0, "Seed for the labeled split, initialisation, data order and augmentation.")

    # Presets and config files (recorded so config.json says how the run was set up)
    preset: Optional[str] = _f(None, "A paper setting from fixmatch_accel/presets.yaml (cifar10-40, cifar100-400, svhn-250, stl10-1000, ...); 'list' prints them. A --config file and flags override it.")
    config: Optional[str] = _f(None, "YAML file of settings, one `field_name: value` per line (keys as in --help without the dashes); flags override it.")

    def __post_init__(self):
        if self.dist_align is None and self.algorithm in registry.ALGORITHMS:  # its own default, recorded as the value
            self.dist_align = registry.get(self.algorithm).dist_align

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# The algorithms' own settings (algorithms/registry.py) follow the shared ones, each a field and a flag.
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [(s.name, s.type, _f(s.default, s.help)) for s in registry.all_settings()], bases=(SharedConfig,))
TrainConfig.__module__ = __name__


# The built-in demo: scikit-learn's digits, 5 labels per class, a small CNN on a 2-core CPU.
DEMO = dict(
    dataset_name="digits",
    num_labeled=50,
    model="small_cnn",
    image_size=16,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=512,
    max_train_steps=400,
    logging_steps=20,
    eval_steps=100,
    checkpointing_steps=200,
    augment_device="accelerator",  # batched tensors in memory: no workers, fast on a CPU
    hflip=False,  # a mirrored digit is another symbol
    crop_padding=2,
    # The paper's RA + Cutout: on 16px digits it beat rand-m9-mstd0.5 (97.9 vs 96.1 mean top-1, seeds 0-2).
    strong_augment="paper",
    dataloader_num_workers=0,
    seed=1,  # a seed with a clear gap over labels alone (+9.3 points; seeds 0-2 gave +4.2 to +9.3)
    output_dir="outputs/digits_demo",
)


def _arg_type(tp):
    """(argparse type, is_bool) for a dataclass field annotation."""
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp, tp is bool


def _demo_description() -> str:
    """What the no-flag demo sets, read from DEMO so --help never drifts from it."""
    d = DEMO
    strong = d["strong_augment"] + (" (RandAugment + Cutout)" if d["strong_augment"] == "paper" else "")
    return (f"With no dataset named, runs a short demo: dataset {d['dataset_name']} (scikit-learn's, no download), "
            f"{d['num_labeled']} labels, model {d['model']}, {d['image_size']} px, "
            f"B={d['per_device_train_batch_size']}, {d['max_train_steps']} steps, strong augmentation {strong}, "
            f"{'horizontal flip' if d['hflip'] else 'no flip'}, seed {d['seed']}, output {d['output_dir']}; "
            "flags, --preset and --config override any of these. Naming --dataset_name digits instead keeps "
            "the paper's defaults, except that digits are never flipped.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fixmatch-train",
        description="FixMatch semi-supervised image classification on HuggingFace Accelerate. " + _demo_description(),
        argument_default=argparse.SUPPRESS,  # so we can tell flags given from defaults
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        tp, is_bool = _arg_type(hints[f.name])
        help_text = f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%")  # argparse formats help with %
        if is_bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=f.metadata.get("parse", tp), choices=f.metadata.get("choices"),
                                help=help_text)
    return parser


PRESETS_FILE = "fixmatch_accel/presets.yaml"  # shipped as package data (setup.cfg)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges keys that the mapping may override
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is set twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(text: str, where: str) -> Dict[str, Any]:
    """A YAML mapping of settings, or a one-line UsageError naming `where`."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise UsageError(f"{where}: not valid YAML ({at}{getattr(e, 'problem', None) or e})") from None
    if data is None:  # an empty file sets nothing
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping of `setting: value` lines, got a {type(data).__name__}")
    return data


def _presets() -> Dict[str, Dict[str, Any]]:
    text = resources.files(__package__).joinpath("presets.yaml").read_text(encoding="utf-8")
    # Keys starting with "_" are YAML anchors shared by several presets.
    return {k: v for k, v in _read_yaml(text, PRESETS_FILE).items() if not k.startswith("_")}


def preset_names() -> List[str]:
    return list(_presets())


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Convert a YAML value for field `f` the way the command line would, or raise naming key and file."""
    annotation = typing.get_type_hints(TrainConfig)[f.name]
    tp, is_bool = _arg_type(annotation)

    def bad(expected: str, hint: str = "") -> UsageError:
        return UsageError(f"{where}: {f.name}: expected {expected}, got {value!r}{hint}")

    if value is None:
        if typing.get_origin(annotation) is typing.Union:  # Optional: null means "unset"
            return None
        raise bad(f"a value of type {tp.__name__}")
    if is_bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if "parse" in f.metadata:  # a field with a parser of its own (--num_labeled: a count or 'all')
        try:
            return f.metadata["parse"](value)
        except (TypeError, ValueError):
            raise bad(f.metadata["parse"].__name__) from None
    if isinstance(value, bool):  # YAML reads unquoted yes/no/on/off as booleans
        raise bad(f"a {tp.__name__}", " (quote it: YAML reads unquoted yes/no/on/off as booleans)")
    if tp is str and isinstance(value, (str, int)):
        value = str(value)  # what the command line passes for `2014`
    elif (tp is int and isinstance(value, (str, int))) or (tp is float and isinstance(value, (str, int, float))):
        try:  # strings too: PyYAML reads 5e-4 (no dot) as the string "5e-4"
            value = tp(value)
        except ValueError:
            raise bad("an integer" if tp is int else "a number") from None
    else:
        raise bad({int: "an integer", float: "a number", str: "a string"}.get(tp, tp.__name__))
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise bad(f"one of {', '.join(choices)}")
    return value


def _settings(raw: Dict[Any, Any], where: str) -> Dict[str, Any]:
    """Check a preset's or a config file's keys against the fields and convert its values."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        name = str(key)
        if name == "config":
            raise UsageError(f"{where}: a config file cannot name another one (key 'config')")
        if name not in fields:
            bare = name.lstrip("-").replace("-", "_")  # someone wrote the flag: --learning-rate
            close = [bare] if bare in fields else difflib.get_close_matches(bare, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"{where}: unknown setting '{name}'{hint}; keys are TrainConfig field names, as in --help without the dashes")
        out[name] = _coerce(fields[name], value, where)
    return out


def load_config_file(path: str) -> Dict[str, Any]:
    """The settings of a --config YAML file, checked and converted."""
    where = f"--config {path}"
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    return _settings(_read_yaml(text, where), where)


def load_preset(name: str) -> Dict[str, Any]:
    """The settings of a named preset, checked and converted like a config file."""
    presets = _presets()
    if name not in presets:
        raise UsageError(f"--preset {name!r}: unknown; choose from {', '.join(presets)} (or 'list')")
    return _settings(presets[name], f"preset {name} in {PRESETS_FILE}")


def _print_presets() -> None:
    for name, p in _presets().items():
        print(f"{name:16s} {p.get('dataset_name')}, {p.get('num_labeled')} labels, {p.get('model')}, weight decay {p.get('weight_decay')}")


# Fine-tuning defaults of a pretrained run (--pretrained or --pretrained_file), from USB's FixMatch configs for
# pretrained ViTs (microsoft/Semi-supervised-learning, config/usb_cv/fixmatch/*.yaml): every one trains with AdamW,
# weight_decay 0.0005 (the paper's value, so the field default stands) and num_warmup_iter 5120 of num_train_iter
# 204800 (1/40); lr and layer_decay vary with model and data: lr 0.0005 with layer_decay 0.5 for their 32 px
# vit_small_patch2_32 on CIFAR-100 (fixmatch_cifar100_200_0.yaml), lr 0.0001 / 0.001 with layer_decay 0.65 for
# the ImageNet-layout vit_base_patch16_96 / vit_small_patch16_224 (fixmatch_stl10_40_0.yaml,
# fixmatch_semi_aves_3959_0.yaml), lr 5e-05 and no layer decay for EuroSAT (fixmatch_eurosat_20_0.yaml).
PRETRAINED_OPTIMIZER = "adamw"
PRETRAINED_ADAMW_LR = 5e-4  # the middle of USB's range, its CIFAR setting; an AdamW rate, so only with adamw
# The learning rate an optimizer takes when no layer sets one: SGD the paper's (the field default), AdamW the
# fine-tuning rate above. Recorded with the source "optimizer"; a pretrained run's says "pretrained".
OPTIMIZER_LR = dict(sgd=0.03, adamw=PRETRAINED_ADAMW_LR)
# Sources of values no one asked for (a resumed run continues with its checkpoint's instead).
IMPLIED_SOURCES = ("default", "demo", "pretrained", "optimizer", "pretrained_file")
PRETRAINED_LAYER_DECAY = 0.65  # USB's for timm's ViT layout (patch16), BEiT's and MAE's; only for LAYER_DECAY_MODELS
PRETRAINED_WARMUP_DIVISOR = 40  # warm-up steps = --max_train_steps // 40: USB's 5120 of 204800
LAYER_DECAY_MODELS = ("vit", "deit", "beit", "eva")  # name prefixes of the ViTs that fine-tune with layer decay


def _apply_pretrained_defaults(values: Dict[str, Any], sources: Dict[str, str]) -> None:
    """The layer just above the field defaults and the demo: only a value that no preset, file or flag set."""
    def put(name: str, value: Any) -> None:
        if sources[name] in ("default", "demo"):
            values[name], sources[name] = value, "pretrained"

    put("optimizer", PRETRAINED_OPTIMIZER)
    if values["optimizer"] == "adamw":  # the paper's 0.03 stays with an SGD asked for
        put("learning_rate", PRETRAINED_ADAMW_LR)
    if values["model"].split("/")[-1].lower().startswith(LAYER_DECAY_MODELS):  # also hf-hub:timm/vit_...
        put("layer_decay", PRETRAINED_LAYER_DECAY)
    put("warmup_steps", values["max_train_steps"] // PRETRAINED_WARMUP_DIVISOR)


def _apply_optimizer_lr(values: Dict[str, Any], sources: Dict[str, str]) -> None:
    """A learning rate no layer set follows the optimizer (--optimizer adamw alone must not train at SGD's 0.03)."""
    if sources["learning_rate"] in ("default", "demo") and values["learning_rate"] != OPTIMIZER_LR[values["optimizer"]]:
        values["learning_rate"], sources["learning_rate"] = OPTIMIZER_LR[values["optimizer"]], "optimizer"


def optimizer_lr_note(cfg: TrainConfig, sources: Dict[str, str]) -> Optional[str]:
    """One line when the learning rate is the optimizer's own default, or None (to print once)."""
    if sources.get("learning_rate") != "optimizer":
        return None
    return (f"note: --optimizer {cfg.optimizer} without --learning_rate: its default {cfg.learning_rate:g} "
            "(give --learning_rate to choose another)")


def pretrained_defaults_note(cfg: TrainConfig, sources: Dict[str, str]) -> Optional[str]:
    """One line naming the settings a pretrained run took from the fine-tuning defaults, or None (to print once)."""
    taken = [f"--{name} {getattr(cfg, name)}" for name in ("optimizer", "learning_rate", "layer_decay", "warmup_steps")
             if sources.get(name) == "pretrained"]
    if not taken:
        return None
    return f"note: pretrained weights, so fine-tuning defaults: {', '.join(taken)} (a flag, preset or config file overrides them)"


def _unread(cfg) -> Dict[str, str]:
    """The settings that only some runs read, each that this run does not read with the reason."""
    algorithm = registry.get(cfg.algorithm)
    by_algorithm = f"--algorithm {cfg.algorithm} does not read it"
    unread = {s.name: by_algorithm for s in registry.all_settings() if s not in algorithm.own_settings}
    if "threshold" not in algorithm.uses:
        unread["threshold"] = by_algorithm
    if "stats_momentum" not in algorithm.uses and cfg.dist_align == "none":
        unread["stats_momentum"] = f"{by_algorithm}, nor --dist_align none"
    if not cfg.streaming:
        unread["shuffle_buffer_size"] = "only with --streaming"
    if not cfg.compile:
        unread["compile_mode"] = "only with --compile"
    return unread


def unused_settings_note(cfg, sources: Dict[str, str]) -> Optional[str]:
    """One line naming the settings given by a flag or --config file that this run does not read, or None.

    A preset's are left out: presets set the paper's values for every algorithm."""
    given = [f"--{name} ({why})" for name, why in _unread(cfg).items()
             if sources.get(name, "default") == "flag" or sources.get(name, "").startswith("file:")]
    return f"note: no effect in this run: {', '.join(given)}" if given else None


# What names a run's data, taken from one layer as a whole: a dataset or folder named by a higher layer (your own
# data under --preset cifar10-40) replaces the lower layers' dataset with its config name, columns and splits,
# which would not fit it.
DATA_SOURCE = ("dataset_name", "dataset_config_name", "train_dir", "validation_dir", "image_column_name",
               "label_column_name", "train_split", "eval_split", "unlabeled_split", "unlabeled_dataset_name",
               "unlabeled_dataset_config_name", "unlabeled_image_column_name", "unlabeled_dir")


def _own_data_source(layers: List[Tuple[str, Dict[str, Any]]]) -> List[Tuple[str, Dict[str, Any]]]:
    """The layers with every data source setting dropped from those below the highest one that names a dataset."""
    names = [i for i, (_, layer) in enumerate(layers)
             if any(layer.get(k) is not None for k in ("dataset_name", "train_dir"))]
    if not names:
        return layers
    return [(source, {k: v for k, v in layer.items() if k not in DATA_SOURCE}) if i < names[-1] else (source, layer)
            for i, (source, layer) in enumerate(layers)]


def source_words(source: Optional[str]) -> Optional[str]:
    """How an error names where a value came from, or None for a flag or a default."""
    if source is None:
        return None
    if source.startswith("preset:"):
        return f"--preset {source[len('preset:'):]}"
    if source.startswith("file:"):
        return f"--config {source[len('file:'):]}"
    return "the checkpoint" if source == "checkpoint" else None


def name_the_source(error: UsageError, cfg: TrainConfig, sources: Dict[str, str]) -> UsageError:
    """An error about a --flag whose value a preset, config file or checkpoint set, saying which:
    `--label_column_name 'fine_label' (from --preset NAME): no such column ...`."""
    message = str(error)
    m = re.match(r"--(\w+)", message)
    words = source_words(sources.get(m.group(1))) if m else None
    if words is None or f"(from {words})" in message:
        return error
    name = m.group(1)
    value = getattr(cfg, name, None)
    for shown in (repr(value), str(value)):
        head = f"--{name} {shown}"
        if message.startswith(head) and message[len(head):len(head) + 1] in (":", " ", ""):
            return UsageError(f"{head} (from {words}){message[len(head):]}")
    return UsageError(f"{message} (from {words})")


def parse_args(argv: Optional[List[str]] = None) -> Tuple[TrainConfig, Dict[str, str]]:
    """Return the resolved config and, for each field, where its value came from.

    Layers, lowest first, with the source recorded for each field: field defaults
    ("default"), the demo ("demo", only when no other layer names a dataset), the
    fine-tuning defaults of a pretrained run ("pretrained", for the values still at a
    default or the demo's once every layer is read), the learning rate of an --optimizer
    when nothing else set one ("optimizer"), a preset (without its data source when a
    higher layer names a dataset or folder: DATA_SOURCE) ("preset:NAME"), a config
    file ("file:PATH"), command-line flags ("flag").
    """
    given = vars(build_parser().parse_args(argv))
    from_file = load_config_file(given["config"]) if given.get("config") else {}
    preset = given.get("preset", from_file.get("preset"))  # a file may name a preset; a flag wins
    if preset == "list":
        _print_presets()
        raise SystemExit(0)
    layers = [
        (f"preset:{preset}", load_preset(preset) if preset is not None else {}),
        (f"file:{given.get('config')}", from_file),
        ("flag", given),
    ]
    layers = _own_data_source(layers)
    values, sources = {}, {}
    for f in dataclasses.fields(TrainConfig):
        values[f.name], sources[f.name] = f.default, "default"
    if not any(layer.get(k) is not None for _, layer in layers for k in ("dataset_name", "train_dir")):
        for k, v in DEMO.items():
            values[k], sources[k] = v, "demo"
    for source, layer in layers:
        for k, v in layer.items():
            values[k], sources[k] = v, source
    if values["dataset_name"] == "digits" and sources["hflip"] == "default":
        values["hflip"], sources["hflip"] = False, "digits"  # a mirrored digit is another symbol, however named
    if values["pretrained_file"] is not None and not values["pretrained"]:  # a file of weights is a pretrained run
        values["pretrained"], sources["pretrained"] = True, "pretrained_file"
    if unlabeled_flags(values) and sources["num_labeled"] == "default":
        # The labeled data is what the user labeled, every row of it; a balanced draw only when asked for.
        values["num_labeled"], sources["num_labeled"] = "all", "unlabeled_source"
    if values["pretrained"] or values["pretrained_file"] is not None:
        _apply_pretrained_defaults(values, sources)
    _apply_optimizer_lr(values, sources)
    cfg = TrainConfig(**values)
    try:
        validate(cfg)
    except UsageError as e:  # say which layer set a bad value that did not come from a flag
        raise name_the_source(e, cfg, sources) from None
    return cfg, sources


def validate(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, naming the flag."""
    for f in dataclasses.fields(TrainConfig):  # nan and inf pass every comparison below, or fail far from here
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{f.name} must be a finite number, got {value}")
    if cfg.learning_rate < 0:
        raise UsageError(f"--learning_rate must be non-negative, got {cfg.learning_rate}")
    if not 0.0 <= cfg.momentum < 1.0:
        raise UsageError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if not 0 <= cfg.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {cfg.seed}")
    if not cfg.output_dir:
        raise UsageError("--output_dir must name a folder, got ''")
    positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "mu", "max_train_steps", "logging_steps", "ddp_timeout", "gradient_accumulation_steps"]
    if cfg.num_labeled != "all":
        positive.append("num_labeled")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ["eval_steps", "checkpointing_steps", "dataloader_num_workers", "weight_decay", "lambda_u"]:
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must be non-negative, got {getattr(cfg, name)}")
    for name in ["checkpoints_total_limit", "max_train_samples", "max_eval_samples"]:  # None: no limit
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.layer_decay is not None and not 0.0 < cfg.layer_decay <= 1.0:
        raise UsageError(f"--layer_decay must be in (0, 1] (1: off), got {cfg.layer_decay}")
    if cfg.checkpointing_minutes is not None and cfg.checkpointing_minutes <= 0:
        raise UsageError(f"--checkpointing_minutes must be positive, got {cfg.checkpointing_minutes}")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise UsageError(f"--max_grad_norm must be positive, got {cfg.max_grad_norm}")
    if cfg.warmup_steps < 0:
        raise UsageError(f"--warmup_steps must be non-negative, got {cfg.warmup_steps}")
    if cfg.warmup_steps >= cfg.max_train_steps:
        raise UsageError(f"--warmup_steps must be smaller than --max_train_steps ({cfg.max_train_steps}), "
                         f"got {cfg.warmup_steps}")
    if cfg.crop_padding is not None and cfg.crop_padding < 0:
        raise UsageError(f"--crop_padding must be non-negative, got {cfg.crop_padding}")
    if not 0.0 <= cfg.threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {cfg.threshold}")
    if cfg.temperature <= 0:
        raise UsageError(f"--temperature must be positive, got {cfg.temperature}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise UsageError(f"--ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.dataset_name is not None and cfg.train_dir is not None:
        raise UsageError("give either --dataset_name or --train_dir, not both")
    if cfg.validation_dir is not None and cfg.train_dir is None:
        raise UsageError("--validation_dir needs --train_dir")
    check_unlabeled_flags(cfg)
    if cfg.shuffle_buffer_size < 1:
        raise UsageError(f"--shuffle_buffer_size must be at least 1, got {cfg.shuffle_buffer_size}")
    if not 0.0 <= cfg.max_bad_image_fraction <= 1.0:
        raise UsageError(f"--max_bad_image_fraction must be in [0, 1], got {cfg.max_bad_image_fraction}")
    if cfg.streaming and cfg.cache_decoded:
        raise UsageError("--cache_decoded cannot be used with --streaming (a stream is never held whole)")
    if not 0.0 < cfg.train_val_split < 1.0:
        raise UsageError(f"--train_val_split must be in (0, 1), got {cfg.train_val_split}")
    if not 0.0 <= cfg.stats_momentum < 1.0:
        raise UsageError(f"--stats_momentum must be in [0, 1), got {cfg.stats_momentum}")
    for s in registry.all_settings():
        value = getattr(cfg, s.name)
        if (s.bound == "positive" and value <= 0) or (s.bound == "non-negative" and value < 0):
            raise UsageError(f"--{s.name} must be {s.bound}, got {value}")
    algorithm = registry.get(cfg.algorithm)
    if cfg.dist_align not in algorithm.dist_align_choices:
        raise UsageError(f"--dist_align {cfg.dist_align}: {cfg.algorithm} aligns its own distributions; "
                         f"choose from {', '.join(algorithm.dist_align_choices)}")
    if cfg.image_size is not None and cfg.image_size < 4:
        raise UsageError(f"--image_size must be at least 4, got {cfg.image_size}")
    if cfg.pretrained and cfg.pretrained_file is None and cfg.model in BUILTIN_MODEL_NAMES:
        raise UsageError(builtin_without_weights(cfg.model))


# The flags that give the unlabeled data a source of its own, one at a time.
UNLABELED_SOURCE_FLAGS = ("unlabeled_split", "unlabeled_dataset_name", "unlabeled_dir")


def unlabeled_flags(values: Dict[str, Any]) -> List[str]:
    """The unlabeled-source flags set (a dict of settings): empty when the unlabeled data is the train split."""
    return [name for name in UNLABELED_SOURCE_FLAGS if values.get(name) is not None]


def split_names(expr: str) -> List[str]:
    """The split names of a datasets split expression: 'train[:10%]+unlabeled' -> ['train', 'unlabeled']."""
    return [re.split(r"\[", part, maxsplit=1)[0].strip() for part in expr.split("+")]


def check_unlabeled_flags(cfg: TrainConfig) -> None:
    given = unlabeled_flags(cfg.to_dict())
    if len(given) > 1:
        raise UsageError(f"{' and '.join('--' + g for g in given)} each name the unlabeled data: keep one")
    for name, needs in (("unlabeled_dataset_config_name", "unlabeled_dataset_name"),
                        ("unlabeled_image_column_name", None)):
        if getattr(cfg, name) is not None and (needs and getattr(cfg, needs) is None or not given):
            raise UsageError(f"--{name} needs --{needs or 'unlabeled_split, --unlabeled_dataset_name or --unlabeled_dir'}")
    if cfg.unlabeled_dir is not None and cfg.unlabeled_image_column_name is not None:
        raise UsageError("--unlabeled_image_column_name does not apply to --unlabeled_dir (a folder of image files)")
    if cfg.unlabeled_split is not None:
        if not cfg.unlabeled_split.strip() or any(not n for n in split_names(cfg.unlabeled_split)):
            raise UsageError(f"--unlabeled_split {cfg.unlabeled_split!r}: not a split expression "
                             "(e.g. 'unlabeled' or 'train+unlabeled')")
        if cfg.train_dir is not None:
            raise UsageError("--unlabeled_split names a split of --dataset_name; with --train_dir give the unlabeled "
                             "images as --unlabeled_dir")
    if cfg.unlabeled_excludes_labeled and given:
        holds = (cfg.unlabeled_split is not None
                 and split_names(cfg.unlabeled_split)[0] == cfg.train_split and "[" not in cfg.unlabeled_split)
        if not holds:
            where = (f"--unlabeled_split {cfg.unlabeled_split!r} does not start with --train_split {cfg.train_split!r}"
                     if cfg.unlabeled_split is not None else f"--{given[0]} is a source of its own")
            raise UsageError(f"--unlabeled_excludes_labeled: the unlabeled data cannot hold the labeled examples "
                             f"({where}); leave the flag out")


# Decoded train splits under this size are kept in memory by default (--cache_decoded).
CACHE_LIMIT_BYTES = 4 * 2**30


@dataclass(frozen=True)
class Resolved:
    """The settings left to "auto" (None) in TrainConfig, decided once for this data and device."""

    image_size: int
    crop_padding: int
    augment_device: str  # "cpu" (PIL in the loaders' workers) or "accelerator" (batched tensors)
    cache_decoded: bool
    channels_last: bool
    load_size: int  # the side images are decoded (and cached) at; resized to image_size on the device when smaller
    interpolation: str  # how images reach image_size: the pretrained model's when resized on the device
    normalization: str  # "model": a pretrained model's mean and std; "dataset": the sampled channel statistics
    size_reason: str = ""  # why image_size, for the start's `images: N px (why)` and config.json


def default_channels_last(device_type: str) -> bool:
    """channels_last unless asked: faster convolutions on CUDA and on CPUs (oneDNN, bench/RESULTS.md);
    XLA and MPS keep the default layout."""
    return device_type in ("cuda", "cpu")


MIXED_SIZES_DEFAULT = 32  # the side of images of several sizes when the model names no input size


def _image_size(cfg: TrainConfig, model_data: Optional[Dict], model_size: Optional[int],
                dataset_image_size: Callable[[], Optional[int]]) -> Tuple[int, str]:
    """(image side, why): --image_size; a pretrained model's input size; else the dataset's uniform size unless the
    model was made for smaller images (a 640 px photo trains a WRN at its 32 px, not at 640)."""
    if cfg.image_size:
        return cfg.image_size, "--image_size"
    if model_data:
        return model_data["input_size"][-1], f"{cfg.model}'s input size, as its pretrained weights expect"
    side = dataset_image_size()
    if side is not None and (model_size is None or side <= model_size):
        return side, "the dataset's size"
    if model_size is not None:
        found = f"larger ({side} px)" if side is not None else "of several sizes"
        return model_size, f"{cfg.model}'s input size; the dataset's images are {found}"
    return MIXED_SIZES_DEFAULT, f"the dataset's images are of several sizes and --model {cfg.model} names no input size"


def resolve(cfg: TrainConfig, *, device_type: str, dataset_image_size: Callable[[], Optional[int]], num_train: int,
            streaming: bool, model_data: Optional[Dict] = None,
            dataset_native_size: Callable[[], Optional[int]] = lambda: None, model_size: Optional[int] = None) -> Resolved:
    """Every auto setting in one place; `dataset_image_size` (the side of a sample's images when they share one,
    else None) is asked only when it decides the size.

    model_data: a pretrained model's preprocessing (timm's pretrained_cfg: input_size, interpolation, mean, std):
    its input size is the default image size, its interpolation resizes on both paths, and with on-device
    augmentation images of a smaller uniform size (`dataset_native_size`) are decoded and cached at that size and
    enlarged once per batch. model_size: the side the model was made for, also without weights (None: unknown).
    """
    size, reason = _image_size(cfg, model_data, model_size, dataset_image_size)
    pad = cfg.crop_padding if cfg.crop_padding is not None else max(1, size // 8)
    if pad >= size:
        raise UsageError(f"--crop_padding {pad} must be smaller than the image side ({size} px)")
    augment_device = cfg.augment_device or ("cpu" if device_type == "cpu" else "accelerator")
    # the pretrained model's interpolation on both paths: PIL's resize at decoding, and the device's enlargement
    interpolation = model_data.get("interpolation", "bicubic") if model_data else "bilinear"
    load_size = size
    native = dataset_native_size() if model_data and augment_device == "accelerator" else None
    if native is not None and native < size:
        load_size = native
    cache_decoded = cfg.cache_decoded
    if cache_decoded is None:
        cache_decoded = (augment_device == "accelerator" and not streaming
                         and num_train * 3 * load_size * load_size < CACHE_LIMIT_BYTES)
    elif cache_decoded and augment_device == "cpu":
        raise UsageError("--cache_decoded needs --augment_device accelerator (the CPU path augments PIL images)")
    channels_last = cfg.channels_last if cfg.channels_last is not None else default_channels_last(device_type)
    return Resolved(size, pad, augment_device, cache_decoded, channels_last, load_size, interpolation,
                    "model" if model_data else "dataset", reason)
