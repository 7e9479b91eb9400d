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

Modules: ops.py holds the semantics (op table, magnitude rules, parsing, draws) and imports
no backend; pil.py is the PIL reference, tensor.py the batched tensor path, native.py +
augment_native.c its eager CPU loops in C (the same pixels; tested).
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
  * ``"paper"``: magnitudes are uniform in 1..9 as in google-research/fixmatch and kekmodel
    (``np.random.randint(1, 10)``); geometric ops use nearest sampling as kekmodel does but fill with ``fill``
    (kekmodel fills black); Cutout is a (min(H, W) // 2)-pixel square centred at a
    uniform pixel and clipped at the borders (kekmodel's PIL rectangle is one pixel
    wider and is not clipped symmetrically), filled with ``fill`` (default 128;
    kekmodel's is 127).
"""
from .ops import (
                  BASE_OPS,
                  PAPER_OPS,
                  RAND_INCREASING_OPS,
                  RAND_OPS,
                  RandAugmentParams,
                  StrongAugmentSpec,
                  parse_strong_augment,
                  sample_rand_augment_params,
)
from .pil import PaperRandAugment, strong_transform, to_tensor_normalize, weak_transform
from .tensor import apply_op, apply_rand_augment, normalize_batch, resize_batch, strong_batch, weak_batch

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
    "resize_batch",
    "sample_rand_augment_params",
    "strong_batch",
    "strong_transform",
    "to_tensor_normalize",
    "weak_batch",
    "weak_transform",
]
