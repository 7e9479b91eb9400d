"""The augmentation's semantics, written once for every backend.

The op table (each base op's group and its loop in the C backend), timm's and the FixMatch
paper's magnitude rules, ``--strong_augment`` parsing, the paper's Cutout square, and the
per-sample RandAugment draws. The backends (pil.py, tensor.py, native.py) import this
module; it imports none of them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

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
# FixMatch paper, Table 12, as kekmodel/FixMatch-pytorch's fixmatch_augment_pool. Magnitudes are integers 1..9:
# the code behind the published numbers draws them so (google-research/fixmatch's AugmentPoolRAMC and kekmodel's
# RandAugmentMC both call np.random.randint(1, 10), whose upper end is exclusive), while the op arguments scale
# them by 10 (kekmodel's max_v), so an op never reaches the end of its range.
PAPER_OPS = (
    "AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity",
    "Posterize", "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize",
    "TranslateX", "TranslateY",
)

LEVEL_DENOM = 10.0  # timm: magnitude m maps to level m / 10
TRANSLATE_PCT = 0.45  # timm's default hparams 'translate_pct' for TranslateXRel/YRel
PAPER_MIN_LEVEL, PAPER_MAX_LEVEL = 1, 9  # paper magnitudes: uniform integers in this range, both ends included
PAPER_PROB = 0.5  # paper: each drawn op is applied with this probability
NEGATE_PROB = 0.5  # signed ops (timm and paper) negate their argument with this probability

# --------------------------------------------------------------------------------------
# The op table
# --------------------------------------------------------------------------------------

# How a base op computes its pixels: a per-value lookup table; PIL's Image.blend with a
# per-sample degenerate image; an affine map resampled from the input; nothing.
LUT, BLEND, AFFINE, IDENTITY = "lut", "blend", "affine", "identity"


class Op(NamedTuple):
    group: str  # LUT, BLEND, AFFINE or IDENTITY
    native: str  # its case in augment_native.c, OP_<native>; native.py numbers them
    # affine ops: the coordinates that move. "x" keeps every point's row and "y" its column
    # (the other coordinate is 0 * x + 1 * y + 0, exact in PIL's double arithmetic); "tx" /
    # "ty" also move every row (column) alike, so the moving coordinate depends on the column
    # (row) alone. Backends compute only what moves and read two taps instead of four.
    motion: str = ""


def _affine(motion: str) -> Op:
    return Op(AFFINE, f"AFFINE_{motion.upper()}", motion)  # one C loop per motion


# Every base op; its order is BASE_OPS's.
OPS = {
    "AutoContrast": Op(LUT, "AUTOCONTRAST"), "Equalize": Op(LUT, "EQUALIZE"),
    "Invert": Op(LUT, "INVERT"), "Posterize": Op(LUT, "POSTERIZE"),
    "Solarize": Op(LUT, "SOLARIZE"), "SolarizeAdd": Op(LUT, "SOLARIZE_ADD"),
    "Color": Op(BLEND, "COLOR"), "Contrast": Op(BLEND, "CONTRAST"),
    "Brightness": Op(BLEND, "BRIGHTNESS"), "Sharpness": Op(BLEND, "SHARPNESS"),
    "Rotate": _affine("xy"), "ShearX": _affine("x"), "ShearY": _affine("y"),
    "TranslateXRel": _affine("tx"), "TranslateYRel": _affine("ty"),
    "TranslateX": _affine("tx"), "TranslateY": _affine("ty"),
    "Identity": Op(IDENTITY, "IDENTITY"),
}
BASE_OPS = tuple(OPS)
LUT_OPS, BLEND_OPS, AFFINE_OPS = (tuple(name for name, op in OPS.items() if op.group == group)
                                  for group in (LUT, BLEND, AFFINE))


# --------------------------------------------------------------------------------------
# Arithmetic both on Python numbers (the PIL path) and on tensors (the tensor path)
# --------------------------------------------------------------------------------------

def div(a, b: float):
    """a / b rounded once (CUDA turns division of a tensor by a Python scalar into a reciprocal
    multiply, so a tensor is divided by a tensor of b)."""
    return a / torch.full_like(a, b) if isinstance(a, Tensor) else a / b


def trunc(a):
    """Round towards zero: an int for a Python number, as int() does."""
    return torch.trunc(a) if isinstance(a, Tensor) else math.trunc(a)


# --------------------------------------------------------------------------------------
# Magnitude rules
# --------------------------------------------------------------------------------------

def _enhance(level, sign):
    return level * 1.8 + 0.1


def _enhance_increasing(level, sign):  # 1 +- 0.9 * level, kept >= 0.1
    return (1.0 + sign * (level * 0.9)).clamp(min=0.1)


def _signed(scale: float) -> Callable:
    return lambda level, sign: level * scale * sign


# timm's RandAugment names (timm.data.auto_augment.NAME_TO_OP and LEVEL_TO_ARG): the base op
# and its argument as a function of level = m / 10 and the sign, in timm's own expressions and
# order, so in float64 the arguments are the very doubles timm hands to PIL.
TIMM_OPS: dict[str, tuple[str, Callable | None]] = {
    "AutoContrast": ("AutoContrast", None), "Equalize": ("Equalize", None), "Invert": ("Invert", None),
    "Rotate": ("Rotate", _signed(30.0)),
    "Posterize": ("Posterize", lambda level, sign: torch.trunc(level * 4)),
    "PosterizeIncreasing": ("Posterize", lambda level, sign: 4 - torch.trunc(level * 4)),
    "PosterizeOriginal": ("Posterize", lambda level, sign: torch.trunc(level * 4) + 4),
    "Solarize": ("Solarize", lambda level, sign: torch.trunc(level * 256).clamp(max=256)),
    "SolarizeIncreasing": ("Solarize", lambda level, sign: 256 - torch.trunc(level * 256).clamp(max=256)),
    "SolarizeAdd": ("SolarizeAdd", lambda level, sign: torch.trunc(level * 110).clamp(max=128)),
    "Color": ("Color", _enhance), "ColorIncreasing": ("Color", _enhance_increasing),
    "Contrast": ("Contrast", _enhance), "ContrastIncreasing": ("Contrast", _enhance_increasing),
    "Brightness": ("Brightness", _enhance), "BrightnessIncreasing": ("Brightness", _enhance_increasing),
    "Sharpness": ("Sharpness", _enhance), "SharpnessIncreasing": ("Sharpness", _enhance_increasing),
    "ShearX": ("ShearX", _signed(0.3)), "ShearY": ("ShearY", _signed(0.3)),
    "TranslateXRel": ("TranslateXRel", _signed(TRANSLATE_PCT)),
    "TranslateYRel": ("TranslateYRel", _signed(TRANSLATE_PCT)),
}


def timm_level_to_arg(name: str, m: Tensor, sign: Tensor) -> tuple[str, Tensor | None]:
    """timm's LEVEL_TO_ARG[name] on per-sample magnitudes: (base op, argument [N])."""
    base, arg = TIMM_OPS[name]
    return base, None if arg is None else arg(div(m, LEVEL_DENOM), sign)


