"""What one image costs in saved activations for the backward pass, per model and precision, on the CPU.

`python bench/activation_memory.py [--models vit_small_patch16_224 resnet50] [--image_size 224]`

Sums the distinct storages autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks) in one
forward of a batch, in fp32 and under bf16 autocast, and prints MB per image and what B x (1 + 2 mu) images
of a FixMatch step would take with the weights, gradients and AdamW state. An estimate of GPU memory, not
a measurement of it: CUDA kernels may keep less (flash attention keeps no attention matrix) and the
allocator adds fragmentation and workspace.
"""

import argparse
import json

import timm
import torch


def saved_bytes(model, images, bf16: bool) -> int:
    storages = {}

    def pack(t):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(images).float().sum()
    return sum(storages.values())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "resnet50"])
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4, help="images in the measured forward")
    parser.add_argument("--step_images", type=int, default=64 * (1 + 2 * 7), help="B x (1 + 2 mu)")
    parser.add_argument("--gpu_gb", type=float, default=80.0)
    parser.add_argument("--usable", type=float, default=0.9,
                        help="share of the GPU a step may count on (CUDA context, allocator, workspace take the rest)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        model = timm.create_model(name, num_classes=100).train()
        images = torch.randn(args.batch, 3, args.image_size, args.image_size)
        params = sum(p.numel() for p in model.parameters())
        # fp32 weights + grads + AdamW's two moments (+ an EMA copy): 5 x 4 bytes a parameter
        fixed_gb = params * 4 * 5 / 1e9
        for bf16 in (False, True):
            per_image = saved_bytes(model, images, bf16) / args.batch
            step_gb = per_image * args.step_images / 1e9 + fixed_gb
            fits = step_gb < args.usable * args.gpu_gb
            rows.append(dict(model=name, precision="bf16" if bf16 else "fp32", params_m=round(params / 1e6, 1),
                             mb_per_image=round(per_image / 1e6, 1), step_images=args.step_images,
                             step_gb=round(step_gb, 1), fits=fits))
            print(f"{name:28s} {rows[-1]['precision']}: {rows[-1]['mb_per_image']:7.1f} MB/image saved for "
                  f"backward; {args.step_images} images + weights/grads/AdamW/EMA = {step_gb:6.1f} GB "
                  f"({'fits' if fits else 'does not fit'} in {args.usable:.0%} of {args.gpu_gb:g} GB)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
