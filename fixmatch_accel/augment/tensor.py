"""The batched tensor path: uint8 [N, C, H, W] batches on any device (CPU, CUDA, XLA).

timm's PIL ops as batched tensor ops: point ops become per-sample lookup tables, colour ops
PIL's ``Image.blend`` with a per-sample degenerate image, geometric ops one per-sample affine
map sampled with explicit index math. Two ways to apply a RandAugment layer, with the same
arithmetic and so the same pixels (tested):

* static shapes (``_apply_layer``): every op kind present is computed for the whole batch and
  each sample selects its own with ``torch.where``; nothing reads tensor values on the host,
  so it runs under ``torch.compile(fullgraph=True)`` and on accelerators;
* grouped (``_apply_layer_grouped``), eagerly on a CPU, where the redundant work above is the
  whole cost: the batch is sorted by op and each op runs on its own samples only, as one C
  loop (native.py) where a C compiler is at hand, else as tensor ops.

weak_batch and normalize_batch also run in C on eager CPU tensors.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import native
from .ops import (
    AFFINE_OPS,
    BASE_OPS,
    BLEND_OPS,
    LUT_OPS,
    OPS,
    RandAugmentParams,
    StrongAugmentSpec,
    affine_data,
    cutout_box,
    div,
    paper_level_to_arg,
    parse_strong_augment,
    rand,
    randint,
    sample_rand_augment_params,
    timm_level_to_arg,
)

# Selection codes of _apply_layer; _KEEP leaves the sample unchanged.
_KEEP, _LUT, _BLEND, _AFFINE = 0, 1, 2, 3


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")


def _eager_cpu(t: Tensor) -> bool:
    """Running eagerly on a CPU, where per-sample work and slow kernels are the cost (not traced)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _grouped(images: Tensor) -> bool:
    """Whether to apply ops by group: eager on a CPU (where every op on every sample is the cost)."""
    return _eager_cpu(images)


def _precise_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it: PIL computes op arguments and coordinates in double."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


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


def _select(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """torch.where(mask, a, b) for uint8 tensors.

    Eager CPU kernels of torch.where run far slower than elementwise arithmetic, so there
    the choice is made with bit masks: b ^ ((a ^ b) & 0xFF or 0x00).
    """
    if not _eager_cpu(a):
        return torch.where(mask, a, b)
    return b ^ ((a ^ b) & -mask.view(torch.uint8))


def _to_uint8(values: Tensor) -> Tensor:
    """Floating values in [0, 256) -> uint8, truncated (via int32: CPU float -> uint8 casts are slow)."""
    return values.to(torch.int32).to(torch.uint8)


# --------------------------------------------------------------------------------------
# Weak augmentation and normalisation
# --------------------------------------------------------------------------------------

def _reflect(index: Tensor, size: int) -> Tensor:
    """Reflect an index in [-size+1, 2*size-2] into [0, size) (edge not repeated)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


@torch.no_grad()  # pixels need no gradients; eager ops then skip autograd bookkeeping
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
        oy = randint(2 * pad + 1, (n, 1), generator, dev)
        ox = randint(2 * pad + 1, (n, 1), generator, dev)
    if hflip:
        flip = rand((n, 1), generator, dev) < 0.5
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


# timm's interpolation names -> torch's (timm's 'random' and PIL-only filters resize bicubic here).
RESIZE_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


@torch.no_grad()
def resize_batch(images: Tensor, size: int, interpolation: str = "bicubic") -> Tensor:
    """uint8 [N, C, h, w] -> uint8 [N, C, size, size] with torch's interpolate, rounded and clipped.

    For a pretrained model's input size: images decoded (and cached) at the dataset's smaller size
    are enlarged once per batch on the training device. Static shapes, no host sync.
    """
    if tuple(images.shape[-2:]) == (size, size):
        return images
    mode = RESIZE_MODES.get(interpolation, "bicubic")
    out = torch.nn.functional.interpolate(images.float(), size=(size, size), mode=mode,
                                          **({} if mode == "nearest" else dict(align_corners=False)))
    return out.round_().clamp_(0, 255).to(torch.uint8)


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
# Point ops (lookup tables)
# --------------------------------------------------------------------------------------

def _gray(x: Tensor) -> Tensor:
    """PIL's RGB -> L (ITU-R 601-2 luma, rounded, integer formula): int32 [N, 1, H, W]."""
    x = x.to(torch.int32)
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def _for_min_max(x: Tensor) -> Tensor:
    """uint8 values to take min / max of: as they are on eager CPU (faster than int64), int32
    elsewhere: inductor's vectorised CPU min / max of 8-bit integers over 16 or more values can
    return 0 (pytorch/pytorch#191499)."""
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
    # count of the highest value present
    last = hist.gather(2, _for_min_max(x.flatten(2)).amax(2, keepdim=True).to(torch.int64))
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


def _lut(name: str, x: Tensor, arg: Tensor | None) -> Tensor:
    """Per-sample lookup table of a point op: int64 [N, 1 or C, 256]."""
    if name == "AutoContrast":
        return _lut_autocontrast(x)
    if name == "Equalize":
        return _lut_equalize(x)
    if name == "Invert":
        return (255 - torch.arange(256, device=x.device)).expand(x.shape[0], 1, 256)
    return _lut_from_arg(name, arg, x.device)


# --------------------------------------------------------------------------------------
# Colour ops (blends)
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# Geometric ops (affine maps)
# --------------------------------------------------------------------------------------

def _affine_coeffs(name: str, arg: Tensor, h: int, w: int) -> Tensor:
    """Per-sample PIL AFFINE data (a, b, c, d, e, f), output -> input: [N, 6], arg's dtype."""
    if name == "Rotate":  # PIL Image.rotate: about the centre, counter-clockwise degrees
        angle = -(arg * (math.pi / 180.0))
        # PIL rounds the matrix to 15 decimals, which also hides libm ulp differences
        cos = div(torch.round(torch.cos(angle) * 1e15), 1e15)
        sin = div(torch.round(torch.sin(angle) * 1e15), 1e15)
        cx, cy = w / 2.0, h / 2.0
        return torch.stack([cos, sin, cos * -cx + sin * -cy + cx,
                            -sin, cos, -sin * -cx + cos * -cy + cy], 1)
    data = affine_data(name, arg, h, w)
    return torch.stack([v if isinstance(v, Tensor) else torch.full_like(arg, v) for v in data], 1)


def _fix16(v: Tensor) -> Tensor:
    """PIL's FIX(v) = floor(v * 65536 + 0.5) as int64, exact for float32 v (no 2**16 * v)."""
    whole = v.floor()
    return whole.long() * 65536 + ((v - whole) * 65536.0 + 0.5).floor().long()


def _affine_nearest(x: Tensor, coeffs: Tensor, take: Callable) -> tuple[Tensor, Tensor]:
    """PIL's nearest affine (16.16 fixed point, Geometry.c affine_fixed), emulated so rows whose
    exact coordinate lands on a pixel edge agree: (pixels read, inside mask [N, H, W])."""
    n, c, h, w = x.shape
    ix = torch.arange(w, device=x.device).view(1, 1, w)
    iy = torch.arange(h, device=x.device).view(1, h, 1)
    a2 = coeffs[:, 2] + coeffs[:, 0] * 0.5 + coeffs[:, 1] * 0.5
    a5 = coeffs[:, 5] + coeffs[:, 3] * 0.5 + coeffs[:, 4] * 0.5
    fa, fb, fc, fd, fe, ff = (_fix16(t).view(n, 1, 1) for t in (
        coeffs[:, 0], coeffs[:, 1], a2, coeffs[:, 3], coeffs[:, 4], a5))
    col = (fc + ix * fa + iy * fb).div(65536, rounding_mode="floor")
    row = (ff + ix * fd + iy * fe).div(65536, rounding_mode="floor")
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).expand(n, h, w).contiguous()
    return take(index), inside


