"""Loading, column detection, the class-balanced labeled split, and the torch datasets.

Every loader yields uint8 images [C, H, W] of one size; normalisation happens on
the training device, so the host moves a quarter of the bytes that float32 would.
"""

import importlib.util
import io
import json
import os
import random
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image as PILImage
from torchvision.transforms.functional import pil_to_tensor

from .errors import UsageError


@dataclass
class SplitData:
    """What the trainer needs to know about the loaded data.

    `train` and `eval` hold images undecoded (see decode_image): a datasets.Dataset,
    or with --streaming a datasets.IterableDataset. `train_labels` are the class
    indices of the train split in order (the positions the labeled split refers to).
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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def streaming(self) -> bool:
        return self.shard_sizes is not None


def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images [1797, 8, 8] (values 0..16) and labels.

    Read from the package's own CSV, as load_digits reads it, without importing scikit-learn:
    that import (scipy with it) took 1.5 s of every digits run.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = (Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
           if spec is not None and spec.submodule_search_locations else None)
    if csv is None or not csv.is_file():  # another layout: ask scikit-learn itself
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    data = np.loadtxt(csv, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load_digits_dataset():
    """scikit-learn's bundled 8x8 digits as a DatasetDict with a fixed stratified 25% test split.

    The split is scikit-learn's train_test_split(test_size=0.25, stratify=labels, random_state=0),
    stored in digits_split.json (tests/test_data.py recomputes it): the same rows and order
    whatever scikit-learn version is installed.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    images, target = _digits_arrays()
    pixels = np.round(images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    split = json.loads((Path(__file__).with_name("digits_split.json")).read_text())
    train_idx, test_idx = np.array(split["train"]), np.array(split["test"])
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def build(idx):
        images = [PILImage.fromarray(pixels[i]).convert("RGB") for i in idx]
        return Dataset.from_dict({"image": images, "label": target[idx].tolist()}, features=features)

    return DatasetDict(train=build(train_idx), test=build(test_idx))


def _load_raw(cfg, streaming: bool = False):
    from datasets import IterableDatasetDict, load_dataset

    if cfg.train_dir is not None:
        for flag, path in (("--train_dir", cfg.train_dir), ("--validation_dir", cfg.validation_dir)):
            if path is not None and not os.path.isdir(path):
                raise UsageError(f"{flag} {path!r}: no such folder")
        # One builder call for both folders, so both splits share one class list. drop_labels=False: by
        # default the builder drops the class folders when the two folders lie at different depths.
        files = {"train": os.path.join(cfg.train_dir, "**")}
        if cfg.validation_dir is not None:
            files["validation"] = os.path.join(cfg.validation_dir, "**")
        try:
            return load_dataset("imagefolder", data_files=files, drop_labels=False, streaming=streaming)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--train_dir {cfg.train_dir!r}: {str(e).splitlines()[0]}") from None

    name = cfg.dataset_name
    if name == "digits":
        digits = load_digits_dataset()
        if streaming:  # four shards, so that the streaming path can be tried on it
            return IterableDatasetDict({k: v.to_iterable_dataset(num_shards=4) for k, v in digits.items()})
        return digits
    path = os.path.expanduser(name)
    # a path, not a hub id: it starts like one, or its first part is a folder here
    local = name.startswith(("/", "./", "../", "~")) or ("/" in name and os.path.isdir(name.split("/")[0]))
    if local and not os.path.exists(path):
        raise UsageError(f"--dataset_name {name!r}: no such folder")
    if os.path.isfile(path):
        raise UsageError(f"--dataset_name {name!r} is a file: give the folder that holds the dataset's files "
                         "(its train and validation/test splits)")
    try:
        return load_dataset(path, cfg.dataset_config_name, streaming=streaming)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        raise UsageError(f"--dataset_name {name!r}: {str(e).splitlines()[0]}") from None


def _pick_column(features, flag: str, given: Optional[str], feature_type, kind: str) -> str:
    if given is not None:
        if given not in features:
            raise UsageError(f"--{flag} {given!r}: no such column (columns: {', '.join(features)})")
        return given
    found = [k for k, v in features.items() if isinstance(v, feature_type)]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(found)})"
        raise UsageError(f"found {what} {kind} columns among {', '.join(features)}: name one with --{flag}")
    return found[0]


def _yield_from(stream):
    yield from stream


