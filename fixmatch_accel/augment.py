"""Weak and strong augmentation for FixMatch, on two paths with the same semantics.

CPU path (PIL images, for DataLoader workers; randomness from `random` / torch's global RNG):
    ``weak_transform``   random horizontal flip, then a reflect-padded random crop.
    ``strong_transform`` weak, then timm's own RandAugment (or the FixMatch paper's
                         RandAugment + Cutout for ``"paper"``).

Tensor path (uint8 [N, C, H, W] batches on any device: CPU, CUDA, XLA):
    ``weak_batch``       the same flip + crop, drawn per sample, one gather for the batch.
    ``strong_batch``     the RandAugment part only (plus Cutout for ``"paper"``); every
                         sample draws its own ops, apply flags, magnitudes and signs.
    ``normalize_batch``  uint8 -> normalised float.
    ``strong_batch`` = ``sample_rand_augment_params`` (all random draws) followed by
    ``apply_rand_augment`` (pure function of images and draws).

The strong tensor path reimplements timm's PIL ops (``timm.data.auto_augment``) as
batched tensor ops: point ops become per-sample lookup tables, colour ops PIL's
``Image.blend`` with a per-sample degenerate image, geometric ops one per-sample affine
map sampled with explicit index math. Each layer computes every op kind for the whole
batch and selects per sample with ``torch.where``: shapes are static and nothing reads
tensor values on the host, so the code runs under ``torch.compile(fullgraph=True)``.
Eagerly on a CPU, where that redundant work is the whole cost, the batch is instead
sorted by op and each op runs on its own samples only, with the same arithmetic (the
same pixels; tested): as one C loop over the batch where a C compiler is at hand
(native.py, augment_native.c; weak_batch and normalize_batch too), else as tensor ops.
Dynamo cannot trace a ``torch.Generator``: compile with ``generator=None``, or draw with
``sample_rand_augment_params(generator=g)`` eagerly and compile ``apply_rand_augment``.
A generator on another device than the images draws there and the draws are copied.

Where the tensor path knowingly differs from timm / kekmodel:
  * timm picks bilinear or bicubic at random for each geometric op; the tensor path
    always uses bilinear (PIL's bicubic is a 16-tap a=-1 cubic; not worth 4x the gathers).
  * Op arguments, affine coordinates and interpolation weights are computed in float64
    like PIL (float32 on devices without float64, e.g. MPS/XLA, where a few pixels can
    come out one level off); colour blends use float32 like PIL's C code.
  * Pillow 13 raises on ``posterize(bits=0)``, which timm asks for at low magnitudes (and
    at m >= 7.5 with ``inc1``): both paths return black there, as older Pillow did.
  * ``"paper"``: magnitudes are uniform in 1..10 (kekmodel's ``randint(1, 10)`` gives
    1..9); geometric ops use nearest sampling as kekmodel does but fill with ``fill``
    (kekmodel fills black); Cutout is a (min(H, W) // 2)-pixel square centred at a
    uniform pixel and clipped at the borders (kekmodel's PIL rectangle is one pixel
    wider and is not clipped symmetrically), filled with ``fill`` (default 128;
    kekmodel's is 127).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from PIL import Image, ImageEnhance, ImageOps
from torch import Tensor

from . import native

__all__ = [
    "BASE_OPS",
    "PAPER_OPS",
    "PaperRandAugment",
    "RAND_INCREASING_OPS",
    "RAND_OPS",
    "RandAugmentParams",
    "StrongAugmentSpec",
    "apply_op",
    "apply_rand_augment",
    "normalize_batch",
    "parse_strong_augment",
    "sample_rand_augment_params",
    "strong_batch",
    "strong_transform",
    "to_tensor_normalize",
    "weak_batch",
    "weak_transform",
]

# timm's default RandAugment op lists (timm.data.auto_augment._RAND_TRANSFORMS and
# _RAND_INCREASING_TRANSFORMS); a test checks they still match the installed timm.
RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
    "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
# FixMatch paper, Table 12, as kekmodel/FixMatch-pytorch's fixmatch_augment_pool.
PAPER_OPS = (
    "AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity",
    "Posterize", "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize",
    "TranslateX", "TranslateY",
)

_LEVEL_DENOM = 10.0  # timm: magnitude m maps to level m / 10
_TRANSLATE_PCT = 0.45  # timm's default hparams 'translate_pct' for TranslateXRel/YRel

# Underlying op of each timm RandAugment name (timm.data.auto_augment.NAME_TO_OP).
_TIMM_BASE = {
    "AutoContrast": "AutoContrast", "Equalize": "Equalize", "Invert": "Invert",
    "Rotate": "Rotate", "Posterize": "Posterize", "PosterizeIncreasing": "Posterize",
    "PosterizeOriginal": "Posterize", "Solarize": "Solarize",
    "SolarizeIncreasing": "Solarize", "SolarizeAdd": "SolarizeAdd", "Color": "Color",
    "ColorIncreasing": "Color", "Contrast": "Contrast",
    "ContrastIncreasing": "Contrast", "Brightness": "Brightness",
    "BrightnessIncreasing": "Brightness", "Sharpness": "Sharpness",
    "SharpnessIncreasing": "Sharpness", "ShearX": "ShearX", "ShearY": "ShearY",
    "TranslateXRel": "TranslateXRel", "TranslateYRel": "TranslateYRel",
}

# Op kinds of the tensor path; 0 leaves the sample unchanged.
_KEEP, _LUT, _BLEND, _AFFINE = 0, 1, 2, 3
_LUT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd")
_BLEND_OPS = ("Color", "Contrast", "Brightness", "Sharpness")
_AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
               "TranslateX", "TranslateY")
BASE_OPS = _LUT_OPS + _BLEND_OPS + _AFFINE_OPS + ("Identity",)


# --------------------------------------------------------------------------------------
# --strong_augment parsing (shared by both paths)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StrongAugmentSpec:
    """A parsed ``--strong_augment`` value: which ops, how many, how strong."""

    ops: tuple[str, ...]  # op names; timm names, or PAPER_OPS when paper
    num_layers: int = 2  # ops per image, drawn uniformly with replacement
    magnitude: float = 10.0  # timm 'm', on the 0..10 scale (unused by paper)
    magnitude_std: float = 0.0  # timm 'mstd': gauss noise std; inf = uniform(0, m)
    magnitude_max: float = 10.0  # magnitudes are clipped to [0, magnitude_max]
    prob: float = 0.5  # probability that each drawn op is applied
    paper: bool = False  # FixMatch paper RA: magnitude uniform 1..10, then Cutout


_CONFIG_HELP = ("expected 'paper' or a timm RandAugment string 'rand-<sections>' with "
                "sections m<int>, n<int>, mstd<float>, p<float>, inc<0|1>, mmax<int>, "
                "e.g. 'rand-m9-mstd0.5'")


def parse_strong_augment(config: str | StrongAugmentSpec) -> StrongAugmentSpec:
    """Parse a ``--strong_augment`` string like timm's ``rand_augment_transform``."""
    if isinstance(config, StrongAugmentSpec):
        return config
    if config == "paper":
        return StrongAugmentSpec(ops=PAPER_OPS, paper=True)

    def bad(why: str) -> ValueError:
        return ValueError(f"--strong_augment {config!r}: {why}; {_CONFIG_HELP}")

    if not isinstance(config, str):
        raise bad("not a string")
    sections = config.split("-")
    if sections[0] != "rand":
        raise bad("must start with 'rand'")
    # timm's own defaults; timm also silently skips sections without digits, we reject.
    values = dict(m=10, n=2, mstd=0.0, p=0.5, inc=0, mmax=0)
    casts = dict(m=int, n=int, mstd=float, p=float, inc=int, mmax=int)
    for section in sections[1:]:
        if section.startswith("t"):
            raise bad(f"transform set section {section!r} is not supported")
        parts = re.split(r"(\d.*)", section)
        if len(parts) < 2 or parts[0] not in casts:
            raise bad(f"unknown section {section!r}")
        key, val = parts[:2]
        try:
            values[key] = casts[key](val)
        except ValueError:
            raise bad(f"bad number in section {section!r}") from None
    mstd = float("inf") if values["mstd"] > 100 else float(values["mstd"])
    return StrongAugmentSpec(
        ops=RAND_INCREASING_OPS if values["inc"] else RAND_OPS,
        num_layers=values["n"],
        magnitude=float(values["m"]),
        magnitude_std=mstd,
        magnitude_max=float(values["mmax"] or _LEVEL_DENOM),  # timm: mmax 0 -> 10
        prob=values["p"],
    )


