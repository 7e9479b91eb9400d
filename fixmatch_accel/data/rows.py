"""The row each loader sample carries, and the two marks a row can hold instead.

A sample is (*views, label, row). A readable image has its row in the split (>= 0).
An image that cannot be decoded has `unreadable(row)` = -(row + 1), so it is counted,
and still named, without a second channel beside the batch. An evaluation batch padded
to a fixed shape (XLA) has PAD_ROW on its padding: neither an image nor a skipped one.
Every module reads rows through these helpers; they take ints, numpy arrays or tensors.
"""

# Far below any -(row + 1) a split can produce, so the two marks never meet.
PAD_ROW = -(2**62)


def unreadable(row):
    """The mark of an unreadable image at `row`: -(row + 1) (row 0 must stay negative too)."""
    return -(row + 1)


def valid_mask(rows):
    """True where a row is a readable image of the split (neither unreadable nor padding)."""
    return rows >= 0


def unreadable_mask(rows):
    """True where a row marks an unreadable image (padding left out)."""
    return (rows < 0) & (rows != PAD_ROW)


def unreadable_source_row(rows):
    """The split row an unreadable mark stands for: -rows - 1 (meaningless where the row is not a mark)."""
    return -rows - 1
