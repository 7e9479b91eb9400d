"""Throughput: this project's FixMatch pipeline against a reference written the usual way.

The reference follows kekmodel/FixMatch-pytorch: PIL/timm augmentation per image in
DataLoader workers, float32, float tensors over the host link, a Python loop EMA and
`.item()` every step. The project's pipeline: decoded uint8 images, batched tensor
augmentation on the training device, channels_last, bf16 autocast where the hardware
runs it natively (CUDA; CPUs with AVX512-BF16 or AMX, as `--mixed_precision bf16`), a fused
(CUDA) or foreach SGD, a foreach EMA, statistics left on the device, optionally
`torch.compile`. Both train the same model on the same batch shapes, measured in one
run on one machine, so the ratios hold on a noisy shared machine.

    python bench/throughput.py                      # CPU: WRN-28-2, B=4, mu=7
    python bench/throughput.py --device cuda --batch_size 64 --workers 16 --compile
    python bench/throughput.py --json               # last line: one JSON object

Images are CIFAR-10 from ../shared/data when present, else random pixels (the cost of
augmentation and training does not depend on the content).
"""

import argparse
import copy
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixmatch_accel import augment  # noqa: E402
from fixmatch_accel.algorithms.objective import Objective  # noqa: E402
from fixmatch_accel.config import default_channels_last  # noqa: E402
from fixmatch_accel.ema import ModelEMA  # noqa: E402
from fixmatch_accel.models import create_model  # noqa: E402
from fixmatch_accel.optim import cosine_lr_factor, param_groups  # noqa: E402
from fixmatch_accel.step import forward_loss, strong_forward_loss, strong_view_in_step, unlabeled_batch_views  # noqa: E402

CIFAR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10" / "train-00000-of-00001.parquet"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
STRONG = "rand-m9-mstd0.5"


def load_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 32, 32, 3] and int64 labels."""
    if CIFAR.exists():
        import pyarrow.parquet as pq

        table = pq.read_table(CIFAR).slice(0, n).to_pydict()
        images = np.stack([np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in table["img"]])
        return images, np.asarray(table["label"], dtype=np.int64)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


# ---------------------------------------------------------------- reference (kekmodel style)

def reference_transforms():
    weak = T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4, padding_mode="reflect")])
    strong = augment.strong_transform(32, STRONG)  # flip + crop + timm RandAugment on PIL
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    return weak, strong, to_tensor


class ReferenceLabeled(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.weak, _, self.to_tensor = reference_transforms()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.to_tensor(self.weak(Image.fromarray(self.images[i]))), self.labels[i]


class ReferenceUnlabeled(ReferenceLabeled):
    def __init__(self, images, labels):
        super().__init__(images, labels)
        _, self.strong, _ = reference_transforms()

    def __getitem__(self, i):
        image = Image.fromarray(self.images[i])
        return self.to_tensor(self.weak(image)), self.to_tensor(self.strong(image)), self.labels[i]


def endless(loader):
    while True:
        yield from loader


def run_reference(args, images, labels, device, steps, warmup):
    B, U = args.batch_size, args.mu * args.batch_size
    loader = dict(num_workers=args.workers, drop_last=True, shuffle=True, pin_memory=device.type == "cuda",
                  persistent_workers=args.workers > 0)
    lx = endless(torch.utils.data.DataLoader(ReferenceLabeled(images, labels), batch_size=B, **loader))
    lu = endless(torch.utils.data.DataLoader(ReferenceUnlabeled(images, labels), batch_size=U, **loader))
    torch.manual_seed(0)
    model = create_model(args.model, 10).to(device).train()
    optimizer = torch.optim.SGD(param_groups(model, 5e-4), lr=0.03, momentum=0.9, nesterov=True)
    ema = copy.deepcopy(model).eval()
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        x, y = next(lx)
        u_w, u_s, _ = next(lu)
        inputs = torch.cat([x, u_w, u_s]).to(device)
        y = y.to(device)
        logits = model(inputs)
        logits_x = logits[:B]
        logits_u_w, logits_u_s = logits[B:].chunk(2)
        loss_x = F.cross_entropy(logits_x, y)
        probs = torch.softmax(logits_u_w.detach(), dim=-1)
        max_probs, targets_u = probs.max(dim=-1)
        mask = max_probs.ge(0.95).float()
        loss_u = (F.cross_entropy(logits_u_s, targets_u, reduction="none") * mask).mean()
        loss = loss_x + loss_u
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # kekmodel's ModelEMA: a Python loop over parameters
            for e, p in zip(ema.parameters(), model.parameters()):
                e.copy_(e * 0.999 + (1 - 0.999) * p)
            for e, b in zip(ema.buffers(), model.buffers()):
                e.copy_(b)
        loss.item(), mask.mean().item()  # the usual per-step logging: a host sync each step
    return steps / (time.perf_counter() - t0)


# ---------------------------------------------------------------- this project

def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively: CUDA GPUs, and CPUs whose oneDNN has bf16 kernels (AVX512-BF16, AMX)."""
    if device.type == "cuda":
        return True
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return device.type == "cpu" and mkldnn_bf16 is not None and bool(mkldnn_bf16())


