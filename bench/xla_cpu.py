"""Step time and graph compiles of the trainer on XLA's CPU device, against eager PyTorch on the same CPU.

Runs train.py twice in the venv it is started from (one with torch_xla installed):
PJRT_DEVICE=CPU (XLA) and USE_TORCH_XLA=0 (plain PyTorch, accelerate's switch), with
on-device augmentation, no evaluation or checkpoint until the end. Step time is read from
the logging windows after the first (which holds the compiles); compiles and fallbacks
from xla_metrics.json. Not a test: a number for bench/RESULTS.md.

    python bench/xla_cpu.py --dataset_name ../shared/data/cifar10 --model small_cnn --batch_size 8 --mu 7
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(env: dict, out: Path, args) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset_name", args.dataset_name, "--model", args.model,
           "--image_size", str(args.image_size), "--num_labeled", str(args.num_labeled),
           "--per_device_train_batch_size", str(args.batch_size), "--mu", str(args.mu),
           "--augment_device", "accelerator", "--max_train_steps", str(args.steps),
           "--logging_steps", str(args.window), "--eval_steps", "0", "--checkpointing_steps", "0",
           "--max_eval_samples", "64", "--dataloader_num_workers", "0", "--output_dir", str(out)]
    start = time.perf_counter()
    result = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "images_per_s" in r][1:]  # the first window holds the compiles
    per_step = args.batch_size * (1 + args.mu)
    report = dict(wall_s=round(wall, 1),
                  steps_per_s=round(sum(r["images_per_s"] for r in windows) / len(windows) / per_step, 2))
    metrics = out / "xla_metrics.json"
    if metrics.exists():
        xla = json.loads(metrics.read_text())
        report.update(compiles_by_step={r["step"]: r["compiles"] for r in xla if not r.get("end")},
                      compiles_at_end=xla[-1]["compiles"], fallbacks_at_end=xla[-1]["fallbacks"],
                      host_reads_by_step={r["step"]: r["transfers_to_host"] for r in xla if not r.get("end")})
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset_name", default="digits")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--num_labeled", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--window", type=int, default=10, help="logging steps: one host read per window")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(env, Path(tmp) / name, args) for name, env in
                   (("xla_cpu", {"PJRT_DEVICE": "CPU", "USE_TORCH_XLA": "1"}), ("eager_cpu", {"USE_TORCH_XLA": "0"}))}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
