"""The XLA path's pure-PyTorch helpers (no torch_xla needed): padded evaluation batches, evaluation counts."""

import torch
from torch.utils.data import DataLoader

from fixmatch_accel.data import DecodedImages, batch_identity, collate_fillers
from fixmatch_accel.data.padding import PaddedToMultiple, pad_batch
from fixmatch_accel.data.rows import PAD_ROW, unreadable, unreadable_mask, unreadable_source_row, valid_mask
from fixmatch_accel.evaluate import evaluate


class PerItem(torch.utils.data.Dataset):
    """(image, label, row) one at a time, like ImageDataset; row 3 stands for an unreadable image."""

    def __len__(self):
        return 5

    def __getitem__(self, i):
        return torch.full((3, 2, 2), i, dtype=torch.uint8), i % 2, -(i + 1) if i == 3 else i


def test_the_row_convention_tells_images_unreadable_marks_and_padding_apart():
    rows = torch.tensor([0, 5, unreadable(0), unreadable(7), PAD_ROW])
    assert rows.tolist()[2:4] == [-1, -8]
    assert valid_mask(rows).tolist() == [True, True, False, False, False]
    assert unreadable_mask(rows).tolist() == [False, False, True, True, False]
    assert unreadable_source_row(rows[unreadable_mask(rows)]).tolist() == [0, 7]
    assert unreadable(3) == -4 and unreadable_mask(torch.tensor(PAD_ROW)).item() is False


def test_pad_batch_fills_a_short_batch_with_pad_rows():
    images, labels, rows = pad_batch((torch.ones(3, 1, 2, 2, dtype=torch.uint8), torch.tensor([1, 2, 0]),
                                      torch.tensor([7, -1, 9])), 5)
    assert images.shape == (5, 1, 2, 2) and images[3:].sum() == 0 and labels.tolist() == [1, 2, 0, 0, 0]
    assert rows.tolist() == [7, -1, 9, PAD_ROW, PAD_ROW]
    full = (torch.zeros(2, 1), torch.zeros(2), torch.arange(2))
    assert pad_batch(full, 2) is full


def test_padded_dataset_gives_full_batches_of_both_kinds():
    images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 3, 2, 2).contiguous()
    decoded = PaddedToMultiple(DecodedImages(images, torch.arange(7) % 3, range(7)), 4)
    batches = list(DataLoader(decoded, batch_size=4, collate_fn=batch_identity))
    assert len(decoded) == 8 and [len(b[-1]) for b in batches] == [4, 4]
    assert batches[1][-1].tolist() == [4, 5, 6, PAD_ROW] and batches[1][0][3].sum() == 0

    per_item = PaddedToMultiple(PerItem(), 3)
    batches = list(DataLoader(per_item, batch_size=3, collate_fn=collate_fillers))
    assert [b[-1].tolist() for b in batches] == [[0, 1, 2], [-4, 4, PAD_ROW]]


class Identity(torch.nn.Module):
    def forward(self, x):
        return x


class OneProcess:
    device = torch.device("cpu")
    num_processes = 1

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def reduce(self, tensor, reduction="sum"):
        return tensor


def test_evaluation_leaves_padding_out_and_counts_unreadable_images():
    # "Logits" are one-hot of the label for rows 0 and 2, wrong for row 1; one unreadable image, two pads.
    logits = torch.tensor([[0.0, 9, 0], [9, 0, 0], [0, 0, 9], [9, 0, 0], [9, 0, 0], [9, 0, 0]])
    labels = torch.tensor([1, 2, 2, 0, 0, 0])
    rows = torch.tensor([0, 1, 2, -4, PAD_ROW, PAD_ROW])
    result = evaluate(Identity(), [(logits, labels, rows)], OneProcess(), lambda x: x, 3, sharded=True)
    assert result["num_eval"] == 3 and result["skipped_images"] == 1
    assert abs(result["top1"] - 200 / 3) < 1e-4 and result["per_class"] == [None, 100.0, 50.0]
