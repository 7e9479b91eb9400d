"""The labeled split: which train rows keep their labels (drawn class-balanced, or read from a file), and those rows.

The split is a sorted list of train positions (`SplitData.train_labels` order), written
to labeled_split.json so a run, a resume and a later run can use the very same rows.
When eval rows were held out of the train split, the positions count the rows left, and
the file records the hold-out so the same rows are held out again.
"""

import json
from collections import Counter
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import UsageError
from .images import BadImage, decode_image, image_name
from .sources import SplitData
from .streaming import fetch_rows


def select_labeled(labels: Sequence[int], num_labeled, num_classes: int, seed: int,
                   names: Optional[Sequence[str]] = None) -> List[int]:
    """Indices of num_labeled examples, num_labeled / num_classes from each class, drawn with `seed`;
    num_labeled 'all': every row with a class (label >= 0)."""
    if num_labeled == "all":
        return [int(i) for i in np.flatnonzero(np.asarray(labels) >= 0)]
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
        try:
            return select_labeled(data.train_labels, cfg.num_labeled, data.num_classes, cfg.seed, data.class_names)
        except UsageError as e:
            if data.carve is None:
                raise
            raise UsageError(f"{e}, in the train rows left after holding out {data.carve['held_out']} for evaluation "
                             f"(--train_val_split {data.carve['fraction']})") from None
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
    if isinstance(record.get("per_class"), dict):  # a file we wrote: it may record a hold-out
        _check_same_carve(where, record.get("train_val_split"), data.carve)
    n = data.num_train
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < n]
    if bad or not indices:
        raise UsageError(f"{where}: indices must be integers in [0, {n}), got e.g. {bad[:3] or indices}")
    repeated = [i for i, count in Counter(indices).items() if count > 1]
    if repeated:
        raise UsageError(f"{where}: index {repeated[0]} appears more than once")
    classless = [i for i in indices if data.train_labels[i] < 0]
    if classless:
        raise UsageError(f"{where}: row {classless[0]} has no class label; a labeled example needs one")
    saved = record.get("per_class")
    if isinstance(saved, dict):  # a file we wrote: its indices must still hold the labels it counted
        labels = data.train_labels[indices]
        found = {name: int(np.sum(labels == c)) for c, name in enumerate(data.class_names)}
        if {k: v for k, v in found.items() if v} != {k: v for k, v in saved.items() if v}:
            raise UsageError(f"{where}: its indices hold other labels in this data than when "
                             f"it was saved (per class then {saved}, now {found}); was it made for another dataset, "
                             f"train split or --max_train_samples?")
    return sorted(int(i) for i in indices)  # the order a drawn split has (and a stream's rows are fetched in)


def _check_same_carve(where: str, saved: Optional[Dict], carve: Optional[Dict]) -> None:
    """A saved split's indices mean the same rows only when the same eval rows were held out of train."""
    if saved == carve:
        return

    def held(c) -> str:
        return (f"{c.get('held_out')} eval rows held out of the train split (--train_val_split "
                f"{c.get('fraction')}, --seed {c.get('seed')})" if isinstance(c, dict)
                else "no rows held out of the train split")

    raise UsageError(f"{where}: its indices count the train rows left with {held(saved)}, this run has "
                     f"{held(carve)}")


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
        if cfg.labeled_split_file is not None or cfg.num_labeled == "all":  # nothing to redraw from: left out
            gone = {i for i, _, _ in found}
            indices = [i for i in indices if i not in gone]
            if not indices:
                where = (f"--labeled_split_file {cfg.labeled_split_file!r}" if cfg.labeled_split_file is not None
                         else "--num_labeled all")
                raise UsageError(f"{where}: no labeled image can be decoded")
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
            row[data.label_column] = data.label_map.get(row[data.label_column], -1)
    return Dataset.from_list(fetched, features=features)


def save_labeled_split(path: str, indices: List[int], cfg, data: SplitData) -> None:
    labels = data.train_labels[indices]
    record = dict(
        dataset=cfg.dataset_name or cfg.train_dir,
        train_split=cfg.train_split,
        seed=cfg.seed,
        num_labeled=len(indices),
        per_class={name: int(np.sum(labels == c)) for c, name in enumerate(data.class_names)},
    )
    if data.carve is not None:  # eval rows held out of the train split: the indices count the rows left
        record["train_val_split"] = data.carve
    record["indices"] = indices
    if cfg.labeled_split_file is not None:  # read, not drawn now: keep the seed that drew it
        with open(cfg.labeled_split_file) as f:
            record.update(seed=json.load(f).get("seed"), labeled_split_file=cfg.labeled_split_file)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