def _split(s: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """PIL's bilinear head: inside test, then floor and weight of (s - 0.5)."""
    inside = (s >= 0) & (s < size)
    s = s - 0.5
    s0 = s.floor()
    return inside, s0.long(), (s - s0).unsqueeze(1)


def _lerp(v0: Tensor, v1: Tensor, weight: Tensor) -> Tensor:
    """PIL's v0 + (v1 - v0) * weight in double, the difference taken exactly in int16."""
    return (v1.to(torch.int16) - v0.to(torch.int16)).to(weight.dtype).mul_(weight).add_(v0.to(weight.dtype))


def _affine_bilinear(x: Tensor, coeffs: Tensor, take: Callable, motion: str) -> tuple[Tensor, Tensor]:
    """PIL's bilinear affine in coeffs' dtype (float64 where available, as PIL's double):
    (pixels truncated to uint8, inside mask [N, H, W])."""
    n, c, h, w = x.shape
    dtype = coeffs.dtype
    ix = torch.arange(w, device=x.device).view(1, 1, w)
    iy = torch.arange(h, device=x.device).view(1, h, 1)
    gx = ix.to(dtype) + 0.5
    gy = iy.to(dtype) + 0.5
    a, b, cc, d, e, f = (t.view(n, 1, 1) for t in coeffs.unbind(1))
    # PIL's a * gx + b * gy + c, where one-axis ops have a = 1 and shears c = 0, and
    # translations b = 0: the terms left out change no bit of the sum
    inside, x0, y0 = None, ix, iy
    if motion == "xy":
        inside, x0, dx = _split(a * gx + b * gy + cc, w)
        inside_y, y0, dy = _split(d * gx + e * gy + f, h)
        inside = inside & inside_y
    elif motion in ("x", "tx"):
        inside, x0, dx = _split(gx + cc if motion == "tx" else gx + b * gy, w)
    else:
        inside, y0, dy = _split(gy + f if motion == "ty" else d * gx + gy, h)
    # taps clamped at the edges
    row0, col0 = y0.clamp(0, h - 1) * w, x0.clamp(0, w - 1)
    v00 = take(row0 + col0)
    if motion in ("x", "tx"):
        out = _lerp(v00, take(row0 + (x0 + 1).clamp(0, w - 1)), dx)
    elif motion in ("y", "ty"):
        out = _lerp(v00, take((y0 + 1).clamp(0, h - 1) * w + col0), dy)
    else:
        row1, col1 = (y0 + 1).clamp(0, h - 1) * w, (x0 + 1).clamp(0, w - 1)
        top = _lerp(v00, take(row0 + col1), dx)
        bottom = _lerp(take(row1 + col0), take(row1 + col1), dx)
        out = (bottom - top).mul_(dy).add_(top)
    # a convex mix of pixels, so within [0, 255]: the cast truncates, as PIL does
    return _to_uint8(out), inside


def _affine_sample(x: Tensor, coeffs: Tensor, fill: Tensor, resample: str, motion: str = "xy") -> Tensor:
    """PIL Image.transform(AFFINE) for a batch: uint8 [N, C, H, W] -> same.

    PIL maps output pixel centre (x + .5, y + .5) to an input point; a point outside
    [0, W) x [0, H) gets the fill. Bilinear reads pixel centres with edge clamping and
    truncates to uint8; nearest takes the pixel containing the point (in PIL's fixed point).
    `motion` (ops.Op.motion) lets one-axis ops skip the coordinate that stays on the pixel
    grid and read two taps instead of four (the other weight is 0): the same result.
    """
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)

    def take(index: Tensor) -> Tensor:  # flat pixel index [N, H, W]
        return flat.gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)

    if resample == "nearest":
        out, inside = _affine_nearest(x, coeffs, take)
    else:
        out, inside = _affine_bilinear(x, coeffs, take, motion)
    return _select(inside.unsqueeze(1), out, fill)