def run_project(args, images, labels, device, steps, warmup, compile=None, bf16=True, channels_last=True,
                fused=True):
    """Steps/s of the project's step; `compile` is None or a torch.compile mode; bf16 applies where native,
    fused on CUDA."""
    B, U = args.batch_size, args.mu * args.batch_size
    cuda = device.type == "cuda"
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)  # decoded once (--cache_decoded)
    targets = torch.from_numpy(labels).to(device)
    torch.manual_seed(0)
    model = create_model(args.model, 10).to(device).train()
    channels_last = channels_last and default_channels_last(device.type)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, 5e-4), lr=0.03, momentum=0.9, nesterov=True,
                                fused=True if cuda and fused else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: cosine_lr_factor(k, 2**20))
    ema = ModelEMA(model)
    gen = torch.Generator(device=device).manual_seed(0)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    in_graph = strong_view_in_step(device)  # as the trainer: on a CPU the strong view is made eagerly
    autocast_bf16 = bf16 and native_bf16(device)
    objective = Objective("fixmatch", num_classes=10, threshold=0.95, temperature=1.0, lambda_u=1.0)
    kwargs = dict(mean=mean, std=std, channels_last=channels_last, objective=objective)
    no_state, rows = objective.init_state(device), torch.arange(U, device=device)

    def core(x, y, u_w, strong, u_y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            if in_graph:
                loss, stats, _ = strong_forward_loss(model, no_state, x, y, u_w, strong, u_y, rows,
                                                     strong_config=STRONG, **kwargs)
            else:
                loss, stats, _ = forward_loss(model, no_state, x, y, u_w, strong, u_y, rows, **kwargs)
            return loss, stats

    if compile:
        core = torch.compile(core, mode=compile)
    sums = None
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        ix = torch.randint(0, len(data), (B,), device=device, generator=gen)
        iu = torch.randint(0, len(data), (U,), device=device, generator=gen)
        x = augment.weak_batch(data[ix], generator=gen)
        u_w, strong = unlabeled_batch_views(data[iu], STRONG, in_graph=in_graph, generator=gen)
        if compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graph outputs are reused each step
        loss, stats = core(x, targets[ix], u_w, strong, targets[iu])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, step)
        sums = stats["loss"].clone() if sums is None else sums + stats["loss"]  # stays on the device
    float(sums)  # one sync at the end, as at a logging step
    return steps / (time.perf_counter() - t0)


# ---------------------------------------------------------------- augmentation alone

def augment_reference_per_core(images, n):
    """PIL/timm samples per second on one core (one process, weak + strong + to-tensor)."""
    weak, strong, to_tensor = reference_transforms()
    t0 = time.perf_counter()
    for i in range(n):
        image = Image.fromarray(images[i % len(images)])
        to_tensor(weak(image)), to_tensor(strong(image))
    return n / (time.perf_counter() - t0)


def augment_project(images, device, batch, repeats):
    """The project's samples per second: weak + strong + normalised views of `batch` images."""
    data = torch.from_numpy(images[:batch]).permute(0, 3, 1, 2).contiguous().to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def one():  # as the reference: the strong view gets a flip and crop of its own
        u_w = augment.weak_batch(data, generator=gen)
        u_s = augment.strong_batch(augment.weak_batch(data, generator=gen), config=STRONG, generator=gen)
        return augment.normalize_batch(torch.cat([u_w, u_s]), mean, std)

    one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = one()
    float(out[0, 0, 0, 0])
    return batch * repeats / (time.perf_counter() - t0)


