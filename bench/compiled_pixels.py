"""Check: torch.compile'd RandAugment gives the eager pixels on a device, for every config.

`--compile` runs the strong augmentation inside the compiled step on GPUs (and XLA
traces it), so the compiler's code must give the very pixels of eager code. This
draws per-sample parameters with a seeded generator, applies them eagerly and
compiled (fullgraph), and counts the samples whose pixels differ. Exit status 1 if
any do.

    python bench/compiled_pixels.py                    # CPU (inductor's C++ code)
    python bench/compiled_pixels.py --device cuda      # GPU (Triton)

Images are CIFAR-10 from ../shared/data when present, else smooth random images.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import CIFAR, load_images  # noqa: E402

from fixmatch_accel import augment  # noqa: E402
from fixmatch_accel.augment import tensor  # noqa: E402

CONFIGS = ("rand-m9-mstd0.5", "rand-m7-n3-mstd1-inc1", "paper")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    args = parser.parse_args()
    device = torch.device(args.device)
    images, _ = load_images(args.samples)
    rgb = torch.from_numpy(images[:args.samples]).permute(0, 3, 1, 2).contiguous().to(device)
    source = "CIFAR-10" if CIFAR.exists() else "random images"
    failed = False
    for config in CONFIGS:
        for name, x in (("RGB", rgb), ("gray", tensor._gray(rgb).to(torch.uint8))):
            torch._dynamo.reset()
            params = augment.sample_rand_augment_params(x.shape[0], config, generator=torch.Generator().manual_seed(1),
                                                        image_size=tuple(x.shape[-2:]))
            params = augment.RandAugmentParams(*(p.to(device) if p is not None else None for p in params))
            compiled = torch.compile(augment.apply_rand_augment, fullgraph=True, mode=args.mode)
            t0 = time.perf_counter()
            out = compiled(x, params, config)
            seconds = time.perf_counter() - t0
            eager = augment.apply_rand_augment(x, params, config)
            differ = (out != eager).flatten(1).any(1)
            count = int(differ.sum())
            worst = int((out.int() - eager.int()).abs().max())
            failed |= count > 0
            print(f"{config:24s} {name:4s} on {device} ({source}): {count} of {x.shape[0]} samples differ "
                  f"(max {worst} levels); first compile {seconds:.0f} s", flush=True)
    print("compiled == eager" if not failed else "compiled != eager", flush=True)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
