"""The PIL reference path, for DataLoader workers (randomness from `random` and torch's global RNG).

``weak_transform`` is a random horizontal flip, then a reflect-padded random crop;
``strong_transform`` is weak, then timm's own RandAugment, or the FixMatch paper's
RandAugment + Cutout for ``"paper"`` (its arguments and Cutout square from ops.py).
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

from PIL import Image, ImageEnhance, ImageOps
from torch import Tensor

from .ops import (
    BLEND_OPS,
    NEGATE_PROB,
    PAPER_MAX_LEVEL,
    PAPER_MIN_LEVEL,
    PAPER_OPS,
    PAPER_PROB,
    affine_data,
    cutout_box,
    paper_level_to_arg,
    parse_strong_augment,
)


class _ResizeTo:
    """Resize a PIL image to size x size (returned as is when it already is)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.size, self.size):
            return img
        return img.resize((self.size, self.size), Image.Resampling.BILINEAR)


def weak_transform(image_size: int, *, hflip: bool = True,
                   pad: int = 4) -> Callable[[Image.Image], Image.Image]:
    """PIL -> PIL of image_size x image_size: flip (p=0.5), reflect-pad-`pad` random crop."""
    from torchvision import transforms as T

    steps: list = [_ResizeTo(image_size)]
    if hflip:
        steps.append(T.RandomHorizontalFlip(0.5))
    if pad > 0:
        steps.append(T.RandomCrop(image_size, padding=pad, padding_mode="reflect"))
    return T.Compose(steps)


def _pil_fill(img: Image.Image, fill: Sequence[int] | int):
    """PIL needs an int fill for one-band images and a tuple for RGB."""
    fill = (fill,) * 3 if isinstance(fill, int) else tuple(int(f) for f in fill)
    return fill[0] if len(img.getbands()) == 1 else fill


def posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """timm's posterize, with bits <= 0 giving black as before Pillow 13 (which raises)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


class _TimmRandAugment:
    """timm's RandAugment with timm's defaults, except the fill colour."""

    def __init__(self, config: str, fill: Sequence[int]):
        from timm.data import auto_augment as timm_aa

        parse_strong_augment(config)  # ValueError naming --strong_augment if bad
        fill = tuple(int(f) for f in fill)
        hparams = dict(timm_aa._HPARAMS_DEFAULT, img_mean=fill)
        self.rgb = timm_aa.rand_augment_transform(config, hparams=dict(hparams))
        # PIL rejects a tuple fill on one-band images: a twin with an int fill.
        self.gray = timm_aa.rand_augment_transform(config, hparams=dict(hparams, img_mean=fill[0]))
        # Pillow 13 raises on posterize(bits=0), which timm asks for at low magnitudes
        # (and at m >= 7.5 with inc1); keep the older "all bits dropped" result.
        for op in self.rgb.ops + self.gray.ops:
            if op.aug_fn is timm_aa.posterize:
                op.aug_fn = posterize

    def __call__(self, img: Image.Image) -> Image.Image:
        return (self.gray if len(img.getbands()) == 1 else self.rgb)(img)


def paper_op(img: Image.Image, name: str, v: int, negate: bool, fill: Sequence[int]) -> Image.Image:
    """One op of kekmodel's fixmatch_augment_pool at integer magnitude v (drawn 1..9)."""
    w, h = img.size
    _, arg = paper_level_to_arg(name, v, -1 if negate else 1, h, w)
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name in BLEND_OPS:
        return getattr(ImageEnhance, name)(img).enhance(arg)
    if name == "Posterize":
        return ImageOps.posterize(img, arg)
    if name == "Solarize":
        return ImageOps.solarize(img, arg)
    if name == "Rotate":
        return img.rotate(arg, resample=Image.Resampling.NEAREST, fillcolor=_pil_fill(img, fill))
    return img.transform(img.size, Image.Transform.AFFINE, affine_data(name, arg, h, w),
                         resample=Image.Resampling.NEAREST, fillcolor=_pil_fill(img, fill))


class PaperRandAugment:
    """FixMatch paper RandAugment on PIL: 2 ops of PAPER_OPS (p=0.5 each), then Cutout."""

    def __init__(self, num_layers: int = 2, fill: Sequence[int] = (128, 128, 128)):
        self.num_layers = num_layers
        self.fill = tuple(int(f) for f in fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        for _ in range(self.num_layers):
            name = random.choice(PAPER_OPS)
            v = random.randint(PAPER_MIN_LEVEL, PAPER_MAX_LEVEL)
            negate = random.random() < NEGATE_PROB
            if random.random() < PAPER_PROB:
                img = paper_op(img, name, v, negate, self.fill)
        w, h = img.size
        cx, cy = random.randrange(w), random.randrange(h)
        top, left, side = cutout_box(cy, cx, h, w)
        img = img.copy()
        img.paste(_pil_fill(img, self.fill), (max(0, left), max(0, top), min(w, left + side), min(h, top + side)))
        return img


def strong_transform(image_size: int, config: str = "rand-m9-mstd0.5", *, hflip: bool = True,
                     pad: int = 4, fill: Sequence[int] = (128, 128, 128)
                     ) -> Callable[[Image.Image], Image.Image]:
    """PIL -> PIL of image_size x image_size: weak, then RandAugment `config` (or 'paper')."""
    from torchvision import transforms as T

    spec = parse_strong_augment(config)
    ra = (PaperRandAugment(spec.num_layers, fill) if spec.paper
          else _TimmRandAugment(config, fill))
    return T.Compose([weak_transform(image_size, hflip=hflip, pad=pad), ra])


def to_tensor_normalize(mean: Sequence[float], std: Sequence[float]
                        ) -> Callable[[Image.Image], Tensor]:
    """PIL -> float [C, H, W], (x / 255 - mean) / std; mean/std in 0..1 units."""
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])