# --------------------------------------------------------------------------------------
# One RandAugment layer: static shapes, grouped, compiled
# --------------------------------------------------------------------------------------

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
    xf = x.float() if any(name in BLEND_OPS for name in names) else None
    for k, (name, arg) in enumerate(zip(names, args)):
        sel = op == k
        if name in LUT_OPS:
            lut_k = _lut(name, x, arg).expand(n, c, 256)
            lut = lut_k if lut is None else torch.where(sel.view(n, 1, 1), lut_k, lut)
            kind = torch.where(sel, _LUT, kind)
        elif name in BLEND_OPS:
            deg = _degenerate(name, x, xf).expand(n, c, h, w)
            if degenerate is None:
                degenerate, factor = deg, arg
            else:
                degenerate = torch.where(sel.view(n, 1, 1, 1), deg, degenerate)
                factor = torch.where(sel, arg, factor)
            kind = torch.where(sel, _BLEND, kind)
        elif name in AFFINE_OPS:
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
        affine = {name for name in names if name in AFFINE_OPS}
        motion = OPS[affine.pop()].motion if len(affine) == 1 else "xy"
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
    if name in LUT_OPS:
        lut = _lut(name, x, arg).to(torch.uint8).expand(n, c, 256)
        return lut.gather(2, x.reshape(n, c, h * w).long()).reshape(n, c, h, w)
    if name in BLEND_OPS:
        xf = x.float()
        return _blend(xf, _degenerate(name, x, xf), arg)
    if name in AFFINE_OPS:
        return _affine_sample(x, _affine_coeffs(name, arg, h, w), fill, resample, OPS[name].motion)
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
    data of each op's run of samples (sorted by op) come from here, the pixels from C."""
    n, c, h, w = x.shape
    arg = torch.zeros(n, dtype=torch.float64)
    affine = torch.zeros(n, 6, dtype=torch.float64)
    codes = [native.KEEP]
    start = counts[0]
    for name, count in zip(names, counts[1:]):
        if not count:
            codes.append(native.KEEP)
            continue
        base, a = level_to_arg(name, ms[start:start + count], signs[start:start + count])
        codes.append(native.CODES[base])
        if a is not None:
            arg[start:start + count] = a
            if base in AFFINE_OPS:
                affine[start:start + count] = _affine_coeffs(base, a, h, w)
        start += count
    code = torch.repeat_interleave(torch.tensor(codes, dtype=torch.int32), torch.tensor(counts))
    return native.apply_layer(lib, x, order, code, arg, affine, fill.reshape(c), resample == "nearest")


# --------------------------------------------------------------------------------------
# Public ops: one op, RandAugment
# --------------------------------------------------------------------------------------

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


def _cutout(x: Tensor, center: Tensor, fill: Tensor) -> Tensor:
    """Fill the paper's Cutout square (ops.cutout_box) centred at `center`, clipped at the borders."""
    n, c, h, w = x.shape
    top, left, side = cutout_box(center[:, 0], center[:, 1], h, w)
    top, left = top.view(n, 1, 1), left.view(n, 1, 1)
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
            return paper_level_to_arg(name, m, sign, h, w)
    else:
        level_to_arg = timm_level_to_arg
    # the paper's geometric ops sample nearest pixels (kekmodel), timm's bilinear here
    resample = "nearest" if spec.paper else "bilinear"
    for layer in range(spec.num_layers):
        dtype = _precise_dtype(images.device)
        m, sign = params.magnitude[:, layer].to(dtype), params.sign[:, layer].to(dtype)
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