# --------------------------------------------------------------------------------------
# CPU path (PIL)
# --------------------------------------------------------------------------------------

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


def _posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
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
                op.aug_fn = _posterize

    def __call__(self, img: Image.Image) -> Image.Image:
        return (self.gray if len(img.getbands()) == 1 else self.rgb)(img)


def _paper_pil_op(img: Image.Image, name: str, v: int, negate: bool,
                  fill: Sequence[int]) -> Image.Image:
    """One op of kekmodel's fixmatch_augment_pool at integer magnitude v (1..10)."""
    sign = -1 if negate else 1
    f = _pil_fill(img, fill)
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return getattr(ImageEnhance, name)(img).enhance(float(v) * 0.9 / 10 + 0.05)
    if name == "Posterize":
        return ImageOps.posterize(img, int(v * 4 / 10) + 4)
    if name == "Solarize":
        return ImageOps.solarize(img, 256 - int(v * 256 / 10))
    if name == "Rotate":
        return img.rotate(sign * int(v * 30 / 10), resample=Image.Resampling.NEAREST, fillcolor=f)
    if name in ("ShearX", "ShearY"):
        s = sign * float(v) * 0.3 / 10
        data = (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0)
    else:  # TranslateX / TranslateY: whole pixels, as kekmodel
        size = img.size[0] if name == "TranslateX" else img.size[1]
        px = int(sign * float(v) * 0.3 / 10 * size)
        data = (1, 0, px, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, px)
    return img.transform(img.size, Image.Transform.AFFINE, data,
                         resample=Image.Resampling.NEAREST, fillcolor=f)


