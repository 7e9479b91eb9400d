"""The training data of a run: loaders by name over the labeled, unlabeled and eval data, the decoded cache,
the bad-image budget."""

import atexit
import multiprocessing
import os
import signal
from functools import partial
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from .. import augment
from ..errors import UsageError
from ..xla import is_xla
from .images import image_name
from .loaders import (
    DecodedImages,
    ImageDataset,
    SampleSeeds,
    batch_identity,
    collate_fillers,
    decode_split,
    repeat_to_fill,
)
from .padding import PaddedToMultiple, padded_collate
from .rows import unreadable_mask, unreadable_source_row
from .streaming import StreamImages, StreamLoader, batches_per_pass, fetch_rows, unlabeled_stream

# What schedulers send to a whole process group to stop a job (SIGUSR1: Slurm's --signal warning).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


def leave_stop_to_trainer(worker_id: int) -> None:
    """DataLoader workers ignore the stop signals: the trainer finishes its step and checkpoints, then its workers
    end with it (a worker killed by the group's signal would crash the trainer first)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _end_workers_at_exit() -> None:
    """SIGKILL the worker processes still alive when the trainer exits (after an error, a loader's workers may be).

    multiprocessing's own exit handler sends its daemon children SIGTERM, which the workers now
    ignore, and then waits for them: the trainer would never exit, and a peer waiting for it would
    hang. atexit runs this first (registered after multiprocessing's handler).
    """
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def num_workers(cfg) -> int:
    return min(cfg.dataloader_num_workers, os.cpu_count() or 1)


# The fraction is taken of at least this many reads, so that at the default 1% a single bad file never stops a run
# (a redrawn labeled image was "1 of 9 read"), while a folder of mostly unreadable files still stops at set-up.
MIN_READS = 100


def check_bad_images(count: int, read: int, example, max_fraction: float) -> None:
    """Stop when more than --max_bad_image_fraction of the images read (at least MIN_READS) could not be decoded.

    `example` names one of them: a string, or a function called only when stopping (naming
    a stream's image means reading its shard again).
    """
    if count > max_fraction * max(read, MIN_READS):
        named = example() if callable(example) else example
        raise UsageError(f"{count} of {read} images read could not be decoded ({count / max(read, 1):.2%} > "
                         f"--max_bad_image_fraction {max_fraction}), e.g. {named}")


class BadImages:
    """Unreadable training images, each counted once however often it is read: the budget's figures are distinct
    images, the same on every process, across passes and resumes.

    Before training, `read` records each row read (labeled examples, the statistics sample, the decoded
    cache) once, with the unreadable ones, in its row space: 'train' (the labeled train split) or
    'unlabeled' (the unlabeled source; the same space when that source is the train split). During
    training the loaders replace unreadable unlabeled images; `note` marks their rows in a device bitmap
    (no host sync), which a logging step that saw one reduces over processes into the checkpointed
    TrainState.bad_rows.
    """

    def __init__(self, cfg, data, print_fn: Callable, device=None):
        self.cfg, self.data, self.print = cfg, data, print_fn
        self.same_space = data.unlabeled is None or data.unlabeled.kind == "train"
        self.rows_read: set = set()  # (space, row)
        self.unreadable: Dict[Tuple[str, int], Tuple[int, str, str]] = {}  # (space, row) -> (row, name, reason)
        num_rows = data.unlabeled.num_rows if data.unlabeled is not None else data.num_train
        self.seen = torch.zeros(num_rows, dtype=torch.uint8, device=device)  # unlabeled rows found bad this window
        if data.unlabeled is not None:  # the unlabeled source's set-up sample
            self.read(*data.unlabeled.sampled, space="unlabeled")

    def _space(self, space: str) -> str:
        return "train" if space == "unlabeled" and self.same_space else space

    def read(self, rows: Iterable[int], unreadable: Iterable[Tuple[int, str, str]], space: str = "train") -> None:
        space = self._space(space)
        self.rows_read.update((space, int(r)) for r in rows)
        for bad in unreadable:
            self.rows_read.add((space, bad[0]))
            self.unreadable.setdefault((space, bad[0]), bad)

    @property
    def checked(self) -> int:
        return len(self.rows_read)

    def note(self, rows) -> None:
        """Mark the unlabeled rows a training batch replaced (negative rows, rows.py); on the device, no sync."""
        bad = unreadable_mask(rows)
        self.seen.scatter_reduce_(0, torch.where(bad, unreadable_source_row(rows), 0), bad.to(torch.uint8), "amax")

    def _distinct_read(self, state) -> int:
        """Rows read so far: those read before training, and the unlabeled rows the training passes have drawn
        (all of them once a pass is done; before, at most as many as drawn)."""
        space = self._space("unlabeled")
        before = sum(1 for s, _ in self.rows_read if s == space)
        num_rows = len(self.seen)
        return self.checked - before + min(num_rows, before + int(state.unlabeled_seen))

    def total(self, state) -> int:
        """Distinct unreadable training images found so far (before training and since)."""
        space = self._space("unlabeled")
        return len(set(self.unreadable) | {(space, r) for r in state.bad_rows})

    def check_setup(self, detail: str = "") -> None:
        """Stop when too many of the images read before training were unreadable, else say once what was skipped."""
        found = list(self.unreadable.values())
        if found:
            row, name, reason = found[0]
            check_bad_images(len(found), self.checked, f"{name}: {reason}", self.cfg.max_bad_image_fraction)
            self.print(f"skipped {len(found)} unreadable image(s) of {self.checked} read"
                       f"{f' ({detail})' if detail else ''}, e.g. {name}: {reason}")

    def check_training(self, state, row: int, accelerator) -> None:
        """At a logging step whose window replaced an image (on every process): the window's bad rows join
        state.bad_rows; name one (`row`); stop when too many of the distinct images read were bad."""
        seen = accelerator.reduce(self.seen.to(torch.int32), reduction="sum")
        new = seen.nonzero().flatten().tolist()  # a host sync, at a logging step that found a bad image
        self.seen.zero_()
        state.bad_rows = sorted(set(state.bad_rows) | set(new))
        source = self.data.unlabeled
        if source.streaming:
            example = f"position {row} of the unlabeled stream {source.name}"

            def named():  # its file: the shard read again, only when stopping
                return image_name(fetch_rows(source.dataset, source.shard_sizes, [row])[0][source.image_column], row)
        else:
            example = named = image_name(source.dataset[row][source.image_column], row)
        total = self.total(state)
        check_bad_images(total, self._distinct_read(state), named, self.cfg.max_bad_image_fraction)
        self.print(f"skipped {total} unreadable image(s) so far, e.g. {example}")


def decode_cache(cfg, data, labeled_rows, size: int, show_progress: bool, interpolation: str = "bilinear"):
    """Decode the labeled, unlabeled and eval data into uint8 tensors.

    Returns ({name: (images, labels, usable rows)}, unreadable unlabeled images [(row, name, reason)],
    unreadable eval images, unlabeled images read). When the unlabeled source is the train split, the
    labeled examples are its rows (decoded once); else the labeled rows are decoded on their own.
    """
    source, bad = data.unlabeled, {}
    splits = dict(unlabeled=(source.dataset, source.image_column, None, source.labels),
                  eval=(data.eval, data.image_column, data.label_column, None))
    if source.kind != "train":
        splits["labeled"] = (labeled_rows, data.image_column, data.label_column, None)
    cache = {}
    for name, (split, image_column, label_column, labels) in splits.items():
        images, decoded, unreadable = decode_split(split, image_column, label_column, size, num_workers(cfg),
                                                   show_progress=show_progress, labels=labels,
                                                   interpolation=interpolation)
        bad[name] = [(r, image_name(split[r][image_column], r), "cannot be decoded") for r in unreadable]
        cache[name] = (images, decoded, sorted(set(range(len(decoded))) - set(unreadable)))
    return cache, bad["unlabeled"], bad["eval"], len(cache["unlabeled"][1])


def _cached_datasets(cache, labeled_idx: Sequence[int], excluded: set, B: int, U: int, world: int):
    unlabeled_images, unlabeled_labels, unlabeled_ok = cache["unlabeled"]
    if "labeled" in cache:  # decoded on their own: rows 0..n-1 of the labeled examples
        labeled_images, labeled_labels, _ = cache["labeled"]
        labeled_rows = list(range(len(labeled_idx)))
    else:  # the unlabeled source is the train split: the labeled examples are its rows
        labeled_images, labeled_labels, labeled_rows = unlabeled_images, unlabeled_labels, list(labeled_idx)
    eval_images, eval_labels, eval_ok = cache["eval"]
    return (DecodedImages(labeled_images, labeled_labels, repeat_to_fill(labeled_rows, B * world)),
            DecodedImages(unlabeled_images, unlabeled_labels,
                          repeat_to_fill([r for r in unlabeled_ok if r not in excluded], U * world)),
            DecodedImages(eval_images, eval_labels, eval_ok))


def _stream_loaders(cfg, data, labeled, make_loader, views, seeds, excluded: set, size: int, accelerator,
                    interpolation: str = "bilinear"):
    """Unlabeled and eval loaders over streams, split by node here (never prepared)."""
    from datasets.distributed import split_dataset_by_node

    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    workers, U = num_workers(cfg), cfg.mu * cfg.per_device_train_batch_size
    source = data.unlabeled
    stream, counts = unlabeled_stream(source.dataset, source.shard_sizes, source.num_rows, world=world, rank=rank,
                                      workers=workers, seed=cfg.seed, buffer_size=cfg.shuffle_buffer_size,
                                      exclude=excluded)
    per_pass = batches_per_pass(counts, world, workers, U)
    if per_pass < 1:
        raise UsageError(f"--streaming: {sum(counts)} unlabeled examples over {world} process(es) and "
                         f"{max(1, workers)} worker(s) each do not fill one batch of {U} "
                         "(lower --per_device_train_batch_size, --mu or --dataloader_num_workers)")
    unlabeled = StreamLoader(make_loader(StreamImages(stream, source.image_column, None, size, views, seeds=seeds,
                                                      labels=source.labels, interpolation=interpolation),
                                         batch_size=U, drop_last=True), device, per_pass)
    columns = (data.image_column, data.label_column)
    eval_stream = StreamImages(split_dataset_by_node(data.eval, rank=rank, world_size=world), *columns, size,
                               label_map=data.label_map, interpolation=interpolation)
    # datasets reads each shard in one worker: more workers than this process's shards would sit idle.
    n = data.eval.n_shards
    eval_workers = min(workers, n // world if n % world == 0 else n)
    eval_collate = collate_fillers
    if is_xla(device):  # full batches only: a short last batch would be a new graph to compile
        eval_collate = partial(padded_collate, collate_fillers, cfg.per_device_eval_batch_size)
    evaluation = StreamLoader(make_loader(eval_stream, batch_size=cfg.per_device_eval_batch_size,
                                          num_workers=eval_workers, persistent_workers=eval_workers > 0,
                                          collate_fn=eval_collate), device)
    return dict(labeled=labeled, unlabeled=unlabeled, eval=evaluation)


def excluded_rows(cfg, data, labeled_idx: List[int]) -> set:
    """Unlabeled rows left out with --unlabeled_excludes_labeled: the labeled examples, at the same positions
    in the train split and in a split expression that starts with it (config.check_unlabeled_flags)."""
    if not cfg.unlabeled_excludes_labeled:
        return set()
    excluded = set(labeled_idx)
    if len(excluded) >= data.unlabeled.num_rows:
        what = "train" if data.unlabeled.kind == "train" else "unlabeled"
        raise UsageError(f"--unlabeled_excludes_labeled: all {data.unlabeled.num_rows} {what} examples are labeled, "
                         "which leaves no unlabeled data (lower --num_labeled or leave the flag out)")
    return excluded


def build_loaders(cfg, data, labeled_idx: List[int], labeled_rows, size: int, pad: int, augment_device: str,
                  accelerator, cache=None, interpolation: str = "bilinear") -> Dict[str, object]:
    """The loaders by name: 'labeled' (B), 'unlabeled' (mu*B, over the unlabeled source's rows) and 'eval';
    the DataLoaders among them are for accelerate to prepare.

    Items are (uint8 views..., label, row); an unlabeled item's label is its true class, -1 when it has
    none (statistics only), its row one of the unlabeled source. On the CPU path the workers make the
    weak / strong views; on the accelerator path they only decode, or, with `cache` (decode_cache's),
    only index. A stream (--streaming) is split by node here and is not prepared.
    """
    B, U = cfg.per_device_train_batch_size, cfg.mu * cfg.per_device_train_batch_size
    world, device = accelerator.num_processes, accelerator.device
    workers, pin_memory = num_workers(cfg), device.type == "cuda"
    if workers:
        atexit.unregister(_end_workers_at_exit)  # once, however many runs this process builds loaders for
        atexit.register(_end_workers_at_exit)
    excluded = excluded_rows(cfg, data, labeled_idx)
    source = data.unlabeled
    if cache is not None:  # decoded in memory: a batch is one tensor index, no workers, no per-sample collate
        loader = partial(DataLoader, pin_memory=pin_memory, collate_fn=batch_identity)
        labeled_ds, unlabeled_ds, eval_ds = _cached_datasets(cache, labeled_idx, excluded, B, U, world)
    else:
        labeled_views, unlabeled_views, labeled_seeds, unlabeled_seeds = [], [], None, None
        if augment_device == "cpu":
            weak = augment.weak_transform(size, hflip=cfg.hflip, pad=pad)
            strong = augment.strong_transform(size, cfg.strong_augment, hflip=cfg.hflip, pad=pad)
            labeled_views, unlabeled_views = [weak], [weak, strong]
            labeled_seeds, unlabeled_seeds = SampleSeeds(cfg.seed, 0), SampleSeeds(cfg.seed, 1)
        columns = (data.image_column, data.label_column)
        local = repeat_to_fill(list(range(len(labeled_idx))), B * world)
        labeled_ds = ImageDataset(labeled_rows, local, *columns, size, labeled_views,
                                  ids=[labeled_idx[i] for i in local], seeds=labeled_seeds, interpolation=interpolation)
        loader = partial(DataLoader, num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                         collate_fn=collate_fillers, worker_init_fn=leave_stop_to_trainer)
        if data.streaming:
            labeled = loader(labeled_ds, batch_size=B, shuffle=True, drop_last=True)
            return _stream_loaders(cfg, data, labeled, loader, unlabeled_views, unlabeled_seeds, excluded, size,
                                   accelerator, interpolation)
        unlabeled_rows = repeat_to_fill([r for r in range(source.num_rows) if r not in excluded], U * world)
        unlabeled_ds = ImageDataset(source.dataset, unlabeled_rows, source.image_column, None, size, unlabeled_views,
                                    seeds=unlabeled_seeds, labels=source.labels, interpolation=interpolation)
        eval_ds = ImageDataset(data.eval, range(len(data.eval_labels)), *columns, size, interpolation=interpolation)
    if is_xla(device):  # every batch of every process full and distinct: one shape, evaluated as `sharded`
        eval_ds = PaddedToMultiple(eval_ds, cfg.per_device_eval_batch_size * world)
    return dict(labeled=loader(labeled_ds, batch_size=B, shuffle=True, drop_last=True),
                unlabeled=loader(unlabeled_ds, batch_size=U, shuffle=True, drop_last=True),
                eval=loader(eval_ds, batch_size=cfg.per_device_eval_batch_size, shuffle=False))


def endless(loader, name: str, positions, accelerator):
    """Yield batches forever, a new shuffle each pass (set_epoch), resuming mid-pass from `positions[name]`
    = [pass, batches done], which it keeps up to date (the checkpoint saves it)."""
    epoch, done = positions.get(name, [0, 0])
    while True:
        if isinstance(loader, StreamLoader):
            batches = loader.skip_first(done)
        else:
            batches = accelerator.skip_first_batches(loader, done) if done else loader
        batches.set_epoch(epoch)  # on the loader iterated: accelerate re-applies its own epoch when iteration starts
        if hasattr(getattr(loader, "dataset", None), "set_epoch"):  # per-sample augmentation seeds (CPU path)
            loader.dataset.set_epoch(epoch)
        for batch in batches:
            done += 1
            positions[name] = [epoch, done]
            yield batch
        epoch, done = epoch + 1, 0
        positions[name] = [epoch, done]
