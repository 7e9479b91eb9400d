"""The torch datasets and collate functions behind the trainer's DataLoaders.

Every loader yields uint8 images [C, H, W] of one size; normalisation happens on
the training device, so the host moves a quarter of the bytes that float32 would.
A sample is (*views, label, row); rows.py says what a row may hold.
"""

import random
from contextlib import contextmanager, nullcontext
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torchvision.transforms.functional import pil_to_tensor

from .images import BadImage, decode_image, to_rgb
from .rows import unreadable, unreadable_source_row, valid_mask


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
    that cannot be decoded comes back as a black filler whose row is rows.unreadable(row);
    `collate_fillers` replaces it with a good sample of its batch, and the trainer
    counts those rows as skipped images. With `labels` (an unlabeled source's true classes,
    -1 for none) the label is labels[row] and `label_column` is not read.
    """

    def __init__(self, dataset, indices: Sequence[int], image_column: str, label_column: Optional[str],
                 size: int, views: Sequence[Callable] = (), ids: Optional[Sequence[int]] = None,
                 seeds: Optional[SampleSeeds] = None, labels: Optional[np.ndarray] = None,
                 interpolation: str = "bilinear"):
        self.dataset, self.labels = dataset, labels
        self.indices = list(indices)
        self.ids = self.indices if ids is None else list(ids)  # the row reported for each item
        self.image_column, self.label_column = image_column, label_column
        self.size, self.interpolation = size, interpolation
        self.views = list(views) or [lambda im: im]
        self.seeds = seeds

    def set_epoch(self, epoch: int) -> None:
        if self.seeds is not None:
            self.seeds.set_epoch(epoch)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        row = self.dataset[index]
        label = row[self.label_column] if self.labels is None else int(self.labels[index])
        return sample(row[self.image_column], label, self.ids[i], self.size, self.views, self.seeds, draw=i,
                      interpolation=self.interpolation)


def sample(value, label: int, row: int, size: int, views: Sequence[Callable],
           seeds: Optional[SampleSeeds] = None, draw: int = 0, interpolation: str = "bilinear"):
    """(*uint8 views, label, row) of one stored image, or a black filler with row unreadable(row) if it is bad.

    With `seeds`, the views' random draws come from seeds(draw) (`draw` unique within a pass).
    """
    try:
        image = to_rgb(decode_image(value), size, interpolation)
    except BadImage:
        filler = torch.zeros(3, size, size, dtype=torch.uint8)
        return (*(filler for _ in views), label, unreadable(row))
    with seeds(draw) if seeds is not None else nullcontext():
        return (*(pil_to_tensor(view(image)) for view in views), label, row)


def collate_fillers(samples):
    """default_collate, then every sample without a valid row takes the images and label of the batch's first good one.

    A batch keeps its static shape; rows stay as they were so the bad images are counted
    (and left out of evaluation). Padding (PAD_ROW) is filled the same way; it is left out too.
    Runs in the DataLoader workers, off the training step.
    """
    batch = torch.utils.data.default_collate(samples)
    rows = batch[-1]
    bad = ~valid_mask(rows)
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


def decode_split(dataset, image_column: str, label_column: Optional[str], size: int, num_workers: int = 0,
                 show_progress: bool = False, labels: Optional[np.ndarray] = None, interpolation: str = "bilinear"):
    """Decode a whole split (any mode, any size) into uint8 [N, 3, size, size] and int64 [N] tensors.

    Returns (images, labels, bad rows); a bad row's image is left black. `labels`: as ImageDataset's.
    """
    from tqdm.auto import tqdm

    source = ImageDataset(dataset, range(len(dataset)), image_column, label_column, size, labels=labels,
                          interpolation=interpolation)
    loader = torch.utils.data.DataLoader(source, batch_size=256, num_workers=num_workers)
    images = torch.zeros(len(dataset), 3, size, size, dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.long)
    bad: List[int] = []
    for batch_images, batch_labels, rows in tqdm(loader, desc="decoding", disable=not show_progress, leave=False):
        good = valid_mask(rows)
        images[rows[good]] = batch_images[good]
        labels[torch.where(good, rows, unreadable_source_row(rows))] = batch_labels
        bad += unreadable_source_row(rows[~good]).tolist()
    return images, labels, bad
