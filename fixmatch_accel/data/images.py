"""Decoding a stored image, and what the run learns from a sample of them (size, channel statistics).

Images are kept undecoded ({'bytes', 'path'}) until a loader needs them, so that one bad
file raises BadImage here, where the loaders can skip and count it.
"""

import io
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image as PILImage

from ..errors import UsageError

# timm's interpolation names -> PIL's filters (timm's 'random' resizes bicubic here).
RESAMPLE = dict(nearest=PILImage.NEAREST, bilinear=PILImage.BILINEAR, bicubic=PILImage.BICUBIC,
                lanczos=PILImage.LANCZOS, box=PILImage.BOX, hamming=PILImage.HAMMING)


def to_rgb(image: PILImage.Image, size: int, interpolation: str = "bilinear") -> PILImage.Image:
    """Any mode (L, LA, RGBA, P, CMYK, I;16, ...) and size -> RGB size x size: the shorter side resized to `size`
    with `interpolation`, then the centre square (torchvision's Resize(size) + CenterCrop(size), which timm's
    eval transform applies to a run's config.json), so a photo keeps its proportions instead of being squashed."""
    if image.mode in ("P", "PA"):  # a palette may carry transparency: go through RGBA, as PIL advises
        image = image.convert("RGBA")
    elif image.mode.startswith("I") or image.mode == "F":  # 16/32-bit grey: scale the range to 8 bits
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        image = PILImage.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        w, h = image.size
        if w <= h:
            new = (size, int(size * h / w))
        else:
            new = (int(size * w / h), size)
        if new != image.size:
            image = image.resize(new, RESAMPLE.get(interpolation, PILImage.BICUBIC))
        top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
        if new != (size, size):
            image = image.crop((left, top, left + size, top + size))
    return image


class BadImage(Exception):
    """An image that cannot be decoded (corrupt, truncated, not an image)."""


def _open_image(value) -> PILImage.Image:
    """Open (lazily: header only) a datasets Image value stored undecoded: its bytes, else its file."""
    data = value.get("bytes") if isinstance(value, dict) else None
    return PILImage.open(io.BytesIO(data) if data is not None else value["path"])


def decode_image(value) -> PILImage.Image:
    """A datasets Image value stored undecoded ({'bytes', 'path'}), or a PIL image, -> a loaded PIL image.

    Images are stored undecoded so that one bad file raises here, where the loaders
    can skip and count it, instead of inside datasets' own formatting.
    """
    if isinstance(value, PILImage.Image):
        return value
    try:
        image = _open_image(value)
        image.load()  # decode now: a truncated file fails here, not later in a worker's transform
        return image
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise BadImage(f"{type(e).__name__}: {e}") from None


def image_name(value, index: int) -> str:
    """How to name an image in a message: its file when known, else its row."""
    path = value.get("path") if isinstance(value, dict) else None
    return f"{path} (row {index})" if path else f"row {index}"


def image_sizes(dataset, image_column: str, rows: Sequence[int]) -> set:
    """(width, height) of the images at `rows`, from their headers only (no pixel decoding)."""
    sizes = set()
    for value in dataset.select(rows)[image_column]:
        try:
            with _open_image(value) as image:
                sizes.add(image.size)
        except Exception:  # a bad file is reported where it is decoded
            pass
    return sizes


def default_image_size(sizes: set) -> int:
    """The dataset's side when every sampled image has one size (the larger side), else 32."""
    return max(next(iter(sizes))) if len(sizes) == 1 else 32


def stats_rows(n: int, seed: int, max_images: int = 2000) -> List[int]:
    """A seeded sample of row indices for the image size check and the channel statistics."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=min(max_images, n), replace=False))


def channel_stats(dataset, image_column: str, size: int, rows: Optional[Sequence[int]] = None, seed: int = 0):
    """Per-channel mean and std (0..1 units) over `rows` (default: a seeded sample); bad images are left out."""
    mean, std, _ = sampled_channel_stats(dataset, image_column, size, rows, seed)
    return mean, std


def sampled_channel_stats(dataset, image_column: str, size: int, rows: Optional[Sequence[int]] = None, seed: int = 0):
    """channel_stats, and the unreadable images of the sample: [(row, name, reason)]."""
    if rows is None:
        rows = stats_rows(len(dataset), seed)
    count, total, squares, unreadable = 0, np.zeros(3), np.zeros(3), []
    # Sums per image, not one stacked array: 2,000 images of 224 px would take 2.4 GB in float64.
    for image in _readable(dataset, image_column, rows, unreadable):
        pixels = np.asarray(to_rgb(image, size), dtype=np.float64).reshape(-1, 3) / 255.0
        total, squares, count = total + pixels.sum(0), squares + np.square(pixels).sum(0), count + len(pixels)
    if not count:
        raise UsageError(f"none of the {len(rows)} images sampled for the channel statistics could be decoded")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0)).clip(min=1e-3)
    return [float(m) for m in mean], [float(s) for s in std], unreadable


def unreadable_in_sample(dataset, image_column: str, rows: Sequence[int]) -> List:
    """The unreadable images among `rows`, [(row, name, reason)], when no statistics are needed from them."""
    unreadable = []
    for _ in _readable(dataset, image_column, rows, unreadable):
        pass
    return unreadable


def _readable(dataset, image_column: str, rows: Sequence[int], unreadable: List):
    """The decoded images at `rows`; each one that cannot be decoded is appended to `unreadable` instead."""
    for row, value in zip(rows, dataset.select(rows)[image_column]):
        try:
            yield decode_image(value)
        except BadImage as e:
            unreadable.append((row, image_name(value, row), str(e)))