def _first_rows(stream, n: int):
    """The first n rows of a stream, as a stream of one piece.

    `take(n)` keeps the stream's pieces, and split_dataset_by_node would then give each process
    the first n / processes rows of its own pieces, not its share of the first n; a stream of one
    piece is split row by row (each process reads the n rows and keeps every k-th).
    """
    from datasets import IterableDataset

    taken = stream.take(n)
    return IterableDataset.from_generator(_yield_from, gen_kwargs=dict(stream=taken), features=taken.features)


def load_data(cfg, show_progress: bool = False) -> SplitData:
    """Load the train and eval splits, find the image and label columns, read the labels."""
    from datasets import ClassLabel, Image, Value

    streaming = getattr(cfg, "streaming", False)
    raw = _load_raw(cfg, streaming)
    if cfg.train_split not in raw:
        raise UsageError(f"--train_split {cfg.train_split!r}: no such split (splits: {', '.join(raw)})")
    eval_split = cfg.eval_split
    if eval_split is None:
        eval_split = next((s for s in ("validation", "test") if s in raw), None)
        if eval_split is None:
            raise UsageError(
                f"no 'validation' or 'test' split (splits: {', '.join(raw)}): name one with --eval_split"
                + (" or give --validation_dir" if cfg.train_dir else "")
            )
    elif eval_split not in raw:
        raise UsageError(f"--eval_split {eval_split!r}: no such split (splits: {', '.join(raw)})")

    train, evaluation = raw[cfg.train_split], raw[eval_split]
    features = train.features
    if features is None:
        raise UsageError(f"--dataset_name {cfg.dataset_name!r}: the stream does not declare its features; "
                         "load it without --streaming or give it typed columns (Image, ClassLabel)")
    image_col = _pick_column(features, "image_column_name", cfg.image_column_name, Image, "Image")
    label_col = _pick_column(features, "label_column_name", cfg.label_column_name, ClassLabel, "ClassLabel")
    if not isinstance(features[image_col], Image):
        raise UsageError(f"--image_column_name {image_col!r} holds {features[image_col]}, not images")
    for column in (image_col, label_col):
        if evaluation.features is not None and column not in evaluation.features:
            raise UsageError(f"eval split {eval_split!r} has no column {column!r} "
                             f"(columns: {', '.join(evaluation.features)})")
    plain = not isinstance(features[label_col], ClassLabel)
    if plain:
        dtype = getattr(features[label_col], "dtype", None)
        if not isinstance(features[label_col], Value) or not (dtype.startswith(("int", "uint")) or dtype == "string"):
            raise UsageError(f"--label_column_name {label_col!r} holds {features[label_col]}, not class labels")
    # Undecoded: a bad image is skipped and counted by the loaders, never an exception inside datasets.
    train = train.cast_column(image_col, Image(decode=False))
    evaluation = evaluation.cast_column(image_col, Image(decode=False))
    if cfg.max_eval_samples is not None:
        evaluation = (_first_rows(evaluation, cfg.max_eval_samples) if streaming
                      else evaluation.select(range(min(cfg.max_eval_samples, len(evaluation)))))

    label_map, shard_sizes = None, None
    if streaming:
        from .streaming import label_pass

        labels_only = _label_streams(cfg, label_col, {cfg.train_split: train, eval_split: evaluation})
        train_values, shard_sizes = label_pass(labels_only.get(cfg.train_split, train), label_col,
                                               cfg.max_train_samples, show_progress)
        eval_values, _ = label_pass(labels_only.get(eval_split, evaluation), label_col, cfg.max_eval_samples)
        if plain:
            label_map, class_names = _class_index(train_values, eval_values)
            train_values, eval_values = [label_map[v] for v in train_values], [label_map[v] for v in eval_values]
        else:
            class_names = list(features[label_col].names)
    else:
        if plain:
            train, evaluation = _encode_labels(train, evaluation, label_col)
        if cfg.max_train_samples is not None:
            train = train.select(range(min(cfg.max_train_samples, len(train))))
        class_names = list(train.features[label_col].names)
        train_values, eval_values = train[label_col], evaluation[label_col]
    train_labels, eval_labels = np.asarray(train_values, dtype=np.int64), np.asarray(eval_values, dtype=np.int64)
    for split, values in ((cfg.train_split, train_labels), (eval_split, eval_labels)):
        outside = np.flatnonzero((values < 0) | (values >= len(class_names)))
        if len(outside):
            raise UsageError(f"--label_column_name {label_col!r}: split {split!r} holds the value "
                             f"{values[outside[0]]} (row {outside[0]}), outside the {len(class_names)} classes "
                             f"0..{len(class_names) - 1}")
    _check_classes(cfg, class_names, train_labels, eval_labels, eval_split)
    return SplitData(train, evaluation, image_col, label_col, class_names, eval_split, train_labels, eval_labels,
                     shard_sizes, label_map)


