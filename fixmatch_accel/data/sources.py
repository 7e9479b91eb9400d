"""Where the labeled and eval data come from: a hub or local dataset, two image folders, or the digits demo.

load_labeled opens the train and eval splits (or holds part of the train split out for
evaluation), finds the image and label columns, reads every label (one pass over the
label column of a stream) and checks the classes.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ..errors import UsageError
from .digits import load_digits_dataset
from .streaming import first_rows, label_pass, label_streams


@dataclass
class SplitData:
    """What the trainer needs to know about the loaded data.

    `train` and `eval` hold images undecoded (see decode_image): a datasets.Dataset,
    or with --streaming a datasets.IterableDataset. `train_labels` are the class
    indices of the train split in order (the positions the labeled split refers to).
    When the data has no eval split, `train` is what is left of the train split after
    `carve` held rows out, and `eval` those rows. `notes` are warnings for the user,
    printed once by the trainer. A train row without a class (-1: none, None or '' in the
    data) is never a labeled example. `unlabeled` is the unlabeled data's source
    (unlabeled.Source, its own row space), set by unlabeled.load_data.
    """

    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset"  # noqa: F821
    image_column: str
    label_column: str
    class_names: List[str]
    eval_split: str
    train_labels: np.ndarray = None
    eval_labels: np.ndarray = None
    shard_sizes: Optional[List[int]] = None  # streaming: rows in each shard of the train split
    label_map: Optional[Dict] = None  # streaming with plain int/str labels: value -> class index
    carve: Optional[Dict] = None  # eval rows held out of the train split: {fraction, seed, held_out}
    notes: List[str] = field(default_factory=list)
    unlabeled: object = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def streaming(self) -> bool:
        return self.shard_sizes is not None


def local_path(name: str) -> str:
    """A --dataset_name as load_dataset takes it (a hub id passes unchanged)."""
    return os.path.expanduser(name)


def load_named_dataset(name: str, config_name: Optional[str] = None, streaming: bool = False):
    """The splits (a DatasetDict) of --dataset_name: a hub id, a local dataset folder, or 'digits'."""
    from datasets import IterableDatasetDict, load_dataset

    if name == "digits":
        digits = load_digits_dataset()
        if streaming:  # four shards, so that the streaming path can be tried on it
            return IterableDatasetDict({k: v.to_iterable_dataset(num_shards=4) for k, v in digits.items()})
        return digits
    path = local_path(name)
    # a path, not a hub id: it starts like one, or its first part is a folder here
    local = name.startswith(("/", "./", "../", "~")) or ("/" in name and os.path.isdir(name.split("/")[0]))
    if local and not os.path.exists(path):
        raise UsageError(f"--dataset_name {name!r}: no such folder")
    if os.path.isfile(path):
        raise UsageError(f"--dataset_name {name!r} is a file: give the folder that holds the dataset's files "
                         "(its train and validation/test splits)")
    try:
        return load_dataset(path, config_name, streaming=streaming)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        raise UsageError(f"--dataset_name {name!r}: {str(e).splitlines()[0]}") from None


def _load_image_folders(cfg, streaming: bool):
    from datasets import load_dataset

    for flag, path in (("--train_dir", cfg.train_dir), ("--validation_dir", cfg.validation_dir)):
        if path is not None and not os.path.isdir(path):
            raise UsageError(f"{flag} {path!r}: no such folder")
        if path is not None:
            _check_flat(flag, path)
            _check_no_unlabeled_class(flag, path)
    # One builder call for both folders, so both splits share one class list. drop_labels=False: by
    # default the builder drops the class folders when the two folders lie at different depths.
    files = {"train": os.path.join(cfg.train_dir, "**")}
    if cfg.validation_dir is not None:
        files["validation"] = os.path.join(cfg.validation_dir, "**")
    try:
        return load_dataset("imagefolder", data_files=files, drop_labels=False, streaming=streaming)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--train_dir {cfg.train_dir!r}: {str(e).splitlines()[0]}") from None


def _visible_dirs(path: str):
    # the builder's file globs skip hidden and dunder names; so do we
    return sorted((d for d in os.scandir(path) if d.is_dir() and not d.name.startswith((".", "__"))),
                  key=lambda d: d.name)


def _nested_image(root: str) -> Optional[str]:
    """The first image found below a subfolder of a class folder (root/class/sub/...), or None."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    for class_dir in _visible_dirs(root):
        for sub in _visible_dirs(class_dir.path):
            for where, dirs, files in os.walk(sub.path):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
                for name in sorted(files):
                    if os.path.splitext(name)[1].lower() in ImageFolder.EXTENSIONS and not name.startswith("."):
                        return os.path.relpath(os.path.join(where, name), root)
    return None


