"""--streaming: the train split read as a datasets.IterableDataset, never held whole.

The labeled examples are chosen from one pass over the label column and kept in
memory. The unlabeled stream is cut into contiguous pieces of known length (a
multiple of the world size, at least one per DataLoader worker), so that
`split_dataset_by_node` hands each process whole pieces (disjoint, complete, no
process reads another's data), the pieces' order and a shuffle buffer change
every pass (`set_epoch`), and every example carries its position in the split,
the same index the map-style path uses.
"""

import os
from itertools import islice
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .loaders import SampleSeeds, sample

# One piece: segments (shard, first row in the shard, row after the last, position of the shard's first row).
Piece = Tuple[Tuple[int, int, int, int], ...]

POSITION = "__position"  # the column the piece generator adds


def _yield_from(stream):
    yield from stream


def first_rows(stream, n: int):
    """The first n rows of a stream, as a stream of one piece.

    `take(n)` keeps the stream's pieces, and split_dataset_by_node would then give each process
    the first n / processes rows of its own pieces, not its share of the first n; a stream of one
    piece is split row by row (each process reads the n rows and keeps every k-th).
    """
    from datasets import IterableDataset

    taken = stream.take(n)
    return IterableDataset.from_generator(_yield_from, gen_kwargs=dict(stream=taken), features=taken.features)


def label_streams(cfg, label_col: str, streams: Dict) -> Dict:
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


def label_pass(stream, label_column: str, limit: Optional[int] = None, show_progress: bool = False):
    """Read only the label column, shard by shard: (labels, rows per shard)."""
    from tqdm.auto import tqdm

    labels: List = []
    sizes: List[int] = []
    bar = tqdm(desc="reading labels", unit=" rows", disable=not show_progress, leave=False)
    for shard in range(stream.n_shards):
        before = len(labels)
        for row in stream.shard(stream.n_shards, shard).select_columns([label_column]):
            if limit is not None and len(labels) >= limit:
                break
            labels.append(row[label_column])
        sizes.append(len(labels) - before)
        bar.update(sizes[-1])
    bar.close()
    return labels, sizes


def count_pass(stream, column: str, show_progress: bool = False):
    """Rows per shard of a stream with no label column: (a None per row, rows per shard), as label_pass returns."""
    values, sizes = label_pass(stream, column, show_progress=show_progress)
    return [None] * len(values), sizes


def fetch_rows(stream, shard_sizes: Sequence[int], positions: Sequence[int]) -> List[Dict]:
    """The rows at `positions` (sorted), reading only the shards that hold them."""
    wanted = sorted(positions)
    rows, k, offset = [], 0, 0
    for shard, size in enumerate(shard_sizes):
        end = offset + size
        if k < len(wanted) and wanted[k] < end:
            last = max(p for p in wanted if p < end) - offset
            for j, row in enumerate(islice(stream.shard(stream.n_shards, shard), last + 1)):
                if k < len(wanted) and wanted[k] == offset + j:
                    rows.append(row)
                    k += 1
        offset = end
    return rows


