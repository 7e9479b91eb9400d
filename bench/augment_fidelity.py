"""Fidelity and throughput of fixmatch_accel.augment's tensor path against timm's PIL ops.

    python bench/augment_fidelity.py                 # fidelity table + CPU throughput
    python bench/augment_fidelity.py --device cuda   # also: device == CPU check, compile, speed

Fidelity: for every RandAugment op (timm's 15 defaults and the *Increasing variants) at
magnitudes 0, 5, 9, 10 and both signs, the mean absolute pixel difference (0..255 scale)
between the tensor op and timm's AugmentOp (bilinear, fill 128) on CIFAR-10 (the first N
training images from ../shared/data, else a synthetic batch), and the same for the paper
ops against this project's PIL implementation of kekmodel's pool.

Throughput (one thread for the CPU numbers): the PIL path (torchvision flip/crop + timm
RandAugment, one image at a time) against weak_batch + strong_batch on a batch of 448
(mu * B = 7 * 64) 32x32 images.
"""
from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm.data.auto_augment as timm_aa  # noqa: E402

from fixmatch_accel import augment as A  # noqa: E402
from fixmatch_accel.augment import ops, pil  # noqa: E402

CIFAR = (Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
         / "train-00000-of-00001.parquet")
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
          "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}


def load_batch(n: int) -> tuple[torch.Tensor, str]:
    if CIFAR.exists():
        import pyarrow.parquet as pq

        rows = pq.read_table(CIFAR, columns=["img"]).slice(0, n).column("img").to_pylist()
        imgs = [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in rows]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
        return x, f"CIFAR-10 train[:{n}]"
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    x = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x + 20 * torch.randn(x.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    return x, f"synthetic[{n}] (CIFAR parquet not found)"


def to_pil(x: torch.Tensor) -> list:
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).numpy()]


def from_pil(imgs: list) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2)


def timm_op(imgs: list, name: str, magnitude: float, sign: int) -> torch.Tensor:
    timm_aa._randomly_negate = (lambda v: -v) if sign < 0 else (lambda v: v)
    op = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude,
                           hparams=dict(img_mean=(128, 128, 128), interpolation=Image.BILINEAR))
    if op.aug_fn is timm_aa.posterize:
        op.aug_fn = pil.posterize  # Pillow 13 raises on bits=0
    return from_pil([op(i) for i in imgs])


def tensor_op(x: torch.Tensor, name: str, magnitude: float, sign: int) -> torch.Tensor:
    n = x.shape[0]
    spec = A.StrongAugmentSpec(ops=(name,), num_layers=1, magnitude=magnitude, prob=1.0)
    params = A.RandAugmentParams(
        torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.bool),
        torch.full((n, 1), float(magnitude)), torch.full((n, 1), float(sign)), None)
    return A.apply_rand_augment(x, params, spec, fill=128)


def fidelity(x: torch.Tensor) -> None:
    imgs = to_pil(x)
    print("| op | mean abs diff (mean over m, sign) | worst case mean | max abs diff "
          "| pixels differing |")
    print("| --- | --- | --- | --- | --- |")
    original = timm_aa._randomly_negate
    try:
        for name in A.RAND_OPS + tuple(o for o in A.RAND_INCREASING_OPS if o not in A.RAND_OPS):
            diffs = []
            for m in (0, 5, 9, 10):
                for sign in ((1, -1) if name in SIGNED else (1,)):
                    ref = timm_op(imgs, name, m, sign)
                    diffs.append((tensor_op(x, name, m, sign).int() - ref.int()).abs())
            report(name, diffs)
    finally:
        timm_aa._randomly_negate = original
    n = x.shape[0]
    for name in A.PAPER_OPS:
        diffs = []
        for v in range(1, 11):
            for negate in (False, True):
                ref = from_pil([pil.paper_op(i, name, v, negate, (128, 128, 128)) for i in imgs])
                base, arg = ops.paper_level_to_arg(  # float64, as apply_rand_augment on CPU
                    name, torch.full((n,), float(v), dtype=torch.float64),
                    torch.full((n,), -1.0 if negate else 1.0, dtype=torch.float64), 32, 32)
                out = A.apply_op(x, base, arg, fill=128, resample="nearest")
                diffs.append((out.int() - ref.int()).abs())
        report(f"paper {name}", diffs)


