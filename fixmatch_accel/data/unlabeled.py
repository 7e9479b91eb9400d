"""The unlabeled data's source: the train split (the paper's CIFAR protocol), another split or split expression of
the labeled dataset (STL-10's `unlabeled`, `train+unlabeled`), another dataset, or a folder of image files.

Each source has its own row space: its rows are what the unlabeled loader, the bad-image count and an
algorithm's per-example state index. Its true labels (class indices of the labeled data's classes, -1 where
a row has none) only ever feed the pseudo-label accuracy. Another kind of source is one function returning a
`Source`: its rows as a datasets.Dataset (or IterableDataset with its shard sizes) of undecoded images.
"""

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..config import split_names
from ..errors import UsageError
from .images import stats_rows, unreadable_in_sample
from .pipeline import check_bad_images
from .sources import (
    SplitData,
    check_image_column,
    load_labeled,
    load_named_dataset,
    local_path,
    pick_image_column,
)
from .streaming import count_pass, label_pass

SAMPLE = 200  # unlabeled images decoded at set-up (more than MIN_READS, so the budget's fraction applies)


@dataclass
class Source:
    """One source of unlabeled images and its row space."""

    kind: str  # "train" (the labeled train split's own rows), "split", "dataset" or "folder"
    name: str  # what the start line and config.json call it
    dataset: object  # datasets.Dataset, or with --streaming an IterableDataset; images undecoded
    image_column: str
    labels: np.ndarray  # the true class of each row (statistics only), -1 where it has none
    shard_sizes: Optional[List[int]] = None  # streaming: rows in each shard
    other_files: int = 0  # a folder: files that are not images, left out
    # Rows decoded at set-up to stop early on a source of mostly unreadable files: (rows, [(row, name, reason)]).
    sampled: Tuple[List[int], List] = ((), ())

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    @property
    def num_with_label(self) -> int:
        return int(np.sum(self.labels >= 0))

    @property
    def streaming(self) -> bool:
        return self.shard_sizes is not None

    def record(self) -> Dict:
        """What config.json says of it."""
        return dict(kind=self.kind, name=self.name, rows=self.num_rows, with_label=self.num_with_label,
                    **({"other_files": self.other_files} if self.kind == "folder" else {}))

    def describe(self) -> str:
        """The start line: 'unlabeled: 105,000 rows of jxie/stl10 train+unlabeled (100,000 without labels)'."""
        what = "images in" if self.kind == "folder" else "rows of"
        without = self.num_rows - self.num_with_label
        notes = [f"{without:,} without labels" if without else "all with labels"]
        if self.other_files:
            notes.append(f"{self.other_files:,} other file(s) left out")
        return f"unlabeled: {self.num_rows:,} {what} {self.name} ({', '.join(notes)})"


def load_data(cfg, show_progress: bool = False) -> SplitData:
    """The labeled and eval splits (sources.load_labeled) and the unlabeled source."""
    data = load_labeled(cfg, show_progress)
    data.unlabeled = unlabeled_source(cfg, data, show_progress)
    if data.unlabeled.kind != "train" and not data.unlabeled.streaming:
        data.unlabeled.sampled = check_sample(cfg, data.unlabeled)
    return data


def check_sample(cfg, source: Source):
    """Decode a seeded sample of a source of its own at set-up, before anything is written: a folder of mostly
    unreadable files stops here in one line, as labeled data does, not at the first logging step."""
    rows = stats_rows(source.num_rows, cfg.seed, max_images=SAMPLE)
    bad = unreadable_in_sample(source.dataset, source.image_column, rows)
    if bad:
        check_bad_images(len(bad), len(rows), f"{bad[0][1]}: {bad[0][2]}", cfg.max_bad_image_fraction)
    return rows, bad


def unlabeled_source(cfg, data: SplitData, show_progress: bool = False) -> Source:
    if cfg.unlabeled_dir is not None:
        return folder_source(cfg.unlabeled_dir, streaming=data.streaming)
    if cfg.unlabeled_split is not None:
        return split_source(cfg, data, show_progress)
    if cfg.unlabeled_dataset_name is not None:
        return dataset_source(cfg, data, show_progress)
    dataset_name = cfg.train_dir or cfg.dataset_name
    return Source("train", f"{dataset_name} {cfg.train_split}", data.train, data.image_column, data.train_labels,
                  data.shard_sizes)