def _check_flat(flag: str, root: str) -> None:
    """Images must sit directly in the class folders: the builder names a class after an image's own folder."""
    nested = _nested_image(root)
    if nested is not None:
        raise UsageError(f"{flag} {root!r}: images must sit directly in the class folders (one subfolder per "
                         f"class, no deeper), found {nested}")


def _check_no_unlabeled_class(flag: str, root: str) -> None:
    """A class folder named 'unlabeled' would silently become a class whose images are drawn as labeled examples."""
    for d in _visible_dirs(root):
        if d.name.lower() in ("unlabeled", "unlabelled"):
            raise UsageError(f"{flag} {root!r}: a class folder named {d.name!r}; unlabeled images are not a class, "
                             f"give them with --unlabeled_dir {os.path.join(root, d.name)!r} (moved out of {flag})")


def _load_raw(cfg, streaming: bool = False):
    if cfg.train_dir is not None:
        return _load_image_folders(cfg, streaming)
    return load_named_dataset(cfg.dataset_name, cfg.dataset_config_name, streaming)


def pick_column(features, flag: str, given: Optional[str], feature_type, kind: str) -> str:
    """The column named by --`flag` (`given`), else the one column of `feature_type`; `kind` names it in errors."""
    if given is not None:
        if given not in features:
            raise UsageError(f"--{flag} {given!r}: no such column (columns: {', '.join(features)})")
        return given
    found = [k for k, v in features.items() if isinstance(v, feature_type)]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(found)})"
        raise UsageError(f"found {what} {kind} columns among {', '.join(features)}: name one with --{flag}")
    return found[0]


ACCEPTED_IMAGES = ("an Image feature, a struct {bytes: binary, path: string} as datasets stores images (a plain "
                   "parquet file's too), or a binary column of encoded image files (PNG, JPEG, ...)")


def holds_images(feature) -> bool:
    """A column that load_data can cast to Image(decode=False): an Image feature; a struct of encoded bytes and a
    path (datasets' own storage of images, which a parquet written with pyarrow reads back as a plain struct);
    a binary column of encoded files."""
    from datasets import Image, Value

    if isinstance(feature, Image):
        return True
    if isinstance(feature, dict):
        return ("bytes" in feature and set(feature) <= {"bytes", "path"}
                and isinstance(feature["bytes"], Value) and feature["bytes"].dtype in ("binary", "large_binary")
                and all(isinstance(v, Value) and v.dtype in ("string", "large_string", "null")
                        for k, v in feature.items() if k == "path"))
    return isinstance(feature, Value) and feature.dtype in ("binary", "large_binary")


def check_image_column(features, image_col: str, flag: str = "image_column_name") -> None:
    """A column named by --image_column_name (or `flag`) must hold images (holds_images)."""
    if not holds_images(features[image_col]):
        raise UsageError(f"--{flag} {image_col!r} holds {features[image_col]}, not images; accepted: "
                         f"{ACCEPTED_IMAGES}")


def pick_image_column(features, given: Optional[str], flag: str = "image_column_name") -> str:
    """--image_column_name, else the one Image column, else the one column of encoded images (holds_images)."""
    from datasets import Image

    if given is None and not any(isinstance(v, Image) for v in features.values()):
        encoded = [k for k, v in features.items() if holds_images(v)]
        if len(encoded) == 1:
            return encoded[0]
    return pick_column(features, flag, given, Image, "Image")