def _check_classes(cfg, class_names: List[str], train_labels: np.ndarray, eval_labels: np.ndarray,
                   eval_split: str) -> None:
    """The train split must hold two classes or more, and every class the eval split holds."""
    if cfg.train_dir is not None:  # a folder the builder found no image in would silently not be a class
        empty = [d.name for d in os.scandir(cfg.train_dir) if d.is_dir() and not d.name.startswith(".")
                 and d.name not in class_names]
        if empty:
            raise UsageError(f"--train_dir {cfg.train_dir!r}: class folder(s) {', '.join(sorted(empty))} hold no images")
    in_train = set(np.unique(train_labels).tolist())

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


def _label_streams(cfg, label_col: str, streams: Dict) -> Dict:
    """The same splits read with only the label column, where the builder can skip the others on disk.

    Parquet (the hub's format) takes `columns=`, so the label pass does not read the image
    bytes of a large split. Other builders refuse the argument: then {} (the label pass
    selects the column from whole rows). A split is used only if it has the same shards.
    """
    from datasets import load_dataset

    if cfg.train_dir is not None or cfg.dataset_name == "digits":
        return {}
    try:
        raw = load_dataset(os.path.expanduser(cfg.dataset_name), cfg.dataset_config_name, streaming=True,
                           columns=[label_col])
    except Exception:  # the builder takes no `columns`: read whole rows
        return {}
    return {name: raw[name] for name, stream in streams.items()
            if name in raw and raw[name].n_shards == stream.n_shards and list(raw[name].features) == [label_col]}


def _class_index(*splits):
    """Plain int or string labels -> (value -> class index, class names), sorted by value."""
    values = sorted(set().union(*map(set, splits)))
    return {v: i for i, v in enumerate(values)}, [str(v) for v in values]


def _encode_labels(train, evaluation, label_col: str):
    """Plain int or string labels -> one ClassLabel shared by both splits (sorted values)."""
    from datasets import ClassLabel

    index, names = _class_index(train.unique(label_col), evaluation.unique(label_col))
    class_label = ClassLabel(names=names)

    def encode(ds):
        features = ds.features.copy()
        features[label_col] = class_label
        return ds.map(lambda batch: {label_col: [index[v] for v in batch[label_col]]}, batched=True, features=features)

    return encode(train), encode(evaluation)


def select_labeled(labels: Sequence[int], num_labeled: int, num_classes: int, seed: int,
                   names: Optional[Sequence[str]] = None) -> List[int]:
    """Indices of num_labeled examples, num_labeled / num_classes from each class, drawn with `seed`."""
    if num_labeled % num_classes:
        raise UsageError(f"--num_labeled {num_labeled} is not a multiple of the number of classes ({num_classes})")
    per_class = num_labeled // num_classes
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise UsageError(
                f"--num_labeled {num_labeled} needs {per_class} examples of each class, "
                f"but class {c if names is None else repr(names[c])} has only {len(members)}"
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return sorted(int(i) for i in np.concatenate(chosen))


def labeled_split(cfg, data: SplitData, source: Optional[str] = None) -> List[int]:
    """The labeled indices: read from --labeled_split_file, else drawn class-balanced.

    `source` names the file in errors when it is not the user's flag (a checkpoint's split).
    """
    if cfg.labeled_split_file is None:
        return select_labeled(data.train_labels, cfg.num_labeled, data.num_classes, cfg.seed, data.class_names)
    path = cfg.labeled_split_file
    where = source or f"--labeled_split_file {path!r}"
    try:
        with open(path) as f:
            record = json.load(f)
        indices = record["indices"]
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UsageError(f"{where}: not a labeled_split.json (needs an 'indices' list)") from None
    except OSError as e:  # a folder, unreadable
        raise UsageError(f"{where}: cannot read it ({e.strerror})") from None
    if not isinstance(indices, list):
        raise UsageError(f"{where}: not a labeled_split.json (needs an 'indices' list)")
    n = data.num_train
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < n]
    if bad or not indices:
        raise UsageError(f"{where}: indices must be integers in [0, {n}), got e.g. {bad[:3] or indices}")
    repeated = [i for i, count in Counter(indices).items() if count > 1]
    if repeated:
        raise UsageError(f"{where}: index {repeated[0]} appears more than once")
    saved = record.get("per_class")
    if isinstance(saved, dict):  # a file we wrote: its indices must still hold the labels it counted
        labels = data.train_labels[indices]
        found = {name: int(np.sum(labels == c)) for c, name in enumerate(data.class_names)}
        if {k: v for k, v in found.items() if v} != {k: v for k, v in saved.items() if v}:
            raise UsageError(f"{where}: its indices hold other labels in this data than when "
                             f"it was saved (per class then {saved}, now {found}); was it made for another dataset, "
                             f"train split or --max_train_samples?")
    return sorted(int(i) for i in indices)  # the order a drawn split has (and a stream's rows are fetched in)


