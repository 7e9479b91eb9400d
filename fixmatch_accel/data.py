"""Loading, column detection, the class-balanced labeled split, and the torch datasets.

Every loader yields uint8 images [C, H, W] of one size; normalisation happens on
the training device, so the host moves a quarter of the bytes that float32 would.
"""

import json
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image as PILImage
from torchvision.transforms.functional import pil_to_tensor

from .errors import UsageError


@dataclass
class SplitData:
    """What the trainer needs to know about the loaded data."""

    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset"  # noqa: F821
    image_column: str
    label_column: str
    class_names: List[str]
    eval_split: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_digits_dataset():
    """scikit-learn's bundled 8x8 digits as a DatasetDict with a fixed stratified 25% test split."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    train_idx, test_idx = train_test_split(
        np.arange(len(pixels)), test_size=0.25, stratify=digits.target, random_state=0
    )
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def build(idx):
        images = [PILImage.fromarray(pixels[i]).convert("RGB") for i in idx]
        return Dataset.from_dict({"image": images, "label": digits.target[idx].tolist()}, features=features)

    return DatasetDict(train=build(train_idx), test=build(test_idx))


def _load_raw(cfg):
    from datasets import load_dataset

    if cfg.train_dir is not None:
        for flag, path in (("--train_dir", cfg.train_dir), ("--validation_dir", cfg.validation_dir)):
            if path is not None and not os.path.isdir(path):
                raise UsageError(f"{flag} {path!r}: no such folder")
        # One builder call for both folders, so both splits share one class list.
        files = {"train": os.path.join(cfg.train_dir, "**")}
        if cfg.validation_dir is not None:
            files["validation"] = os.path.join(cfg.validation_dir, "**")
        try:
            return load_dataset("imagefolder", data_files=files)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--train_dir {cfg.train_dir!r}: {str(e).splitlines()[0]}") from None

    name = cfg.dataset_name
    if name == "digits":
        return load_digits_dataset()
    if name.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(name)):
        raise UsageError(f"--dataset_name {name!r}: no such folder")
    try:
        return load_dataset(os.path.expanduser(name), cfg.dataset_config_name)
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


def load_data(cfg) -> SplitData:
    """Load the train and eval splits and find the image and label columns."""
    from datasets import ClassLabel, Image, Value

    raw = _load_raw(cfg)
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
    image_col = _pick_column(features, "image_column_name", cfg.image_column_name, Image, "Image")
    label_col = _pick_column(features, "label_column_name", cfg.label_column_name, ClassLabel, "ClassLabel")
    if not isinstance(features[image_col], Image):
        raise UsageError(f"--image_column_name {image_col!r} holds {features[image_col]}, not images")
    if label_col not in evaluation.features:
        raise UsageError(f"eval split {eval_split!r} has no column {label_col!r} (columns: {', '.join(evaluation.features)})")
    if not isinstance(features[label_col], ClassLabel):
        dtype = getattr(features[label_col], "dtype", None)
        if not isinstance(features[label_col], Value) or not (dtype.startswith(("int", "uint")) or dtype == "string"):
            raise UsageError(f"--label_column_name {label_col!r} holds {features[label_col]}, not class labels")
        train, evaluation = _encode_labels(train, evaluation, label_col)

    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(cfg.max_eval_samples, len(evaluation))))
    class_names = list(train.features[label_col].names)
    if len(class_names) < 2:
        raise UsageError(f"the label column {label_col!r} has {len(class_names)} class(es); FixMatch needs at least 2")
    return SplitData(train, evaluation, image_col, label_col, class_names, eval_split)


def _encode_labels(train, evaluation, label_col: str):
    """Plain int or string labels -> one ClassLabel shared by both splits (sorted values)."""
    from datasets import ClassLabel

    values = sorted(set(train.unique(label_col)) | set(evaluation.unique(label_col)))
    index = {v: i for i, v in enumerate(values)}
    class_label = ClassLabel(names=[str(v) for v in values])

    def encode(ds):
        features = ds.features.copy()
        features[label_col] = class_label
        return ds.map(lambda batch: {label_col: [index[v] for v in batch[label_col]]}, batched=True, features=features)

    return encode(train), encode(evaluation)


def select_labeled(labels: Sequence[int], num_labeled: int, num_classes: int, seed: int) -> List[int]:
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
                f"but class {c} has only {len(members)}"
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return sorted(int(i) for i in np.concatenate(chosen))


def labeled_split(cfg, data: SplitData) -> List[int]:
    """The labeled indices: read from --labeled_split_file, else drawn class-balanced."""
    if cfg.labeled_split_file is None:
        labels = data.train[data.label_column]
        return select_labeled(labels, cfg.num_labeled, data.num_classes, cfg.seed)
    path = cfg.labeled_split_file
    try:
        with open(path) as f:
            indices = json.load(f)["indices"]
    except FileNotFoundError:
        raise UsageError(f"--labeled_split_file {path!r}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f"--labeled_split_file {path!r}: not a labeled_split.json (needs an 'indices' list)") from None
    n = len(data.train)
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < n]
    if bad or not indices:
        raise UsageError(f"--labeled_split_file {path!r}: indices must be integers in [0, {n}), got e.g. {bad[:3] or indices}")
    return [int(i) for i in indices]


def save_labeled_split(path: str, indices: List[int], cfg, data: SplitData) -> None:
    labels = data.train.select(indices)[data.label_column]
    record = dict(
        dataset=cfg.dataset_name or cfg.train_dir,
        train_split=cfg.train_split,
        seed=cfg.seed,
        num_labeled=len(indices),
        per_class={name: int(np.sum(np.asarray(labels) == c)) for c, name in enumerate(data.class_names)},
        indices=indices,
    )
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def to_rgb(image: PILImage.Image, size: int) -> PILImage.Image:
    """Any mode and size -> RGB size x size."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), PILImage.BILINEAR)
    return image


