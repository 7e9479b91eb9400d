"""The training data of a run: loaders over the labeled and unlabeled sets, the decoded cache, the bad-image budget."""

import atexit
import multiprocessing
import os
import signal
from functools import partial
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

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
    """Unreadable training images: those found before training and those the loaders replaced since.

    Before training, `read` records each train row read (labeled examples, the statistics
    sample, the decoded cache) once, with the unreadable ones; the training reads are
    counted in the checkpointed TrainState and passed in.
    """

    def __init__(self, cfg, data, print_fn: Callable):
        self.cfg, self.data, self.print = cfg, data, print_fn
        self.rows_read: set = set()
        self.unreadable: Dict[int, Tuple[int, str, str]] = {}  # row -> (row, name, reason)

    def read(self, rows: Iterable[int], unreadable: Iterable[Tuple[int, str, str]]) -> None:
        self.rows_read.update(rows)
        for bad in unreadable:
            self.rows_read.add(bad[0])
            self.unreadable.setdefault(bad[0], bad)

    @property
    def checked(self) -> int:
        return len(self.rows_read)

    def total(self, replaced: int) -> int:
        return len(self.unreadable) + replaced

    def check_setup(self, detail: str = "") -> None:
        """Stop when too many of the images read before training were unreadable, else say once what was skipped."""
        found = list(self.unreadable.values())
        if found:
            row, name, reason = found[0]
            check_bad_images(len(found), self.checked, f"{name}: {reason}", self.cfg.max_bad_image_fraction)
            self.print(f"skipped {len(found)} unreadable image(s) of {self.checked} read"
                       f"{f' ({detail})' if detail else ''}, e.g. {name}: {reason}")

    def check_training(self, replaced: int, row: int, read: int) -> None:
        """Name one unreadable image of the window (`row`); stop when too many of those read were bad."""
        data = self.data
        if data.streaming:
            example = f"position {row} of the {self.cfg.train_split!r} stream"

            def named():  # its file: the shard read again, only when stopping
                return image_name(fetch_rows(data.train, data.shard_sizes, [row])[0][data.image_column], row)
        else:
            example = named = image_name(data.train[row][data.image_column], row)
        total = self.total(replaced)
        check_bad_images(total, self.checked + read, named, self.cfg.max_bad_image_fraction)
        self.print(f"skipped {total} unreadable image(s) so far, e.g. {example}")


def decode_cache(cfg, data, size: int, show_progress: bool, interpolation: str = "bilinear"):
    """Decode the train and eval splits into uint8 tensors: ((images, labels, usable rows) per split,
    unreadable train images [(row, name, reason)], unreadable eval images, train images read)."""
    cache, bad = [], []
    for split in (data.train, data.eval):
        images, labels, unreadable = decode_split(split, data.image_column, data.label_column, size, num_workers(cfg),
                                                  show_progress=show_progress, interpolation=interpolation)
        bad.append([(r, image_name(split[r][data.image_column], r), "cannot be decoded") for r in unreadable])
        cache.append((images, labels, sorted(set(range(len(labels))) - set(unreadable))))
    return cache, bad[0], bad[1], len(cache[0][1])


def _cached_datasets(cache, labeled_idx: Sequence[int], excluded: set, B: int, U: int, world: int):
    (train_images, train_labels, train_ok), (eval_images, eval_labels, eval_ok) = cache
    return (DecodedImages(train_images, train_labels, repeat_to_fill(list(labeled_idx), B * world)),
            DecodedImages(train_images, train_labels, repeat_to_fill([r for r in train_ok if r not in excluded],
                                                                     U * world)),
            DecodedImages(eval_images, eval_labels, eval_ok))


def _stream_loaders(cfg, data, labeled, make_loader, views, seeds, excluded: set, size: int, accelerator,
                    interpolation: str = "bilinear"):
    """Unlabeled and eval loaders over streams, split by node here (never prepared)."""
    from datasets.distributed import split_dataset_by_node

    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    workers, U = num_workers(cfg), cfg.mu * cfg.per_device_train_batch_size
    columns = (data.image_column, data.label_column)
    stream, counts = unlabeled_stream(data.train, data.shard_sizes, data.num_train, world=world, rank=rank,
                                      workers=workers, seed=cfg.seed, buffer_size=cfg.shuffle_buffer_size,
                                      exclude=excluded)
    per_pass = batches_per_pass(counts, world, workers, U)
    if per_pass < 1:
        raise UsageError(f"--streaming: {sum(counts)} unlabeled examples over {world} process(es) and "
                         f"{max(1, workers)} worker(s) each do not fill one batch of {U} "
                         "(lower --per_device_train_batch_size, --mu or --dataloader_num_workers)")
    unlabeled = StreamLoader(make_loader(StreamImages(stream, *columns, size, views, data.label_map, seeds,
                                                      interpolation=interpolation),
                                         batch_size=U, drop_last=True), device, per_pass)
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
    return labeled, unlabeled, evaluation


def build_loaders(cfg, data, labeled_idx: List[int], labeled_rows, size: int, pad: int, augment_device: str,
                  accelerator, cache=None, interpolation: str = "bilinear"):
    """Labeled (B), unlabeled (mu*B) and eval loaders; the DataLoaders among them are for accelerate to prepare.

    Items are (uint8 views..., label, row). On the CPU path the workers make the
    weak / strong views; on the accelerator path they only decode, or, with `cache`
    ((train images, labels, usable rows), (eval images, labels, usable rows)), only
    index. A stream (--streaming) is split by node here and is not prepared.
    """
    B, U = cfg.per_device_train_batch_size, cfg.mu * cfg.per_device_train_batch_size
    world, device = accelerator.num_processes, accelerator.device
    workers, pin_memory = num_workers(cfg), device.type == "cuda"
    if workers:
        atexit.register(_end_workers_at_exit)
    excluded = set(labeled_idx) if cfg.unlabeled_excludes_labeled else set()
    if len(excluded) >= data.num_train:
        raise UsageError(f"--unlabeled_excludes_labeled: all {data.num_train} train examples are labeled, which leaves "
                         "no unlabeled data (lower --num_labeled or leave the flag out)")
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
        unlabeled_rows = repeat_to_fill([r for r in range(data.num_train) if r not in excluded], U * world)
        unlabeled_ds = ImageDataset(data.train, unlabeled_rows, *columns, size, unlabeled_views, seeds=unlabeled_seeds,
                                    interpolation=interpolation)
        eval_ds = ImageDataset(data.eval, range(len(data.eval_labels)), *columns, size, interpolation=interpolation)
    if is_xla(device):  # every batch of every process full and distinct: one shape, evaluated as `sharded`
        eval_ds = PaddedToMultiple(eval_ds, cfg.per_device_eval_batch_size * world)
    return (loader(labeled_ds, batch_size=B, shuffle=True, drop_last=True),
            loader(unlabeled_ds, batch_size=U, shuffle=True, drop_last=True),
            loader(eval_ds, batch_size=cfg.per_device_eval_batch_size, shuffle=False))


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
