"""Evaluation batches of one fixed shape (XLA compiles each new shape anew): padding with PAD_ROW rows."""

from typing import List

import torch

from .rows import PAD_ROW


def pad_batch(batch, size: int):
    """(*views, labels, rows) with fewer than `size` examples -> `size` examples; the padding has row PAD_ROW.

    A short last batch would be a new shape, hence a new graph to compile.
    """
    n = len(batch[-1])
    if n >= size:
        return batch
    extra = size - n
    parts = [torch.cat([p, p.new_zeros((extra, *p.shape[1:]))]) for p in batch[:-1]]
    return (*parts, torch.cat([batch[-1], torch.full((extra,), PAD_ROW, dtype=batch[-1].dtype)]))


class PaddedToMultiple(torch.utils.data.Dataset):
    """`dataset` of (*views, label, row) followed by padding examples up to a multiple of `multiple`.

    With `multiple` = batch size x processes every batch of every process is full and no
    example is repeated, so evaluation keeps one shape and counts each image once.
    """

    def __init__(self, dataset, multiple: int):
        self.dataset = dataset
        self.n = len(dataset)
        self.total = -(-self.n // multiple) * multiple

    def __len__(self):
        return self.total

    def _pad_item(self):
        *views, label, _ = self.dataset[0]
        return (*(torch.zeros_like(v) for v in views), label, PAD_ROW)

    def __getitem__(self, i):
        return self.dataset[i] if i < self.n else self._pad_item()

    def __getitems__(self, indices: List[int]):
        real = [i for i in indices if i < self.n]
        if not hasattr(self.dataset, "__getitems__"):  # per-example datasets: the loader's collate_fn batches them
            return [self.dataset[i] for i in real] + [self._pad_item() for _ in range(len(indices) - len(real))]
        return pad_batch(self.dataset.__getitems__(real), len(indices))


def padded_collate(collate, size: int, samples):
    """A collate_fn whose batches always hold `size` examples (streams, whose length is unknown)."""
    return pad_batch(collate(samples), size)