def paper_level_to_arg(name: str, v, sign, h: int, w: int):
    """kekmodel's fixmatch_augment_pool argument at magnitude v (drawn 1..9, scaled by 10) and sign (+1 or -1):
    (base op, argument). v and sign are Python ints (the PIL path) or tensors (the tensor
    path, float64 where the device has it): the same expressions, so the same doubles."""
    if name in ("AutoContrast", "Equalize", "Identity"):
        return name, None
    if name in BLEND_OPS:
        return name, div(v * 0.9, 10.0) + 0.05
    if name == "Posterize":
        return name, trunc(div(v * 4, 10.0)) + 4
    if name == "Solarize":
        return name, 256 - trunc(div(v * 256, 10.0))
    if name == "Rotate":
        return name, trunc(div(v * 30, 10.0)) * sign
    if name in ("ShearX", "ShearY"):
        return name, div(v * 0.3, 10.0) * sign
    if name in ("TranslateX", "TranslateY"):  # whole pixels, truncated towards zero
        size = w if name == "TranslateX" else h
        return name, trunc(div(v * 0.3, 10.0) * sign * size)
    raise AssertionError(name)


def affine_data(name: str, arg, h: int, w: int) -> tuple:
    """PIL's AFFINE data (a, b, c, d, e, f), output -> input, of a shear or translation with
    argument `arg` (a number or a tensor; the other entries are the ints 0 and 1)."""
    if name == "ShearX":
        return 1, arg, 0, 0, 1, 0
    if name == "ShearY":
        return 1, 0, 0, arg, 1, 0
    if name in ("TranslateXRel", "TranslateX"):
        return 1, 0, arg * w if name == "TranslateXRel" else arg, 0, 1, 0
    if name in ("TranslateYRel", "TranslateY"):
        return 1, 0, 0, 0, 1, arg * h if name == "TranslateYRel" else arg
    raise AssertionError(name)