def _pick_splits(cfg, raw):
    """(train split, eval split, the eval split's name): --eval_split, else 'validation' or 'test'.

    With neither, (train split, None, None): load_data holds --train_val_split of the train split out.
    """
    if cfg.train_split not in raw:
        raise UsageError(f"--train_split {cfg.train_split!r}: no such split (splits: {', '.join(raw)})")
    eval_split = cfg.eval_split
    if eval_split is None:
        eval_split = next((s for s in ("validation", "test") if s in raw), None)
        if eval_split is None and getattr(cfg, "streaming", False):  # a stream has no rows to select
            raise UsageError(
                f"no 'validation' or 'test' split (splits: {', '.join(raw)}) and --streaming cannot hold out "
                f"--train_val_split of a stream: name one with --eval_split"
                + (" or give --validation_dir" if cfg.train_dir else "")
            )
        if eval_split is None:
            return raw[cfg.train_split], None, None
    elif eval_split not in raw:
        raise UsageError(f"--eval_split {eval_split!r}: no such split (splits: {', '.join(raw)})")
    return raw[cfg.train_split], raw[eval_split], eval_split


def _pick_columns(cfg, features, eval_features, eval_split: str):
    """(image column, label column, whether the labels are plain int/str values rather than a ClassLabel)."""
    from datasets import ClassLabel

    if features is None:
        raise UsageError(f"--dataset_name {cfg.dataset_name!r}: the stream does not declare its features; "
                         "load it without --streaming or give it typed columns (Image, ClassLabel)")
    image_col = pick_image_column(features, cfg.image_column_name)
    label_col = _label_column(cfg, features)
    check_image_column(features, image_col)
    for column in (image_col, label_col):
        if eval_features is not None and column not in eval_features:
            raise UsageError(f"eval split {eval_split!r} has no column {column!r} "
                             f"(columns: {', '.join(eval_features)})")
    plain = not isinstance(features[label_col], ClassLabel)
    if plain and not _plain_labels(features[label_col]):
        raise UsageError(f"--label_column_name {label_col!r} holds {features[label_col]}, not class labels")
    return image_col, label_col, plain


def _plain_labels(feature) -> bool:
    """A column of integers or strings, which can be turned into classes."""
    from datasets import Value

    return isinstance(feature, Value) and (feature.dtype.startswith(("int", "uint"))
                                           or feature.dtype in ("string", "large_string"))


def _label_column(cfg, features) -> str:
    """--label_column_name, else the one ClassLabel column, else an int/str column named 'label' or 'labels'."""
    from datasets import ClassLabel

    if cfg.label_column_name is None and not any(isinstance(v, ClassLabel) for v in features.values()):
        named = [k for k in ("label", "labels") if k in features and _plain_labels(features[k])]
        if len(named) == 1:  # both: ambiguous, ask
            return named[0]
    return pick_column(features, "label_column_name", cfg.label_column_name, ClassLabel, "ClassLabel")


def _stream_labels(cfg, train, evaluation, eval_split: str, label_col: str, plain: bool, show_progress: bool):
    """One pass over each stream's labels: (train values, eval values, class names, shard sizes, label map)."""
    labels_only = label_streams(cfg, label_col, {cfg.train_split: train, eval_split: evaluation})
    train_values, shard_sizes = label_pass(labels_only.get(cfg.train_split, train), label_col,
                                           cfg.max_train_samples, show_progress)
    eval_values, _ = label_pass(labels_only.get(eval_split, evaluation), label_col, cfg.max_eval_samples)
    label_map = None
    if plain:
        label_map, class_names = _class_index(train_values, eval_values)
        train_values, eval_values = ([label_map.get(v, -1) for v in values] for values in (train_values, eval_values))
    else:
        class_names = list(train.features[label_col].names)
    return train_values, eval_values, class_names, shard_sizes, label_map


def _table_labels(cfg, train, evaluation, label_col: str, plain: bool):
    """Map-style splits: (train, eval, train values, eval values, class names, carve), plain labels encoded.

    With no eval split (`evaluation` None), the eval rows are held out of the train split
    (after --max_train_samples, before --max_eval_samples).
    """
    if plain:
        train, evaluation = _encode_labels(train, evaluation, label_col)
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    carve = None
    if evaluation is None:
        train, evaluation, carve = _carve_eval(cfg, train, label_col)
        evaluation = _first_eval_rows(cfg, evaluation, streaming=False)
    class_names = list(train.features[label_col].names)
    return train, evaluation, train[label_col], evaluation[label_col], class_names, carve