def report(name: str, diffs: list) -> None:
    means = [d.float().mean().item() for d in diffs]
    worst = max(d.max().item() for d in diffs)
    frac = np.mean([(d > 0).float().mean().item() for d in diffs])
    print(f"| {name} | {np.mean(means):.4f} | {max(means):.4f} | {worst} | {100 * frac:.2f}% |")


def throughput(x: torch.Tensor, device: str, config: str, seconds: float = 3.0,
               compile_too: bool = False) -> None:
    batch = x.repeat(448 // x.shape[0] + 1, 1, 1, 1)[:448].contiguous()
    if device == "cpu":
        torch.set_num_threads(1)
        imgs = to_pil(batch)
        t = A.strong_transform(32, config)
        random.seed(0)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for img in imgs[:64]:
                t(img)
            n += 64
        pil_rate = n / (time.perf_counter() - start)
        print(f"PIL path (flip + crop + {config}), 1 core: {pil_rate:,.0f} images/s")
    batch = batch.to(device)
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        return A.strong_batch(A.weak_batch(batch, generator=g), config=config, generator=g)

    rate = _rate(step, device, 448, seconds)
    label = "1 thread" if device == "cpu" else device
    print(f"tensor path eager (weak_batch + strong_batch {config}), {label}: {rate:,.0f} images/s")
    if compile_too:
        params = A.sample_rand_augment_params(448, config, generator=g, device=device)
        compiled = torch.compile(A.apply_rand_augment, fullgraph=True)
        start = time.perf_counter()
        out = compiled(batch, params, config)
        diff = (out.int() - A.apply_rand_augment(batch, params, config).int()).abs()
        print(f"torch.compile(apply_rand_augment, fullgraph=True) on {device}: first call "
              f"{time.perf_counter() - start:.0f} s, max abs diff vs eager {diff.max().item()}")
        rate = _rate(lambda: compiled(batch, A.sample_rand_augment_params(
            448, config, generator=g, device=device), config), device, 448, seconds)
        print(f"tensor path compiled apply_rand_augment ({config}) + eager draws, {device}: "
              f"{rate:,.0f} images/s")


def _rate(fn, device: str, per_call: int, seconds: float) -> float:
    fn()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += per_call
    sync()
    return n / (time.perf_counter() - start)


def device_checks(x: torch.Tensor, device: str) -> None:
    """The same draws give the same pixels on the device as on the CPU; seeded = repeatable."""
    for config in ("rand-m9-mstd0.5", "rand-m9-mstd0.5-inc1", "paper"):
        params = A.sample_rand_augment_params(x.shape[0], config,
                                              generator=torch.Generator().manual_seed(0))
        cpu = A.apply_rand_augment(x, params, config)
        moved = params._replace(**{k: (v.to(device) if v is not None else None)
                                   for k, v in params._asdict().items()})
        dev = A.apply_rand_augment(x.to(device), moved, config)
        d = (dev.cpu().int() - cpu.int()).abs()
        print(f"{config}: {device} vs cpu, same draws: max abs diff {d.max().item()}, "
              f"{100 * (d > 0).float().mean().item():.3f}% pixels differ")
        g = lambda: torch.Generator(device=device).manual_seed(3)  # noqa: E731
        xd = x.to(device)
        a = A.strong_batch(A.weak_batch(xd, generator=g()), config=config, generator=g())
        b = A.strong_batch(A.weak_batch(xd, generator=g()), config=config, generator=g())
        print(f"{config}: seeded {device} generator repeatable: {torch.equal(a, b)}")
        torch.use_deterministic_algorithms(True)
        try:
            A.strong_batch(xd, config=config, generator=g())
            print(f"{config}: runs under torch.use_deterministic_algorithms(True)")
        finally:
            torch.use_deterministic_algorithms(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=64, help="images for the fidelity table")
    parser.add_argument("--config", default="rand-m9-mstd0.5")
    parser.add_argument("--skip_fidelity", action="store_true")
    args = parser.parse_args()
    x, source = load_batch(args.n)
    print(f"torch {torch.__version__}, images: {source}")
    if not args.skip_fidelity:
        fidelity(x)
    if args.device != "cpu":
        device_checks(x, args.device)
    throughput(x, args.device, args.config, compile_too=True)
    throughput(x, args.device, "paper")


if __name__ == "__main__":
    main()