def labeled_examples(cfg, data: SplitData, indices: List[int]):
    """The labeled rows as an in-memory map-style dataset, with unreadable images replaced.

    A drawn split redraws (with the same seed) until every chosen image decodes, so it
    stays class-balanced; a split from --labeled_split_file drops them. Returns
    (indices, datasets.Dataset of those rows in the same order, [(index, name, reason)] of bad images).
    """
    labels = data.train_labels.copy()
    bad: List = []
    while True:
        if data.streaming:
            from .streaming import fetch_rows

            rows = _labeled_rows(data, fetch_rows(data.train, data.shard_sizes, indices))
        else:
            rows = data.train.select(indices)
        found = []
        for k, value in enumerate(rows[data.image_column]):
            try:
                decode_image(value)
            except BadImage as e:
                found.append((indices[k], image_name(value, indices[k]), str(e)))
        if not found:
            return indices, rows, bad
        bad += found
        if cfg.labeled_split_file is not None:
            gone = {i for i, _, _ in found}
            indices = [i for i in indices if i not in gone]
            if not indices:
                raise UsageError(f"--labeled_split_file {cfg.labeled_split_file!r}: no labeled image can be decoded")
            continue
        labels[[i for i, _, _ in found]] = -1  # no longer a member of any class
        try:
            indices = select_labeled(labels, cfg.num_labeled, data.num_classes, cfg.seed, data.class_names)
        except UsageError as e:
            raise UsageError(f"{e} readable images ({len(bad)} left out, e.g. {bad[0][1]}: {bad[0][2]})") from None


def _labeled_rows(data: SplitData, fetched: List[Dict]):
    """Fetched stream rows as a Dataset whose labels are class indices, as the map-style split's are.

    Plain int or string labels of a stream are mapped row by row (the unlabeled and eval
    streams do the same); ClassLabel columns already hold the indices.
    """
    from datasets import ClassLabel, Dataset

    features = data.train.features
    if data.label_map is not None:
        features = features.copy()
        features[data.label_column] = ClassLabel(names=data.class_names)
        for row in fetched:
            row[data.label_column] = data.label_map[row[data.label_column]]
    return Dataset.from_list(fetched, features=features)


def save_labeled_split(path: str, indices: List[int], cfg, data: SplitData) -> None:
    labels = data.train_labels[indices]
    record = dict(
        dataset=cfg.dataset_name or cfg.train_dir,
        train_split=cfg.train_split,
        seed=cfg.seed,
        num_labeled=len(indices),
        per_class={name: int(np.sum(labels == c)) for c, name in enumerate(data.class_names)},
        indices=indices,
    )
    if cfg.labeled_split_file is not None:  # read, not drawn now: keep the seed that drew it
        with open(cfg.labeled_split_file) as f:
            record.update(seed=json.load(f).get("seed"), labeled_split_file=cfg.labeled_split_file)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def to_rgb(image: PILImage.Image, size: int) -> PILImage.Image:
    """Any mode (L, LA, RGBA, P, CMYK, I;16, ...) and size -> RGB size x size."""
    if image.mode in ("P", "PA"):  # a palette may carry transparency: go through RGBA, as PIL advises
        image = image.convert("RGBA")
    elif image.mode.startswith("I") or image.mode == "F":  # 16/32-bit grey: scale the range to 8 bits
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        image = PILImage.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), PILImage.BILINEAR)
    return image