class PaperRandAugment:
    """FixMatch paper RandAugment on PIL: 2 ops of PAPER_OPS (p=0.5 each), then Cutout."""

    def __init__(self, num_layers: int = 2, fill: Sequence[int] = (128, 128, 128)):
        self.num_layers = num_layers
        self.fill = tuple(int(f) for f in fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        for _ in range(self.num_layers):
            name = random.choice(PAPER_OPS)
            v = random.randint(1, 10)
            negate = random.random() < 0.5
            if random.random() < 0.5:
                img = _paper_pil_op(img, name, v, negate, self.fill)
        w, h = img.size
        side = min(w, h) // 2
        cx, cy = random.randrange(w), random.randrange(h)
        x0, y0 = max(0, cx - side // 2), max(0, cy - side // 2)
        x1, y1 = min(w, cx - side // 2 + side), min(h, cy - side // 2 + side)
        img = img.copy()
        img.paste(_pil_fill(img, self.fill), (x0, y0, x1, y1))
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


# --------------------------------------------------------------------------------------
# Tensor path: helpers
# --------------------------------------------------------------------------------------

def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None,
          device: torch.device) -> Tensor:
    """Uniform [0, 1) float32; a generator on another device draws there and is copied."""
    if generator is None or generator.device == device:
        return torch.rand(shape, generator=generator, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _randn(shape, generator, device) -> Tensor:
    if generator is None or generator.device == device:
        return torch.randn(shape, generator=generator, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _randint(high: int, shape, generator, device, low: int = 0) -> Tensor:
    if generator is None or generator.device == device:
        return torch.randint(low, high, shape, generator=generator, device=device)
    return torch.randint(low, high, shape, generator=generator,
                         device=generator.device).to(device)


def _precise_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it: PIL computes op arguments and coordinates in double."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def _div(a: Tensor, b: float) -> Tensor:
    """a / b rounded once (CUDA turns division by a Python scalar into a reciprocal multiply)."""
    return a / torch.full_like(a, b)


def _per_channel(values: float | Sequence[float] | Tensor, channels: int, device,
                 dtype: torch.dtype) -> Tensor:
    """[1, C, 1, 1] on `device`, built there (no host-to-device copy from a Python list)."""
    if isinstance(values, Tensor):
        return values.to(device, dtype).reshape(1, -1, 1, 1).expand(1, channels, 1, 1)
    if isinstance(values, (int, float)):
        values = [values]
    if len(values) != channels:
        values = list(values[:1]) * channels  # e.g. an RGB fill on grayscale: its first value
    return torch.cat([torch.full((1, 1, 1, 1), v, dtype=dtype, device=device) for v in values], 1)


def _fill_tensor(fill: int | Sequence[int], channels: int, device) -> Tensor:
    """Fill colour as uint8 [1, C, 1, 1]."""
    return _per_channel(fill, channels, device, torch.uint8)


# --------------------------------------------------------------------------------------
# Tensor path: weak
# --------------------------------------------------------------------------------------

def _reflect(index: Tensor, size: int) -> Tensor:
    """Reflect an index in [-size+1, 2*size-2] into [0, size) (edge not repeated)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


@torch.no_grad()  # pixels need no gradients; eager ops then skip autograd bookkeeping (~20% on CPU)
def weak_batch(images: Tensor, *, hflip: bool = True, pad: int = 4,
               generator: torch.Generator | None = None) -> Tensor:
    """uint8 [N, C, H, W], 0..255 -> same: per-sample flip (p=0.5), reflect-pad crop."""
    _check_images(images)
    n, c, h, w = images.shape
    dev = images.device
    if pad >= min(h, w):
        raise ValueError(f"pad={pad} must be smaller than the image side {min(h, w)}")
    oy = ox = flip = None
    if pad > 0:
        # offset in [0, 2*pad] into the padded image, as torchvision RandomCrop(padding=pad)
        oy = _randint(2 * pad + 1, (n, 1), generator, dev)
        ox = _randint(2 * pad + 1, (n, 1), generator, dev)
    if hflip:
        flip = _rand((n, 1), generator, dev) < 0.5
    lib = native.library() if _eager_cpu(images) else None
    if lib is not None:  # the same pixels from one compiled loop
        centred = torch.full((n,), pad, dtype=torch.int64)  # the offset that moves nothing
        return native.crop_flip(lib, images, centred if oy is None else oy, centred if ox is None else ox,
                                torch.zeros(n, dtype=torch.bool) if flip is None else flip, pad)
    rows = torch.arange(h, device=dev).expand(n, h)
    cols = torch.arange(w, device=dev).expand(n, w)
    if pad > 0:
        rows = _reflect(rows + oy - pad, h)
        cols = _reflect(cols + ox - pad, w)
    if hflip:
        cols = torch.where(flip, w - 1 - cols, cols)
    # whole rows first (a row copy each), then columns (a per-sample index shared by all rows)
    row_index = (torch.arange(n * c, device=dev).view(n, c, 1) * h + rows.view(n, 1, h)).reshape(n * c * h)
    picked = images.reshape(n * c * h, w).index_select(0, row_index).view(n, c, h, w)
    return picked.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


@torch.no_grad()
def normalize_batch(images: Tensor, mean: Sequence[float] | Tensor,
                    std: Sequence[float] | Tensor) -> Tensor:
    """uint8 [N, C, H, W], 0..255 -> float32 (x / 255 - mean) / std; mean/std in 0..1 units."""
    c, dev = images.shape[1], images.device
    mean_t = _per_channel(mean, c, dev, torch.float32)
    std_t = _per_channel(std, c, dev, torch.float32)
    # one multiply-add on the converted copy, in place: a third of the memory passes of
    # (x / 255 - mean) / std, within float32 rounding of it
    scale, offset = 1.0 / (255.0 * std_t), -mean_t / std_t
    lib = native.library() if _eager_cpu(images) and images.dtype == torch.uint8 else None
    if lib is not None:  # the same arithmetic in one pass
        return native.normalize(lib, images, scale, offset)
    return images.float().mul_(scale).add_(offset)


# --------------------------------------------------------------------------------------
# Tensor path: the ops (PIL semantics)
# --------------------------------------------------------------------------------------

def _gray(x: Tensor) -> Tensor:
    """PIL's RGB -> L (ITU-R 601-2 luma, rounded, integer formula): int32 [N, 1, H, W]."""
    x = x.to(torch.int32)
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def _for_min_max(x: Tensor) -> Tensor:
    """uint8 values to take min / max of: as they are on eager CPU (a few times faster than
    int64), int32 elsewhere: inductor's vectorised CPU min / max of 8-bit integers over 16
    or more values can return 0 (pytorch/pytorch#191499; seen here in torch 2.14 as a
    minimum of 12 read as 0)."""
    return x if _eager_cpu(x) else x.to(torch.int32)


def _lut_autocontrast(x: Tensor) -> Tensor:
    """ImageOps.autocontrast (cutoff 0) as a per-sample per-channel LUT: int64 [N, C, 256]."""
    flat = _for_min_max(x.flatten(2))
    lo = flat.amin(2, keepdim=True).to(torch.int64)
    hi = flat.amax(2, keepdim=True).to(torch.int64)
    i = torch.arange(256, device=x.device)
    span = (hi - lo).clamp(min=1)
    if x.device.type in ("cpu", "cuda"):
        # PIL's own double arithmetic, int(i * scale + offset), which now and then lands
        # just below an exact integer; the LUT is tiny, so float64 costs nothing here.
        scale = torch.full_like(span, 255, dtype=torch.float64) / span.double()
        lut = (i.double() * scale + (-lo.double() * scale)).trunc().long()
    else:  # devices without float64: exact integers (rarely one level above PIL)
        lut = ((i - lo) * 255).div(span, rounding_mode="trunc")
    return torch.where(hi > lo, lut.clamp(0, 255), i)


def _lut_equalize(x: Tensor) -> Tensor:
    """ImageOps.equalize (PIL's algorithm) as a per-sample per-channel LUT: int64 [N, C, 256]."""
    n, c = x.shape[:2]
    flat = x.flatten(2).to(torch.int64)
    hist = torch.zeros(n, c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(2, flat, torch.ones_like(flat))
    last = hist.gather(2, _for_min_max(x.flatten(2)).amax(2, keepdim=True).to(torch.int64))  # count of the highest value present
    step = (flat.shape[2] - last).div(255, rounding_mode="floor")
    before = hist.cumsum(2) - hist  # pixels strictly below each value
    lut = (step.div(2, rounding_mode="floor") + before).div(step.clamp(min=1),
                                                           rounding_mode="floor")
    i = torch.arange(256, device=x.device)
    keep = ((hist > 0).sum(2, keepdim=True) <= 1) | (step == 0)
    return torch.where(keep, i, lut.clamp(max=255))  # PIL's point() clips the LUT to 255


def _posterize_step(bits: Tensor) -> Tensor:
    """2**(8 - bits) clipped to 1..256: Posterize keeps the multiples of it below each value."""
    return torch.pow(2.0, (8 - bits).clamp(0, 8)).to(torch.int64)


def _lut_from_arg(name: str, arg: Tensor, device) -> Tensor:
    """LUT of a point op with a per-sample argument: int64 [N, 1, 256]."""
    i = torch.arange(256, device=device)
    a = arg.view(-1, 1, 1)
    if name == "Posterize":  # keep `bits` high bits; bits <= 0 -> 0, bits >= 8 -> identity
        return i - i % _posterize_step(a)
    if name == "Solarize":  # invert values >= threshold
        return torch.where(i < a, i, 255 - i)
    if name == "SolarizeAdd":  # add to values < 128, saturating
        return torch.where(i < 128, (i + a.to(torch.int64)).clamp(max=255), i)
    raise AssertionError(name)


def _smooth(xf: Tensor) -> Tensor:
    """PIL ImageFilter.SMOOTH ([[1,1,1],[1,5,1],[1,1,1]] / 13), border pixels unchanged."""
    h, w = xf.shape[-2:]
    if h < 3 or w < 3:
        return xf
    k, k5 = 1.0 / 13, 5.0 / 13  # PIL stores the normalised kernel as float32 too
    # PIL's ImagingFilter3x3: per row (left * k + centre * k') + right * k, rows summed from
    # the one below, after a +0.5 rounding offset; products shared between rows are
    # computed once (the same float32 values, added in the same order)
    p = xf * k
    outer = p[..., :-2] + p[..., 1:-1] + p[..., 2:]  # rows y - 1 and y + 1
    middle = p[..., 1:-1, :-2] + xf[..., 1:-1, 1:-1] * k5 + p[..., 1:-1, 2:]
    ss = (0.5 + outer[..., 2:, :]).add_(middle).add_(outer[..., :-2, :])
    out = xf.clone()  # the border keeps its pixels
    out[..., 1:-1, 1:-1] = ss.clamp(0, 255).floor()
    return out


def _affine_coeffs(name: str, arg: Tensor, h: int, w: int) -> Tensor:
    """Per-sample PIL AFFINE data (a, b, c, d, e, f), output -> input: float32 [N, 6]."""
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if name == "Rotate":  # PIL Image.rotate: about the centre, counter-clockwise degrees
        angle = -(arg * (math.pi / 180.0))
        # PIL rounds the matrix to 15 decimals, which also hides libm ulp differences
        cos = _div(torch.round(torch.cos(angle) * 1e15), 1e15)
        sin = _div(torch.round(torch.sin(angle) * 1e15), 1e15)
        cx, cy = w / 2.0, h / 2.0
        return torch.stack([cos, sin, cos * -cx + sin * -cy + cx,
                            -sin, cos, -sin * -cx + cos * -cy + cy], 1)
    if name == "ShearX":
        return torch.stack([one, arg, zero, zero, one, zero], 1)
    if name == "ShearY":
        return torch.stack([one, zero, zero, arg, one, zero], 1)
    if name in ("TranslateXRel", "TranslateX"):
        px = arg * w if name == "TranslateXRel" else arg
        return torch.stack([one, zero, px, zero, one, zero], 1)
    if name in ("TranslateYRel", "TranslateY"):
        px = arg * h if name == "TranslateYRel" else arg
        return torch.stack([one, zero, zero, zero, one, px], 1)
    raise AssertionError(name)


def _fix16(v: Tensor) -> Tensor:
    """PIL's FIX(v) = floor(v * 65536 + 0.5) as int64, exact for float32 v (no 2**16 * v)."""
    whole = v.floor()
    return whole.long() * 65536 + ((v - whole) * 65536.0 + 0.5).floor().long()


# How an affine op moves points: "x" keeps every point's row and "y" its column (the other
# coordinate is 0 * x + 1 * y + 0, exact in PIL's double arithmetic); "tx" / "ty" also move
# every row (column) alike, so the moving coordinate depends on the column (row) alone.
_MOTION = {"ShearX": "x", "ShearY": "y", "TranslateXRel": "tx", "TranslateX": "tx",
           "TranslateYRel": "ty", "TranslateY": "ty", "Rotate": "xy"}


def _select(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """torch.where(mask, a, b) for uint8 tensors.

    Eager CPU kernels of torch.where run about ten times slower than elementwise
    arithmetic, so there the choice is made with bit masks: b ^ ((a ^ b) & 0xFF or 0x00).
    """
    if not _eager_cpu(a):
        return torch.where(mask, a, b)
    return b ^ ((a ^ b) & -mask.view(torch.uint8))


def _to_uint8(values: Tensor) -> Tensor:
    """Floating values in [0, 256) -> uint8, truncated (via int32: CPU float -> uint8 casts are slow)."""
    return values.to(torch.int32).to(torch.uint8)


def _affine_sample(x: Tensor, coeffs: Tensor, fill: Tensor, resample: str, motion: str = "xy") -> Tensor:
    """PIL Image.transform(AFFINE) for a batch: uint8 [N, C, H, W] -> same.

    PIL maps output pixel centre (x + .5, y + .5) to an input point; a point outside
    [0, W) x [0, H) gets the fill. Bilinear reads pixel centres with edge clamping and
    truncates to uint8; nearest takes the pixel containing the point (in PIL's fixed point).
    `motion` (see _MOTION) lets one-axis ops skip the coordinate that stays on the pixel
    grid and read two taps instead of four (the other weight is 0): the same result.
    """
    n, c, h, w = x.shape
    dev = x.device
    flat = x.reshape(n, c, h * w)
    ix = torch.arange(w, device=dev).view(1, 1, w)
    iy = torch.arange(h, device=dev).view(1, h, 1)

    def take(index: Tensor) -> Tensor:  # flat pixel index [N, H, W]
        return flat.gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)

    if resample == "nearest":
        # PIL's nearest affine runs in 16.16 fixed point (Geometry.c affine_fixed);
        # emulate it so rows whose exact coordinate lands on a pixel edge agree.
        a2 = coeffs[:, 2] + coeffs[:, 0] * 0.5 + coeffs[:, 1] * 0.5
        a5 = coeffs[:, 5] + coeffs[:, 3] * 0.5 + coeffs[:, 4] * 0.5
        fa, fb, fc, fd, fe, ff = (_fix16(t).view(n, 1, 1) for t in (
            coeffs[:, 0], coeffs[:, 1], a2, coeffs[:, 3], coeffs[:, 4], a5))
        col = (fc + ix * fa + iy * fb).div(65536, rounding_mode="floor")
        row = (ff + ix * fd + iy * fe).div(65536, rounding_mode="floor")
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).expand(n, h, w).contiguous()
        return _select(inside.unsqueeze(1), take(index), fill)

    dtype = coeffs.dtype  # float64 where available: PIL's coordinates and weights are double
    gx = ix.to(dtype) + 0.5
    gy = iy.to(dtype) + 0.5
    a, b, cc, d, e, f = (t.view(n, 1, 1) for t in coeffs.unbind(1))

    def split(s: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
        """PIL's bilinear head: inside test, then floor and weight of (s - 0.5)."""
        inside = (s >= 0) & (s < size)
        s = s - 0.5
        s0 = s.floor()
        return inside, s0.long(), (s - s0).unsqueeze(1)

    # PIL's a * gx + b * gy + c, where one-axis ops have a = 1 and shears c = 0, and
    # translations b = 0: the terms left out change no bit of the sum
    inside, x0, y0 = None, ix, iy
    if motion == "xy":
        inside, x0, dx = split(a * gx + b * gy + cc, w)
        inside_y, y0, dy = split(d * gx + e * gy + f, h)
        inside = inside & inside_y
    elif motion in ("x", "tx"):
        inside, x0, dx = split(gx + cc if motion == "tx" else gx + b * gy, w)
    else:
        inside, y0, dy = split(gy + f if motion == "ty" else d * gx + gy, h)

    def lerp(v0: Tensor, v1: Tensor, weight: Tensor) -> Tensor:
        """PIL's v0 + (v1 - v0) * weight in double, the difference taken exactly in int16."""
        return (v1.to(torch.int16) - v0.to(torch.int16)).to(dtype).mul_(weight).add_(v0.to(dtype))

    # taps clamped at the edges
    row0, col0 = y0.clamp(0, h - 1) * w, x0.clamp(0, w - 1)
    v00 = take(row0 + col0)
    if motion in ("x", "tx"):
        out = lerp(v00, take(row0 + (x0 + 1).clamp(0, w - 1)), dx)
    elif motion in ("y", "ty"):
        out = lerp(v00, take((y0 + 1).clamp(0, h - 1) * w + col0), dy)
    else:
        row1, col1 = (y0 + 1).clamp(0, h - 1) * w, (x0 + 1).clamp(0, w - 1)
        top = lerp(v00, take(row0 + col1), dx)
        bottom = lerp(take(row1 + col0), take(row1 + col1), dx)
        out = (bottom - top).mul_(dy).add_(top)
    # a convex mix of pixels, so within [0, 255]: the cast truncates, as PIL does
    return _select(inside.unsqueeze(1), _to_uint8(out), fill)


def _lut(name: str, x: Tensor, arg: Tensor | None) -> Tensor:
    """Per-sample lookup table of a point op: int64 [N, 1 or C, 256]."""
    if name == "AutoContrast":
        return _lut_autocontrast(x)
    if name == "Equalize":
        return _lut_equalize(x)
    if name == "Invert":
        return (255 - torch.arange(256, device=x.device)).expand(x.shape[0], 1, 256)
    return _lut_from_arg(name, arg, x.device)


def _degenerate(name: str, x: Tensor, xf: Tensor) -> Tensor:
    """The image PIL's ImageEnhance op blends with: float32, broadcastable to [N, C, H, W]."""
    n, c, h, w = x.shape
    if name == "Color":  # the grayscale image (identity on C=1)
        return _gray(x).float()
    if name == "Contrast":  # the rounded mean of the grayscale image
        total = _gray(x).flatten(1).to(torch.int64).sum(1)
        mean = (2 * total + h * w).div(2 * h * w, rounding_mode="floor")
        return mean.float().view(n, 1, 1, 1)
    if name == "Brightness":  # black
        return torch.zeros(n, 1, 1, 1, device=x.device)
    return _smooth(xf)  # Sharpness: the smoothed image


def _blend(xf: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL Image.blend: deg + f * (img - deg) in C float, clipped, truncated to uint8."""
    blended = degenerate + factor.float().view(-1, 1, 1, 1) * (xf - degenerate)
    return _to_uint8(blended.clamp_(0, 255))


def _apply_layer(x: Tensor, op: Tensor, applied: Tensor, names: Sequence[str],
                 args: Sequence[Tensor | None], fill: Tensor, resample: str) -> Tensor:
    """Apply op `names[op[i]]` with argument `args[op[i]][i]` to sample i where applied.

    Every op kind present in `names` is computed for the whole batch (static shapes);
    each sample then picks its own result with torch.where.
    """
    n, c, h, w = x.shape
    dev = x.device
    kind = torch.zeros(n, dtype=torch.int64, device=dev)
    lut = degenerate = factor = coeffs = None
    xf = x.float() if any(name in _BLEND_OPS for name in names) else None
    for k, (name, arg) in enumerate(zip(names, args)):
        sel = op == k
        if name in _LUT_OPS:
            lut_k = _lut(name, x, arg).expand(n, c, 256)
            lut = lut_k if lut is None else torch.where(sel.view(n, 1, 1), lut_k, lut)
            kind = torch.where(sel, _LUT, kind)
        elif name in _BLEND_OPS:
            deg = _degenerate(name, x, xf).expand(n, c, h, w)
            if degenerate is None:
                degenerate, factor = deg, arg
            else:
                degenerate = torch.where(sel.view(n, 1, 1, 1), deg, degenerate)
                factor = torch.where(sel, arg, factor)
            kind = torch.where(sel, _BLEND, kind)
        elif name in _AFFINE_OPS:
            coeffs_k = _affine_coeffs(name, arg, h, w)
            coeffs = coeffs_k if coeffs is None else torch.where(sel.view(n, 1), coeffs_k, coeffs)
            kind = torch.where(sel, _AFFINE, kind)
        elif name != "Identity":
            raise ValueError(f"unknown op {name!r}")
    kind = torch.where(applied, kind, _KEEP).view(n, 1, 1, 1)

    out = x
    if lut is not None:
        mapped = lut.to(torch.uint8).gather(2, x.reshape(n, c, h * w).long()).reshape(n, c, h, w)
        out = torch.where(kind == _LUT, mapped, out)
    if degenerate is not None:
        out = torch.where(kind == _BLEND, _blend(xf, degenerate, factor), out)
    if coeffs is not None:
        affine = {name for name in names if name in _AFFINE_OPS}
        motion = _MOTION.get(affine.pop(), "xy") if len(affine) == 1 else "xy"
        out = torch.where(kind == _AFFINE, _affine_sample(x, coeffs, fill, resample, motion), out)
    return out


def _apply_one(x: Tensor, name: str, arg: Tensor | None, fill: Tensor, resample: str) -> Tensor:
    """Op `name` on every sample of x, for eager CPU: _apply_layer's arithmetic without its selection.

    The four argument-only point ops run as integer elementwise ops instead of table
    lookups (same values: the tables are these formulas over 0..255).
    """
    n, c, h, w = x.shape
    if name == "Identity":
        return x
    if name == "Invert":
        return 255 - x
    if name == "Posterize":  # i - i % step keeps the high bits: a mask
        return x & (256 - _posterize_step(arg)).to(torch.uint8).view(n, 1, 1, 1)
    if name == "Solarize":  # the threshold is a whole number in 0..256
        return _select(x < arg.to(torch.int16).view(n, 1, 1, 1), x, 255 - x)
    if name == "SolarizeAdd":  # the addend is a whole number in 0..128
        added = (x.to(torch.int16) + arg.to(torch.int16).view(n, 1, 1, 1)).clamp_(max=255)
        return _select(x < 128, added.to(torch.uint8), x)
    if name in _LUT_OPS:
        lut = _lut(name, x, arg).to(torch.uint8).expand(n, c, 256)
        return lut.gather(2, x.reshape(n, c, h * w).long()).reshape(n, c, h, w)
    if name in _BLEND_OPS:
        xf = x.float()
        return _blend(xf, _degenerate(name, x, xf), arg)
    if name in _AFFINE_OPS:
        return _affine_sample(x, _affine_coeffs(name, arg, h, w), fill, resample, _MOTION[name])
    raise ValueError(f"unknown op {name!r}")


def _apply_layer_grouped(x: Tensor, op: Tensor, applied: Tensor, names: Sequence[str],
                         level_to_arg: Callable, magnitude: Tensor, sign: Tensor, fill: Tensor,
                         resample: str) -> Tensor:
    """_apply_layer computing each sample's op for that sample only (eager CPU).

    The batch is sorted by op, each op runs on its own run of samples with arguments
    computed for those samples, and the results go back in place: the same arithmetic
    as _apply_layer, about 1/len(names) of its work, at the price of data-dependent
    shapes and a host read of the op counts, which cost nothing on a CPU but would
    break a compiled graph.
    """
    chosen = torch.where(applied, op, -1)
    order = torch.argsort(chosen, stable=True)
    counts = torch.bincount(chosen + 1, minlength=len(names) + 1).tolist()
    ms, signs = magnitude.index_select(0, order), sign.index_select(0, order)
    lib = native.library() if max(x.shape[-2:]) <= native.MAX_SIDE else None
    if lib is not None:
        return _apply_layer_native(lib, x, order, counts, names, level_to_arg, ms, signs, fill, resample)
    xs = x.index_select(0, order)
    pieces = [xs[:counts[0]]]  # not applied
    start = counts[0]
    for name, count in zip(names, counts[1:]):
        if count:
            base, arg = level_to_arg(name, ms[start:start + count], signs[start:start + count])
            pieces.append(_apply_one(xs[start:start + count], base, arg, fill, resample))
            start += count
    # back to the batch order (index_select: a row copy each; CPU index_copy_ is far slower)
    return torch.cat(pieces).index_select(0, torch.argsort(order))


def _apply_layer_native(lib, x: Tensor, order: Tensor, counts: list[int], names: Sequence[str],
                        level_to_arg: Callable, ms: Tensor, signs: Tensor, fill: Tensor,
                        resample: str) -> Tensor:
    """_apply_layer_grouped's layer in one compiled call (native.py): the arguments and affine
    data of each op's run of samples (sorted by op) come from the tensor path, the pixels from C."""
    n, c, h, w = x.shape
    arg = torch.zeros(n, dtype=torch.float64)
    affine = torch.zeros(n, 6, dtype=torch.float64)
    codes = [-1]
    start = counts[0]
    for name, count in zip(names, counts[1:]):
        if not count:
            codes.append(-1)
            continue
        base, a = level_to_arg(name, ms[start:start + count], signs[start:start + count])
        codes.append(native.CODES[base])
        if a is not None:
            arg[start:start + count] = a
            if base in _AFFINE_OPS:
                affine[start:start + count] = _affine_coeffs(base, a, h, w)
        start += count
    code = torch.repeat_interleave(torch.tensor(codes, dtype=torch.int32), torch.tensor(counts))
    return native.apply_layer(lib, x, order, code, arg, affine, fill.reshape(c), resample == "nearest")


def _eager_cpu(t: Tensor) -> bool:
    """Running eagerly on a CPU, where per-sample work and slow kernels are the cost (not traced)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _grouped(images: Tensor) -> bool:
    """Whether to apply ops by group: eager on a CPU (where every op on every sample is the cost)."""
    return _eager_cpu(images)


@torch.no_grad()
def apply_op(images: Tensor, name: str, arg: float | Tensor | None = None, *,
             fill: int | Sequence[int] = 128, resample: str = "bilinear") -> Tensor:
    """uint8 [N, C, H, W], 0..255 -> same: one PIL-equivalent op with its timm argument.

    `name` is a base op of BASE_OPS; `arg` (scalar or [N]) is what timm's op function
    takes: Posterize bits, Solarize threshold, SolarizeAdd addend, an enhance factor,
    Rotate degrees, a shear factor, a TranslateXRel/YRel fraction or TranslateX/Y pixels.
    """
    _check_images(images)
    n, dev = images.shape[0], images.device
    if name not in BASE_OPS:
        raise ValueError(f"unknown op {name!r}; expected one of {BASE_OPS}")
    dtype = _precise_dtype(dev)
    arg_t = None
    if arg is not None:  # a Python float stays double (no float32 detour)
        arg_t = (arg.to(dev, dtype) if isinstance(arg, Tensor)
                 else torch.tensor(arg, dtype=dtype, device=dev)).expand(n)
    zeros = torch.zeros(n, dtype=torch.int64, device=dev)
    ones = torch.ones(n, dtype=torch.bool, device=dev)
    return _apply_layer(images, zeros, ones, (name,), (arg_t,),
                        _fill_tensor(fill, images.shape[1], dev), resample)


# --------------------------------------------------------------------------------------
# Tensor path: RandAugment sampling and application
# --------------------------------------------------------------------------------------

class RandAugmentParams(NamedTuple):
    """Per-sample RandAugment draws for a batch of N images and L layers."""

    op: Tensor  # int64 [N, L], index into spec.ops (drawn with replacement)
    applied: Tensor  # bool [N, L], whether that op is applied (prob spec.prob)
    magnitude: Tensor  # float32 [N, L], after noise and clipping (paper: integers 1..10)
    sign: Tensor  # float32 [N, L], +1 or -1, used by the signed ops only
    cutout_center: Tensor | None  # int64 [N, 2] (row, col) for paper, else None


@torch.no_grad()
def sample_rand_augment_params(batch_size: int, config: str | StrongAugmentSpec = "rand-m9-mstd0.5",
                               *, generator: torch.Generator | None = None,
                               device: torch.device | str | None = None,
                               image_size: tuple[int, int] = (32, 32)) -> RandAugmentParams:
    """Draw every sample's ops, apply flags, magnitudes and signs (timm's distribution)."""
    spec = parse_strong_augment(config)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    shape = (batch_size, spec.num_layers)
    op = _randint(len(spec.ops), shape, generator, dev)
    applied = _rand(shape, generator, dev) < spec.prob
    if spec.paper:
        magnitude = _randint(11, shape, generator, dev, low=1).float()
    elif spec.magnitude_std == float("inf"):  # timm: uniform(0, m)
        magnitude = _rand(shape, generator, dev) * spec.magnitude
    elif spec.magnitude_std > 0:  # timm: gauss(m, mstd)
        magnitude = spec.magnitude + spec.magnitude_std * _randn(shape, generator, dev)
    else:
        magnitude = torch.full(shape, spec.magnitude, device=dev)
    if not spec.paper:
        magnitude = magnitude.clamp(0.0, spec.magnitude_max)
    sign = torch.where(_rand(shape, generator, dev) < 0.5, -1.0, 1.0)
    cutout_center = None
    if spec.paper:
        h, w = image_size
        cutout_center = torch.cat([_randint(h, (batch_size, 1), generator, dev),
                                   _randint(w, (batch_size, 1), generator, dev)], 1)
    return RandAugmentParams(op, applied, magnitude, sign, cutout_center)


def _timm_level_to_arg(name: str, m: Tensor, sign: Tensor) -> tuple[str, Tensor | None]:
    """timm's LEVEL_TO_ARG[name] on per-sample magnitudes: (base op, argument [N]).

    Same expressions in the same order as timm, so in float64 the arguments are the
    very doubles timm hands to PIL.
    """
    base = _TIMM_BASE[name]
    level = _div(m, _LEVEL_DENOM)
    if base in ("AutoContrast", "Equalize", "Invert"):
        return base, None
    if base == "Rotate":
        return base, level * 30.0 * sign
    if name == "Posterize":
        return base, torch.trunc(level * 4)
    if name == "PosterizeIncreasing":
        return base, 4 - torch.trunc(level * 4)
    if name == "PosterizeOriginal":
        return base, torch.trunc(level * 4) + 4
    if name == "Solarize":
        return base, torch.trunc(level * 256).clamp(max=256)
    if name == "SolarizeIncreasing":
        return base, 256 - torch.trunc(level * 256).clamp(max=256)
    if name == "SolarizeAdd":
        return base, torch.trunc(level * 110).clamp(max=128)
    if base in _BLEND_OPS:
        if name.endswith("Increasing"):  # 1 +- 0.9 * level, kept >= 0.1
            return base, (1.0 + sign * (level * 0.9)).clamp(min=0.1)
        return base, level * 1.8 + 0.1
    if base in ("ShearX", "ShearY"):
        return base, level * 0.3 * sign
    if base in ("TranslateXRel", "TranslateYRel"):
        return base, level * _TRANSLATE_PCT * sign
    raise AssertionError(name)


def _paper_level_to_arg(name: str, v: Tensor, sign: Tensor, h: int, w: int
                        ) -> tuple[str, Tensor | None]:
    """kekmodel's fixmatch_augment_pool arguments for integer magnitudes v in 1..10."""
    if name in ("AutoContrast", "Equalize", "Identity"):
        return name, None
    if name in _BLEND_OPS:
        return name, _div(v * 0.9, 10.0) + 0.05
    if name == "Posterize":
        return name, torch.trunc(_div(v * 4, 10.0)) + 4
    if name == "Solarize":
        return name, 256 - torch.trunc(_div(v * 256, 10.0))
    if name == "Rotate":
        return name, torch.trunc(_div(v * 30, 10.0)) * sign
    if name in ("ShearX", "ShearY"):
        return name, _div(v * 0.3, 10.0) * sign
    if name in ("TranslateX", "TranslateY"):  # whole pixels, truncated towards zero
        size = w if name == "TranslateX" else h
        return name, torch.trunc(_div(v * 0.3, 10.0) * sign * size)
    raise AssertionError(name)


def _cutout(x: Tensor, center: Tensor, fill: Tensor) -> Tensor:
    """Fill a (min(H, W) // 2)-pixel square centred at `center`, clipped at the borders."""
    n, c, h, w = x.shape
    side = min(h, w) // 2
    top = (center[:, 0] - side // 2).view(n, 1, 1)
    left = (center[:, 1] - side // 2).view(n, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return torch.where(inside.unsqueeze(1), fill, x)


@torch.no_grad()
def apply_rand_augment(images: Tensor, params: RandAugmentParams,
                       config: str | StrongAugmentSpec = "rand-m9-mstd0.5", *,
                       fill: int | Sequence[int] = 128) -> Tensor:
    """uint8 [N, C, H, W], 0..255 -> same: RandAugment with the given per-sample draws."""
    _check_images(images)
    spec = parse_strong_augment(config)
    n, c, h, w = images.shape
    fill_t = _fill_tensor(fill, c, images.device)
    x = images
    if spec.paper:
        def level_to_arg(name, m, sign):
            return _paper_level_to_arg(name, m, sign, h, w)
    else:
        level_to_arg = _timm_level_to_arg
    for layer in range(spec.num_layers):
        dtype = _precise_dtype(images.device)
        m, sign = params.magnitude[:, layer].to(dtype), params.sign[:, layer].to(dtype)
        resample = "nearest" if spec.paper else "bilinear"
        if _grouped(images):
            x = _apply_layer_grouped(x, params.op[:, layer], params.applied[:, layer], spec.ops,
                                     level_to_arg, m, sign, fill_t, resample)
        else:
            names, args = zip(*(level_to_arg(name, m, sign) for name in spec.ops))
            x = _apply_layer(x, params.op[:, layer], params.applied[:, layer], names, args, fill_t,
                             resample)
    if spec.paper:
        x = _cutout(x, params.cutout_center, fill_t)
    return x


def strong_batch(images: Tensor, *, config: str | StrongAugmentSpec = "rand-m9-mstd0.5",
                 generator: torch.Generator | None = None,
                 fill: int | Sequence[int] = 128) -> Tensor:
    """uint8 [N, C, H, W], 0..255 -> same: per-sample RandAugment `config` (no flip/crop)."""
    _check_images(images)
    params = sample_rand_augment_params(images.shape[0], config, generator=generator,
                                        device=images.device, image_size=tuple(images.shape[-2:]))
    return apply_rand_augment(images, params, config, fill=fill)