def cut_pieces(shard_sizes: Sequence[int], total: int, num_pieces: int) -> List[Piece]:
    """Split positions [0, total) into `num_pieces` contiguous pieces of near-equal length."""
    offsets = np.concatenate([[0], np.cumsum(shard_sizes)])
    bounds = [total * k // num_pieces for k in range(num_pieces + 1)]
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        segments = []
        for shard, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
            lo, hi = max(a, start), min(b, end)
            if lo < hi:
                segments.append((shard, int(lo - start), int(hi - start), int(start)))
        pieces.append(tuple(segments))
    return pieces


def num_pieces(shard_sizes: Sequence[int], total: int, world: int, workers: int) -> int:
    """The data's own shards when they are alike in size and split evenly over processes and workers,
    else world * workers pieces of equal length."""
    per_process = max(1, workers)
    n = len(shard_sizes)
    if n % world == 0 and n >= world * per_process and sum(shard_sizes) == total \
            and min(shard_sizes) * 2 >= max(shard_sizes):
        return n
    return min(world * per_process, max(world, total // world * world))


def _shard_rows(stream, n_shards: int, shard: int):
    # .iter(), not a plain loop: inside a DataLoader worker a plain loop over a datasets
    # stream splits it again by worker, and every worker but one would read nothing.
    for batch in stream.shard(n_shards, shard).iter(batch_size=256):
        for values in zip(*batch.values()):
            yield dict(zip(batch, values))


def _piece_rows(pieces: List[Piece], stream, n_shards: int, exclude: frozenset):
    # A generator for IterableDataset.from_generator: datasets shards the `pieces` list
    # over processes and workers; the other arguments are passed whole.
    for piece in pieces:
        for shard, start, stop, offset in piece:
            for j, row in enumerate(islice(_shard_rows(stream, n_shards, shard), start, stop)):
                position = offset + start + j
                if position not in exclude:
                    row[POSITION] = position
                    yield row


def unlabeled_stream(stream, shard_sizes: Sequence[int], total: int, *, world: int, rank: int, workers: int,
                     seed: int, buffer_size: int, exclude: Sequence[int] = ()):
    """This process's share of the unlabeled stream, and the per-piece example counts.

    Returns (datasets.IterableDataset with a POSITION column, example counts of all pieces).
    """
    from datasets import IterableDataset, Value
    from datasets.distributed import split_dataset_by_node

    pieces = cut_pieces(shard_sizes, total, num_pieces(shard_sizes, total, world, workers))
    exclude = frozenset(int(p) for p in exclude)
    counts = [sum(stop - start for _, start, stop, _ in piece) for piece in pieces]
    if exclude:
        for k, piece in enumerate(pieces):
            counts[k] -= sum(1 for p in exclude if any(o + a <= p < o + b for _, a, b, o in piece))
    features = stream.features.copy()
    features[POSITION] = Value("int64")
    rows = IterableDataset.from_generator(
        _piece_rows, features=features,
        gen_kwargs=dict(pieces=pieces, stream=stream, n_shards=stream.n_shards, exclude=exclude))
    rows = rows.shuffle(seed=seed, buffer_size=buffer_size)
    return split_dataset_by_node(rows, rank=rank, world_size=world), counts


def batches_per_pass(counts: Sequence[int], world: int, workers: int, batch_size: int) -> int:
    """Full batches every process is sure to get in one pass, whichever pieces the pass gives it.

    Each DataLoader worker batches its own pieces (drop_last), so the bound takes the
    smallest pieces for every worker. Passes of equal length keep the processes'
    epochs, and with them the piece assignment, in step.
    """
    workers = max(1, workers)
    per_worker = max(1, len(counts) // (world * workers))
    smallest = sum(sorted(counts)[:per_worker])
    return workers * (smallest // batch_size)


class StreamImages(torch.utils.data.IterableDataset):
    """A datasets stream of undecoded rows as (*uint8 views, label, position) samples (see loaders.sample).

    With `labels` (an unlabeled source's true classes by position, -1 for none) the label is
    labels[position] and `label_column` is not read.
    """

    def __init__(self, stream, image_column: str, label_column: Optional[str], size: int, views=(), label_map=None,
                 seeds: Optional[SampleSeeds] = None, labels: Optional[np.ndarray] = None,
                 interpolation: str = "bilinear"):
        self.stream, self.labels = stream, labels
        self.seeds = seeds
        self.image_column, self.label_column = image_column, label_column
        self.size, self.interpolation = size, interpolation
        self.views = list(views) or [lambda im: im]
        self.label_map = label_map

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)  # shared with persistent workers by datasets
        if self.seeds is not None:
            self.seeds.set_epoch(epoch)

    def __iter__(self):
        for i, row in enumerate(self.stream):
            position = row.get(POSITION, i)  # unique within a pass: the augmentation's seed
            if self.labels is not None:
                label = int(self.labels[position])
            else:
                label = row[self.label_column]
                if self.label_map is not None:
                    label = self.label_map.get(label, -1)
            yield sample(row[self.image_column], label, position, self.size, self.views, self.seeds, draw=position,
                         interpolation=self.interpolation)


class StreamLoader:
    """A DataLoader over a stream, moved to the device, cut to a fixed number of batches per pass.

    Not prepared by accelerate: the stream is already split by node, and preparing it
    would shard it a second time.
    """

    def __init__(self, loader, device, batches_per_pass: Optional[int] = None, skip: int = 0):
        self.loader, self.device = loader, device
        self.batches_per_pass, self.skip = batches_per_pass, skip

    def set_epoch(self, epoch: int) -> None:
        self.loader.dataset.set_epoch(epoch)

    def skip_first(self, batches: int) -> "StreamLoader":
        return StreamLoader(self.loader, self.device, self.batches_per_pass, batches)

    def __iter__(self):
        from accelerate.utils import send_to_device

        for batch in islice(self.loader, self.skip, self.batches_per_pass):
            yield send_to_device(batch, self.device, non_blocking=True)