# --- a folder of image files -----------------------------------------------------------------------------------

def image_extensions() -> frozenset:
    """The file extensions taken as images: those of datasets' imagefolder builder (PIL's formats)."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return frozenset(e.lower() for e in ImageFolder.EXTENSIONS)


def list_images(root: str) -> Tuple[List[str], int]:
    """(sorted paths of the image files under `root`, at any depth; how many other files there are).

    os.scandir, one directory at a time: no glob patterns, which on hundreds of thousands of files
    take minutes. Hidden files and folders are skipped, as datasets' builders do; symlinked folders
    are not followed (a link to a parent would never end), symlinked files are.
    """
    extensions = image_extensions()
    paths: List[str] = []
    other, stack = 0, [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in extensions:
                    paths.append(entry.path)
                else:
                    other += 1
    paths.sort()
    return paths, other


def images_dataset(paths: List[str]):
    """A datasets.Dataset with one undecoded Image column 'image' of these files, built in Arrow directly."""
    import pyarrow as pa
    from datasets import Dataset, Image

    column = pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), pa.array(paths, pa.string())],
                                        names=["bytes", "path"])
    return Dataset(pa.table({"image": column})).cast_column("image", Image(decode=False))


def to_stream(dataset, num_shards: int = 16):
    """A map-style source as a stream of contiguous shards, with its shard sizes (known, no pass)."""
    n = max(1, min(num_shards, len(dataset)))
    sizes = [len(dataset.shard(n, k, contiguous=True)) for k in range(n)]
    return dataset.to_iterable_dataset(num_shards=n), sizes


def folder_source(root: str, streaming: bool = False) -> Source:
    if not os.path.isdir(root):
        raise UsageError(f"--unlabeled_dir {root!r}: no such folder")
    paths, other = list_images(os.path.abspath(root))
    if not paths:
        raise UsageError(f"--unlabeled_dir {root!r}: no image files in it or below it"
                         + (f" ({other} other file(s))" if other else ""))
    dataset, sizes = images_dataset(paths), None
    if streaming:
        dataset, sizes = to_stream(dataset)
    return Source("folder", root, dataset, "image", np.full(len(paths), -1, dtype=np.int64), sizes, other)


# --- a split of the labeled dataset, or another dataset -------------------------------------------------------

def truth_encoder(feature, class_names: List[str]) -> Callable:
    """value of a label column -> class index of the labeled data's classes, -1 for none or an unknown class.

    A ClassLabel column maps by class name (the same dataset: index to itself); plain ints and
    strings by their text, as plain labeled columns name their classes. -1, None and '' are no label.
    """
    from datasets import ClassLabel

    index = {name: i for i, name in enumerate(class_names)}
    if isinstance(feature, ClassLabel):
        to_class = np.array([index.get(name, -1) for name in feature.names] + [-1], dtype=np.int64)
        return lambda v: int(to_class[v]) if v is not None and 0 <= v < len(feature.names) else -1
    return lambda v: -1 if v is None or v == "" or v == -1 else index.get(str(v), -1)


def _truth(dataset, feature, label_col: Optional[str], class_names: List[str], streaming: bool,
           show_progress: bool, image_col: str):
    """(true labels of every row, shard sizes of a stream): one pass over a stream's label column."""
    if streaming:
        values, sizes = (label_pass(dataset, label_col, show_progress=show_progress) if label_col
                         else count_pass(dataset, image_col, show_progress=show_progress))
    else:
        values, sizes = (list(dataset[label_col]) if label_col else [None] * len(dataset)), None
    encode = truth_encoder(feature, class_names) if label_col else (lambda v: -1)
    return np.fromiter((encode(v) for v in values), dtype=np.int64, count=len(values)), sizes


def _image_column(cfg, features, default: Optional[str], where: str) -> str:
    given = cfg.unlabeled_image_column_name or (default if default in features else None)
    try:
        column = pick_image_column(features, given, flag="unlabeled_image_column_name")
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    check_image_column(features, column, flag="unlabeled_image_column_name" if cfg.unlabeled_image_column_name
                       else "image_column_name")
    return column