class BadImage(Exception):
    """An image that cannot be decoded (corrupt, truncated, not an image)."""


def _open_image(value) -> PILImage.Image:
    """Open (lazily: header only) a datasets Image value stored undecoded: its bytes, else its file."""
    data = value.get("bytes") if isinstance(value, dict) else None
    return PILImage.open(io.BytesIO(data) if data is not None else value["path"])


def decode_image(value) -> PILImage.Image:
    """A datasets Image value stored undecoded ({'bytes', 'path'}), or a PIL image, -> a loaded PIL image.

    Images are stored undecoded so that one bad file raises here, where the loaders
    can skip and count it, instead of inside datasets' own formatting.
    """
    if isinstance(value, PILImage.Image):
        return value
    try:
        image = _open_image(value)
        image.load()  # decode now: a truncated file fails here, not later in a worker's transform
        return image
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise BadImage(f"{type(e).__name__}: {e}") from None


def image_name(value, index: int) -> str:
    """How to name an image in a message: its file when known, else its row."""
    path = value.get("path") if isinstance(value, dict) else None
    return f"{path} (row {index})" if path else f"row {index}"


def image_sizes(dataset, image_column: str, rows: Sequence[int]) -> set:
    """(width, height) of the images at `rows`, from their headers only (no pixel decoding)."""
    sizes = set()
    for value in dataset.select(rows)[image_column]:
        try:
            with _open_image(value) as image:
                sizes.add(image.size)
        except Exception:  # a bad file is reported where it is decoded
            pass
    return sizes


def default_image_size(sizes: set) -> int:
    """The dataset's side when every sampled image has one size (the larger side), else 32."""
    return max(next(iter(sizes))) if len(sizes) == 1 else 32