def native_size(dataset, image_column: str) -> int:
    """The first image's larger side: the default --image_size."""
    return max(dataset[0][image_column].size)


def channel_stats(dataset, image_column: str, size: int, max_images: int = 2000, seed: int = 0):
    """Per-channel mean and std (0..1 units) over a seeded sample of the split."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(dataset), size=min(max_images, len(dataset)), replace=False)
    pixels = np.stack(
        [np.asarray(to_rgb(im, size), dtype=np.float64) for im in dataset.select(np.sort(idx))[image_column]]
    ) / 255.0
    mean = pixels.mean(axis=(0, 1, 2))
    std = pixels.std(axis=(0, 1, 2)).clip(min=1e-3)
    return [float(m) for m in mean], [float(s) for s in std]


class ImageDataset(torch.utils.data.Dataset):
    """Rows `indices` of a datasets.Dataset as (*views, label, row index).

    `views` are functions PIL RGB image -> PIL image; each view becomes a uint8
    [C, H, W] tensor. With no view the decoded image itself is returned.
    """

    def __init__(self, dataset, indices: Sequence[int], image_column: str, label_column: str,
                 size: int, views: Sequence[Callable] = ()):
        self.dataset = dataset
        self.indices = list(indices)
        self.image_column, self.label_column = image_column, label_column
        self.size = size
        self.views = list(views) or [lambda im: im]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        row = self.dataset[self.indices[i]]
        image = to_rgb(row[self.image_column], self.size)
        return (*(pil_to_tensor(view(image)) for view in self.views), row[self.label_column], self.indices[i])


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
    """Decode a whole split (any mode, any size) into (uint8 [N, 3, size, size], int64 [N]) tensors."""
    from tqdm.auto import tqdm

    source = ImageDataset(dataset, range(len(dataset)), image_column, label_column, size)
    loader = torch.utils.data.DataLoader(source, batch_size=256, num_workers=num_workers)
    images = torch.empty(len(dataset), 3, size, size, dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.long)
    for batch_images, batch_labels, rows in tqdm(loader, desc="decoding", disable=not show_progress, leave=False):
        images[rows] = batch_images
        labels[rows] = batch_labels
    return images, labels