def cutout_box(center_row, center_col, h: int, w: int):
    """The paper's Cutout: (top row, left column, side) of a (min(H, W) // 2)-pixel square
    centred at the given pixel (ints or tensors); the backends clip it at the borders."""
    side = min(h, w) // 2
    return center_row - side // 2, center_col - side // 2, side


# --------------------------------------------------------------------------------------
# --strong_augment parsing
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
    paper: bool = False  # FixMatch paper RA: magnitude uniform 1..9, then Cutout


_CONFIG_HELP = ("expected 'paper' or a timm RandAugment string 'rand-<sections>' with "
                "sections m<int>, n<int>, mstd<float>, p<float>, inc<0|1>, mmax<int>, "
                "e.g. 'rand-m9-mstd0.5'")


def parse_strong_augment(config: str | StrongAugmentSpec) -> StrongAugmentSpec:
    """Parse a ``--strong_augment`` string like timm's ``rand_augment_transform``."""
    if isinstance(config, StrongAugmentSpec):
        return config
    if config == "paper":
        return StrongAugmentSpec(ops=PAPER_OPS, prob=PAPER_PROB, paper=True)

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
        magnitude_max=float(values["mmax"] or LEVEL_DENOM),  # timm: mmax 0 -> 10
        prob=values["p"],
    )


# --------------------------------------------------------------------------------------
# Per-sample draws (torch.Generator streams; any device)
# --------------------------------------------------------------------------------------

def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32; a generator on another device draws there and is copied."""
    if generator is None or generator.device == device:
        return torch.rand(shape, generator=generator, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def randn(shape, generator, device) -> Tensor:
    if generator is None or generator.device == device:
        return torch.randn(shape, generator=generator, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def randint(high: int, shape, generator, device, low: int = 0) -> Tensor:
    if generator is None or generator.device == device:
        return torch.randint(low, high, shape, generator=generator, device=device)
    return torch.randint(low, high, shape, generator=generator, device=generator.device).to(device)


class RandAugmentParams(NamedTuple):
    """Per-sample RandAugment draws for a batch of N images and L layers."""

    op: Tensor  # int64 [N, L], index into spec.ops (drawn with replacement)
    applied: Tensor  # bool [N, L], whether that op is applied (prob spec.prob)
    magnitude: Tensor  # float32 [N, L], after noise and clipping (paper: integers 1..9)
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
    op = randint(len(spec.ops), shape, generator, dev)
    applied = rand(shape, generator, dev) < spec.prob
    if spec.paper:
        magnitude = randint(PAPER_MAX_LEVEL + 1, shape, generator, dev, low=PAPER_MIN_LEVEL).float()
    elif spec.magnitude_std == float("inf"):  # timm: uniform(0, m)
        magnitude = rand(shape, generator, dev) * spec.magnitude
    elif spec.magnitude_std > 0:  # timm: gauss(m, mstd)
        magnitude = spec.magnitude + spec.magnitude_std * randn(shape, generator, dev)
    else:
        magnitude = torch.full(shape, spec.magnitude, device=dev)
    if not spec.paper:
        magnitude = magnitude.clamp(0.0, spec.magnitude_max)
    sign = torch.where(rand(shape, generator, dev) < NEGATE_PROB, -1.0, 1.0)
    cutout_center = None
    if spec.paper:
        h, w = image_size
        cutout_center = torch.cat([randint(h, (batch_size, 1), generator, dev),
                                   randint(w, (batch_size, 1), generator, dev)], 1)
    return RandAugmentParams(op, applied, magnitude, sign, cutout_center)