def stats_rows(n: int, seed: int, max_images: int = 2000) -> List[int]:
    """A seeded sample of row indices for the image size check and the channel statistics."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=min(max_images, n), replace=False))


def channel_stats(dataset, image_column: str, size: int, rows: Optional[Sequence[int]] = None, seed: int = 0):
    """Per-channel mean and std (0..1 units) over `rows` (default: a seeded sample); bad images are left out."""
    if rows is None:
        rows = stats_rows(len(dataset), seed)
    images = []
    for value in dataset.select(rows)[image_column]:
        try:
            images.append(np.asarray(to_rgb(decode_image(value), size), dtype=np.float64))
        except BadImage:
            pass
    if not images:
        raise UsageError(f"none of the {len(rows)} images sampled for the channel statistics could be decoded")
    pixels = np.stack(images) / 255.0
    mean = pixels.mean(axis=(0, 1, 2))
    std = pixels.std(axis=(0, 1, 2)).clip(min=1e-3)
    return [float(m) for m in mean], [float(s) for s in std]


class SampleSeeds:
    """Seeds each sample's CPU augmentation from (seed, loader, epoch, index in the pass).

    PIL / timm / torchvision transforms draw from the global random, numpy and torch
    generators, which DataLoader workers reseed on every pass. Seeding per sample makes
    a draw depend only on what is drawn, so a resumed run repeats it bit for bit and the
    number of workers does not change the result. The epoch lives in shared memory so
    persistent workers see set_epoch.
    """

    def __init__(self, seed: int, stream: int = 0):
        self.seed, self.stream = seed % 2**32, stream  # one stream of seeds per loader
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    @contextmanager
    def __call__(self, index: int):
        a, b = np.random.SeedSequence([self.seed, self.stream, int(self.epoch), int(index)]).generate_state(2)
        saved = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):  # the caller's generators are left as they were
            random.seed(int(a))
            np.random.seed(int(b))
            torch.manual_seed(int(a) << 32 | int(b))
            try:
                yield
            finally:
                random.setstate(saved[0])
                np.random.set_state(saved[1])


class ImageDataset(torch.utils.data.Dataset):
    """Rows `indices` of a datasets.Dataset (images stored undecoded) as (*views, label, row).

    `views` are functions PIL RGB image -> PIL image; each view becomes a uint8
    [C, H, W] tensor. With no view the decoded image itself is returned. An image
    that cannot be decoded comes back as a black filler whose row is -(row + 1);
    `collate_fillers` replaces it with a good sample of its batch, and the trainer
    counts negative rows as skipped images.
    """

    def __init__(self, dataset, indices: Sequence[int], image_column: str, label_column: str,
                 size: int, views: Sequence[Callable] = (), ids: Optional[Sequence[int]] = None,
                 seeds: Optional[SampleSeeds] = None):
        self.dataset = dataset
        self.indices = list(indices)
        self.ids = self.indices if ids is None else list(ids)  # the row reported for each item
        self.image_column, self.label_column = image_column, label_column
        self.size = size
        self.views = list(views) or [lambda im: im]
        self.seeds = seeds

    def set_epoch(self, epoch: int) -> None:
        if self.seeds is not None:
            self.seeds.set_epoch(epoch)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        row = self.dataset[self.indices[i]]
        return sample(row[self.image_column], row[self.label_column], self.ids[i], self.size, self.views,
                      self.seeds, draw=i)



def sample(value, label: int, row: int, size: int, views: Sequence[Callable],
           seeds: Optional[SampleSeeds] = None, draw: int = 0):
    """(*uint8 views, label, row) of one stored image, or a black filler with row -(row + 1) if it is bad.

    With `seeds`, the views' random draws come from seeds(draw) (`draw` unique within a pass).
    """
    try:
        image = to_rgb(decode_image(value), size)
    except BadImage:
        filler = torch.zeros(3, size, size, dtype=torch.uint8)
        return (*(filler for _ in views), label, -(row + 1))
    with seeds(draw) if seeds is not None else nullcontext():
        return (*(pil_to_tensor(view(image)) for view in views), label, row)


def collate_fillers(samples):
    """default_collate, then every filler (row < 0) takes the images and label of the batch's first good sample.

    A batch keeps its static shape; rows stay negative so the bad images are counted
    (and left out of evaluation). Runs in the DataLoader workers, off the training step.
    """
    batch = torch.utils.data.default_collate(samples)
    rows = batch[-1]
    bad = rows < 0
    if bad.any() and not bad.all():
        good = int(torch.nonzero(~bad)[0])
        for part in batch[:-1]:
            part[bad] = part[good].clone()
    return batch


def repeat_to_fill(indices: List[int], batch_size: int) -> List[int]:
    """Repeat a small index list so one pass holds at least one full global batch.

    With 40 labels and a global batch of 64 a plain drop_last loader would be empty;
    repeating the list (as the paper's code does) keeps every pass a fresh shuffle.
    """
    reps = -(-batch_size // len(indices))
    return indices * reps


class DecodedImages(torch.utils.data.Dataset):
    """A split decoded once into one uint8 tensor [N, C, H, W], served by index.

    `__getitems__` lets the DataLoader fetch a whole batch with one tensor index
    instead of collating one sample at a time; pair it with `collate=batch_identity`.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: Sequence[int]):
        self.images, self.labels = images, labels
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        return self.images[j], self.labels[j], j

    def __getitems__(self, batch: List[int]):
        rows = self.indices[torch.as_tensor(batch, dtype=torch.long)]
        return self.images[rows], self.labels[rows], rows


def batch_identity(batch):
    """collate_fn for DecodedImages: its __getitems__ already returns the batch."""
    return batch


def decode_split(dataset, image_column: str, label_column: str, size: int, num_workers: int = 0,
                 show_progress: bool = False):
    """Decode a whole split (any mode, any size) into uint8 [N, 3, size, size] and int64 [N] tensors.

    Returns (images, labels, bad rows); a bad row's image is left black.
    """
    from tqdm.auto import tqdm

    source = ImageDataset(dataset, range(len(dataset)), image_column, label_column, size)
    loader = torch.utils.data.DataLoader(source, batch_size=256, num_workers=num_workers)
    images = torch.zeros(len(dataset), 3, size, size, dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.long)
    bad: List[int] = []
    for batch_images, batch_labels, rows in tqdm(loader, desc="decoding", disable=not show_progress, leave=False):
        good = rows >= 0
        images[rows[good]] = batch_images[good]
        labels[torch.where(good, rows, -rows - 1)] = batch_labels
        bad += (-rows[~good] - 1).tolist()
    return images, labels, bad