def augment_per_core(images, samples, rounds):
    """Median samples/s of both pipelines on one core and the median of their per-round ratios.

    On a shared machine other jobs slow some moments down; alternating the two in short
    rounds and taking each round's ratio compares them at the same moments.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ref, proj = [], []
    for _ in range(rounds):
        ref.append(augment_reference_per_core(images, samples // 2))
        proj.append(augment_project(images, torch.device("cpu"), samples, 2))
    torch.set_num_threads(threads)
    ratios = [p / r for r, p in zip(ref, proj)]
    return statistics.median(ref), statistics.median(proj), statistics.median(ratios), ratios


def model_flops_per_step(args, device):
    """fwd+bwd FLOPs of one step (3x the forward count over B + 2*mu*B images)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(args.model, 10).to(device)
    n = args.batch_size * (1 + 2 * args.mu)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(n, 3, 32, 32, device=device))
    return 3 * counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="wrn28_2")
    parser.add_argument("--batch_size", type=int, default=4, help="labeled images per step (B)")
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per pipeline")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--step_rounds", type=int, default=3,
                        help="alternating rounds of the end-to-end timing (medians are reported)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="reference DataLoader workers")
    parser.add_argument("--augment_samples", type=int, default=448, help="samples for the augmentation-only timing")
    parser.add_argument("--augment_rounds", type=int, default=9,
                        help="alternating rounds of the augmentation timing (medians are reported)")
    parser.add_argument("--compile", action="store_true", help="also measure the project's step with torch.compile")
    parser.add_argument("--compile_modes", default="default", help="comma-separated torch.compile modes to measure")
    parser.add_argument("--ablate", action="store_true",
                        help="also measure the eager step without bf16, without channels_last, without fused SGD")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="bf16 dense peak of the GPU (H100 SXM: 989)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    images, labels = load_images(max(4096, args.batch_size * args.mu * 4))
    source = "CIFAR-10" if CIFAR.exists() else "random pixels"

    ref_aug, cpu_aug, speedup, round_ratios = augment_per_core(images, args.augment_samples, args.augment_rounds)
    result = dict(device=str(device), torch=torch.__version__, images=source, model=args.model,
                  batch_size=args.batch_size, mu=args.mu, compile=args.compile,
                  augment_reference_per_core=ref_aug, augment_project_per_core_cpu=cpu_aug,
                  augment_speedup_per_core=speedup, augment_speedup_per_round=round_ratios)
    print(f"augmentation, one CPU core ({source}, weak+strong {STRONG}, medians of {args.augment_rounds} "
          f"alternating rounds): reference PIL/timm {ref_aug:,.0f} samples/s, project tensors {cpu_aug:,.0f} "
          f"samples/s -> {speedup:.2f}x (rounds: {', '.join(f'{r:.1f}x' for r in round_ratios)})", flush=True)
    if device.type == "cuda":
        gpu_aug = augment_project(images, device, args.augment_samples * 8, 20)
        result.update(augment_project_device=gpu_aug, augment_device_vs_reference_core=gpu_aug / ref_aug)
        print(f"augmentation on {torch.cuda.get_device_name()}: {gpu_aug:,.0f} samples/s "
              f"= {gpu_aug / ref_aug:,.0f} CPU cores of the reference", flush=True)

    # alternating rounds, medians: a shared machine's slow moments hit both pipelines alike
    ref_rounds, proj_rounds = [], []
    for _ in range(args.step_rounds):
        ref_rounds.append(run_reference(args, images, labels, device, args.steps, args.warmup))
        proj_rounds.append(run_project(args, images, labels, device, args.steps, args.warmup))
    ref_steps, proj_steps = statistics.median(ref_rounds), statistics.median(proj_rounds)
    eager_speedup = statistics.median([p / r for r, p in zip(ref_rounds, proj_rounds)])
    print(f"end to end, reference ({args.workers} workers, fp32, .item() each step): {ref_steps:.2f} steps/s",
          flush=True)
    precision = "bf16 autocast" if native_bf16(device) else "fp32"
    print(f"end to end, project ({precision}): {proj_steps:.2f} steps/s -> {eager_speedup:.2f}x "
          f"(medians of {args.step_rounds} alternating rounds: "
          f"{', '.join(f'{p / r:.2f}x' for r, p in zip(ref_rounds, proj_rounds))})", flush=True)
    result.update(reference_steps_per_s=ref_steps, project_steps_per_s=proj_steps, step_speedup_eager=eager_speedup,
                  project_bf16=native_bf16(device))
    if args.ablate:
        for name, off in (("fp32", dict(bf16=False)), ("no channels_last", dict(channels_last=False)),
                          ("foreach SGD", dict(fused=False))):
            rate = run_project(args, images, labels, device, args.steps, args.warmup, **off)
            print(f"end to end, project eager with {name}: {rate:.2f} steps/s ({rate / proj_steps:.2f}x of full eager)",
                  flush=True)
            result[f"project_eager_{name.replace(' ', '_')}_steps_per_s"] = rate
    if args.compile:
        for mode in args.compile_modes.split(","):
            compiled = run_project(args, images, labels, device, args.steps, args.warmup + 3, compile=mode)
            print(f"end to end, project compiled ({mode}): {compiled:.2f} steps/s -> {compiled / ref_steps:.2f}x",
                  flush=True)
            result[f"project_compiled_{mode}_steps_per_s"] = compiled
    best = max([proj_steps] + [v for k, v in result.items() if k.startswith("project_compiled_")])
    result.update(step_speedup=eager_speedup if best == proj_steps else best / ref_steps)
    proj_steps = best
    if device.type == "cuda":
        flops = model_flops_per_step(args, device)
        frac = proj_steps * flops / (args.peak_tflops * 1e12)
        result.update(tflop_per_step=flops / 1e12, fraction_of_bf16_peak=frac)
        print(f"best project step: {flops / 1e12:.2f} TFLOP a step -> {proj_steps * flops / 1e12:.0f} TFLOP/s = "
              f"{100 * frac:.1f}% of {args.peak_tflops:.0f} TFLOP/s bf16 peak", flush=True)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
