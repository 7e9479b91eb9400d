"""The data side of a run, one job per module.

- sources: SplitData and load_labeled (hub / local dataset, image folders, digits), columns, labels, class checks
- unlabeled: the unlabeled data's source (the train split, another split, another dataset, a folder) and load_data
- digits: the digits demo dataset
- split: the labeled split (drawn or read, saved) and its rows
- images: decoding a stored image, image sizes and channel statistics
- loaders: the torch datasets and collate functions the DataLoaders use
- streaming: --streaming (label pass, pieces per process and worker, the stream loader)
- rows: what the row of a loader sample may hold (a split row, an unreadable mark, padding)

Imports go one way: rows, images, digits <- loaders <- streaming <- sources <- unlabeled <- split.
"""

from .digits import digits_arrays, load_digits_dataset
from .images import (
    BadImage,
    channel_stats,
    decode_image,
    default_image_size,
    image_name,
    image_sizes,
    stats_rows,
    to_rgb,
)
from .loaders import (
    DecodedImages,
    ImageDataset,
    SampleSeeds,
    batch_identity,
    collate_fillers,
    decode_split,
    repeat_to_fill,
    sample,
)
from .rows import PAD_ROW, unreadable, unreadable_mask, unreadable_source_row, valid_mask
from .sources import SplitData, check_image_column, load_labeled, load_named_dataset, pick_column
from .split import labeled_examples, labeled_split, save_labeled_split, select_labeled
from .streaming import (
    StreamImages,
    StreamLoader,
    batches_per_pass,
    cut_pieces,
    fetch_rows,
    first_rows,
    label_pass,
    label_streams,
    num_pieces,
    unlabeled_stream,
)
from .unlabeled import Source, list_images, load_data

__all__ = [
    "BadImage", "DecodedImages", "ImageDataset", "PAD_ROW", "SampleSeeds", "SplitData", "StreamImages", "StreamLoader",
    "batch_identity", "batches_per_pass", "channel_stats", "check_image_column", "collate_fillers", "cut_pieces",
    "decode_image", "decode_split", "default_image_size", "digits_arrays", "fetch_rows", "first_rows", "image_name",
    "image_sizes", "label_pass", "label_streams", "labeled_examples", "labeled_split", "load_data", "load_labeled",
    "list_images", "Source",
    "load_digits_dataset", "load_named_dataset", "num_pieces", "pick_column", "repeat_to_fill", "sample",
    "save_labeled_split", "select_labeled", "stats_rows", "to_rgb", "unlabeled_stream", "unreadable",
    "unreadable_mask", "unreadable_source_row", "valid_mask",
]
