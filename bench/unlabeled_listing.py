"""Set-up time of a folder of images: --unlabeled_dir (os.scandir listing) against --train_dir (datasets' imagefolder
builder, which resolves its files by glob patterns), on generated folders of small PNG files.

For each size: the folder is N files of 8x8 PNG (the same bytes each) in 10 subfolders, so one tree serves both
flags (10 class folders for --train_dir; nested folders for --unlabeled_dir). Each figure is measured in a fresh
process with an empty datasets cache (a first run's set-up):

- listing: `data.unlabeled.folder_source` (list, build the Arrow table) for --unlabeled_dir;
  `data.sources.load_labeled` (imagefolder, labels, class checks) for --train_dir; imports not counted.
- to first step: train.py with 1 step, from start to the first metrics row, with --unlabeled_dir beside a tiny
  labeled folder (set-up includes the 200-image sample decoded from the unlabeled folder).

    python bench/unlabeled_listing.py --sizes 10000 100000
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Imports first (the same for both), then the clock: the figure is the listing / loading alone.
MEASURE = """
import json, sys, time
import datasets.packaged_modules.imagefolder.imagefolder
from fixmatch_accel.config import TrainConfig
from fixmatch_accel.data.sources import load_labeled
from fixmatch_accel.data.unlabeled import folder_source
kind, path = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if kind == "unlabeled_dir":
    rows = folder_source(path).num_rows
else:
    rows = load_labeled(TrainConfig(train_dir=path)).num_train
print(json.dumps(dict(rows=rows, seconds=time.perf_counter() - start)))
"""


def make_folder(root: Path, n: int) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"class{i % 10}" / f"{i}.png").write_bytes(data)


def measure(kind: str, path: Path, cache: str) -> dict:
    env = dict(os.environ, HF_DATASETS_CACHE=cache, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", MEASURE, kind, str(path)], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    if out.returncode:  # say why, rather than a bare CalledProcessError
        raise SystemExit(f"{kind} on {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_step(unlabeled: Path, labeled: Path, workdir: Path, cache: str) -> float:
    """Seconds from the start of train.py to its first metrics row."""
    env = dict(os.environ, HF_DATASETS_CACHE=cache, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    out = workdir / "run"
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--train_dir", str(labeled), "--unlabeled_dir",
                    str(unlabeled), "--model", "small_cnn", "--image_size", "8", "--per_device_train_batch_size", "4",
                    "--mu", "2", "--max_train_steps", "1", "--eval_steps", "0", "--checkpointing_steps", "0",
                    "--dataloader_num_workers", "0", "--no-plots", "--output_dir", str(out)],
                   env=env, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--no-train_dir", dest="train_dir", action="store_false",
                        help="skip the imagefolder figure (minutes on large folders)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        labeled = tmp / "labeled"
        make_folder(labeled, 40)
        for n in args.sizes:
            folder = tmp / f"files_{n}"
            started = time.perf_counter()
            make_folder(folder, n)
            made = time.perf_counter() - started
            row = dict(files=n, write_s=round(made, 1))
            row["unlabeled_dir_listing_s"] = measure("unlabeled_dir", folder, str(tmp / f"cache_u{n}"))["seconds"]
            row["unlabeled_dir_first_step_s"] = first_step(folder, labeled, tmp, str(tmp / f"cache_f{n}"))
            if args.train_dir:
                row["train_dir_imagefolder_s"] = measure("train_dir", folder, str(tmp / f"cache_t{n}"))["seconds"]
            results.append(row)
            print(" ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