def _label_column(features, preferred: Optional[str]) -> Optional[str]:
    """The column holding true labels, if any: the labeled data's label column, else one ClassLabel column,
    else a column named 'label' or 'labels'."""
    from datasets import ClassLabel

    if preferred in features:
        return preferred
    found = [k for k, v in features.items() if isinstance(v, ClassLabel)]
    found = found or [k for k in ("label", "labels") if k in features]
    return found[0] if len(found) == 1 else None


def _source_from(cfg, data: SplitData, kind: str, name: str, dataset, show_progress: bool) -> Source:
    from datasets import Image

    streaming = data.streaming
    if dataset.features is None:
        raise UsageError(f"unlabeled data {name}: the stream does not declare its features; load it without "
                         "--streaming or give it typed columns")
    image_col = _image_column(cfg, dataset.features, data.image_column, f"unlabeled data {name}")
    label_col = _label_column(dataset.features, data.label_column)
    feature = dataset.features[label_col] if label_col else None
    labels, sizes = _truth(dataset, feature, label_col, data.class_names, streaming, show_progress, image_col)
    if not len(labels):
        raise UsageError(f"unlabeled data {name}: no rows")
    # Undecoded: a bad image is skipped and counted by the loaders, never an exception inside datasets.
    dataset = dataset.cast_column(image_col, Image(decode=False))
    return Source(kind, name, dataset, image_col, labels, sizes)


def split_source(cfg, data: SplitData, show_progress: bool) -> Source:
    """--unlabeled_split EXPR: a split (or 'a+b', slices too) of --dataset_name."""
    from datasets import concatenate_datasets, load_dataset

    expr, streaming = cfg.unlabeled_split, data.streaming
    raw = load_named_dataset(cfg.dataset_name, cfg.dataset_config_name, streaming)
    missing = [s for s in split_names(expr) if s not in raw]
    if missing:
        raise UsageError(f"--unlabeled_split {expr!r}: no split {', '.join(map(repr, missing))} in --dataset_name "
                         f"{cfg.dataset_name!r} (splits: {', '.join(raw)})")
    if data.carve is not None and cfg.train_split in split_names(expr):
        raise UsageError(f"--unlabeled_split {expr!r} holds --train_split {cfg.train_split!r}, out of which the eval "
                         "rows were held out: name an eval split with --eval_split")
    parts = split_names(expr)
    if len(parts) == 1 and "[" not in expr:
        dataset = raw[parts[0]]
    elif cfg.dataset_name == "digits":  # in memory, not a builder: plain concatenation only
        if "[" in expr:
            raise UsageError(f"--unlabeled_split {expr!r}: the digits set takes split names joined by '+', no slices")
        dataset = concatenate_datasets([raw[p] for p in parts])
    else:
        try:
            dataset = load_dataset(local_path(cfg.dataset_name), cfg.dataset_config_name, split=expr,
                                   streaming=streaming)
        except (ValueError, NotImplementedError, TypeError) as e:
            hint = " (this datasets version streams only unsliced 'a+b')" if streaming else ""
            raise UsageError(f"--unlabeled_split {expr!r}: {str(e).splitlines()[0]}{hint}") from None
    return _source_from(cfg, data, "split", f"{cfg.dataset_name} {expr}", dataset, show_progress)


def dataset_source(cfg, data: SplitData, show_progress: bool) -> Source:
    """--unlabeled_dataset_name: its 'train' split, else its only split."""
    name = cfg.unlabeled_dataset_name
    try:
        raw = load_named_dataset(name, cfg.unlabeled_dataset_config_name, data.streaming)
    except UsageError as e:
        raise UsageError(str(e).replace("--dataset_name", "--unlabeled_dataset_name", 1)) from None
    split = "train" if "train" in raw else (next(iter(raw)) if len(raw) == 1 else None)
    if split is None:
        raise UsageError(f"--unlabeled_dataset_name {name!r}: no 'train' split and more than one other "
                         f"(splits: {', '.join(raw)}); give the one to use as --unlabeled_dataset_name's only split")
    return _source_from(cfg, data, "dataset", f"{name} {split}", raw[split], show_progress)