def carve_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted rows to hold out: `fraction` of each class (largest remainders fill the total), seeded.

    Every class keeps at least one row for training. The draw has a random stream of its own,
    so it does not echo the labeled draw that uses the same seed.
    """
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * fraction
    take = np.floor(quota).astype(np.int64)
    extra = int(round(len(labels) * fraction)) - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:max(extra, 0)]] += 1
    take = np.minimum(take, counts - 1)
    rng = np.random.default_rng([seed, 0xCA4E])
    held = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, np.int64)


def _carve_eval(cfg, train, label_col: str):
    """(train rows left, held-out eval rows, the carve's record): --train_val_split of each class, seeded."""
    labels = np.asarray(train[label_col])
    with_class = np.flatnonzero(labels >= 0)  # rows without a class cannot be evaluated on
    held = with_class[carve_indices(labels[with_class], cfg.train_val_split, cfg.seed)]
    if not len(held):
        raise UsageError(f"--train_val_split {cfg.train_val_split}: holds out no row of the {len(labels)} rows of "
                         f"--train_split {cfg.train_split!r}; raise it, or name an eval split with --eval_split"
                         + (" or --validation_dir" if cfg.train_dir else ""))
    keep = np.setdiff1d(np.arange(len(labels)), held)
    carve = dict(fraction=cfg.train_val_split, seed=cfg.seed, held_out=len(held))
    return train.select(keep), train.select(held), carve


def _first_eval_rows(cfg, evaluation, streaming: bool):
    if cfg.max_eval_samples is None:
        return evaluation
    if streaming:
        return first_rows(evaluation, cfg.max_eval_samples)
    return evaluation.select(range(min(cfg.max_eval_samples, len(evaluation))))


def _notes(cfg, eval_split: str, carve: Optional[Dict], num_train: int) -> List[str]:
    """Warnings the trainer prints once: evaluating on training rows, or where the eval rows came from."""
    if carve is not None:
        return [f"no 'validation' or 'test' split: evaluating on {carve['held_out']} rows held out of "
                f"--train_split {cfg.train_split!r} (--train_val_split {carve['fraction']}, stratified, --seed "
                f"{carve['seed']}); the labeled and unlabeled data are the other {num_train}"]
    same_folder = (cfg.train_dir is not None and cfg.validation_dir is not None
                   and os.path.realpath(cfg.train_dir) == os.path.realpath(cfg.validation_dir))
    if eval_split == cfg.train_split or same_folder:
        return [f"evaluating on the training data ({'--validation_dir' if same_folder else '--eval_split'} "
                f"{cfg.validation_dir if same_folder else eval_split!r}): the scores say how well the model fits the "
                "images it trains on, not how it does on new ones"]
    return []


def load_labeled(cfg, show_progress: bool = False) -> SplitData:
    """Load the train and eval splits, find the image and label columns, read the labels (unlabeled.load_data
    adds the unlabeled source)."""
    from datasets import Image

    streaming = getattr(cfg, "streaming", False)
    train, evaluation, eval_split = _pick_splits(cfg, _load_raw(cfg, streaming))
    image_col, label_col, plain = _pick_columns(cfg, train.features, getattr(evaluation, "features", None),
                                                eval_split)
    # Undecoded: a bad image is skipped and counted by the loaders, never an exception inside datasets.
    train = train.cast_column(image_col, Image(decode=False))
    if evaluation is not None:
        evaluation = _first_eval_rows(cfg, evaluation.cast_column(image_col, Image(decode=False)), streaming)

    label_map, shard_sizes, carve = None, None, None
    if streaming:
        train_values, eval_values, class_names, shard_sizes, label_map = _stream_labels(
            cfg, train, evaluation, eval_split, label_col, plain, show_progress)
    else:
        train, evaluation, train_values, eval_values, class_names, carve = _table_labels(
            cfg, train, evaluation, label_col, plain)
    if carve is not None:  # what config.json and the eval results name as the eval split
        eval_split = f"{cfg.train_split} ({carve['fraction'] * 100:g}% held out, seed {carve['seed']})"
    train_labels, eval_labels = np.asarray(train_values, dtype=np.int64), np.asarray(eval_values, dtype=np.int64)
    _check_label_values(cfg, label_col, class_names, train_labels, eval_labels, eval_split)
    _check_classes(cfg, class_names, train_labels, eval_labels, eval_split)
    return SplitData(train, evaluation, image_col, label_col, class_names, eval_split, train_labels, eval_labels,
                     shard_sizes, label_map, carve, _notes(cfg, eval_split, carve, len(train_labels)))


def _check_label_values(cfg, label_col: str, class_names: List[str], train_labels: np.ndarray,
                        eval_labels: np.ndarray, eval_split: str) -> None:
    """Every label is a class index 0..classes - 1; a train row may have none (-1), an eval row may not."""
    for split, values, lowest in ((cfg.train_split, train_labels, -1), (eval_split, eval_labels, 0)):
        outside = np.flatnonzero((values < lowest) | (values >= len(class_names)))
        if len(outside):
            raise UsageError(f"--label_column_name {label_col!r}: split {split!r} holds the value "
                             f"{values[outside[0]]} (row {outside[0]}), outside the {len(class_names)} classes "
                             f"0..{len(class_names) - 1}")


def _check_classes(cfg, class_names: List[str], train_labels: np.ndarray, eval_labels: np.ndarray,
                   eval_split: str) -> None:
    """The train split must hold two classes or more, and every class the eval split holds."""
    if cfg.train_dir is not None:  # a folder the builder found no image in would silently not be a class
        empty = [d.name for d in os.scandir(cfg.train_dir) if d.is_dir() and not d.name.startswith(".")
                 and d.name not in class_names]
        if empty:
            raise UsageError(f"--train_dir {cfg.train_dir!r}: class folder(s) {', '.join(sorted(empty))} "
                             "hold no images")
    in_train = set(np.unique(train_labels[train_labels >= 0]).tolist())

    def names(ids) -> str:
        return ", ".join(class_names[i] for i in sorted(ids))

    limited = f" (its first {cfg.max_train_samples} rows, --max_train_samples)" if cfg.max_train_samples else ""
    if len(in_train) < 2:
        source = f"--train_dir {cfg.train_dir!r}" if cfg.train_dir else f"--train_split {cfg.train_split!r}"
        raise UsageError(f"{source}{limited} has {len(in_train)} class(es) ({names(in_train)}); FixMatch needs at "
                         f"least 2{' (one subfolder per class)' if cfg.train_dir else ''}")
    eval_only = set(np.unique(eval_labels).tolist()) - in_train
    if eval_only:
        where = (f"--validation_dir {cfg.validation_dir!r}: class folder(s)" if cfg.train_dir
                 else f"--eval_split {eval_split!r}: class(es)")
        raise UsageError(f"{where} {names(eval_only)} not in the train split{limited}, whose classes are "
                         f"{names(in_train)}")


def no_label(value) -> bool:
    """A plain label value that marks a row without a class: None, '' or -1 (HF's ClassLabel and torchvision's)."""
    return value is None or value == "" or (isinstance(value, (int, np.integer)) and value == -1)


def _class_index(*splits):
    """Plain int or string labels -> (value -> class index, class names), sorted by value; no-label values left out."""
    values = sorted(v for v in set().union(*map(set, splits)) if not no_label(v))
    return {v: i for i, v in enumerate(values)}, [str(v) for v in values]


def _encode_labels(train, evaluation, label_col: str):
    """Plain int or string labels -> one ClassLabel shared by both splits (sorted values); `evaluation` may be None."""
    from datasets import ClassLabel

    index, names = _class_index(*(ds.unique(label_col) for ds in (train, evaluation) if ds is not None))
    class_label = ClassLabel(names=names)

    def encode(ds):
        features = ds.features.copy()
        features[label_col] = class_label
        return ds.map(lambda batch: {label_col: [index.get(v, -1) for v in batch[label_col]]}, batched=True,
                      features=features)

    return encode(train), None if evaluation is None else encode(evaluation)
