"""FixMatch with its unlabeled images in a separate folder (--unlabeled_dir) against labels only, on the digits demo.

Writes scikit-learn's digits as image files, with the built-in demo's own split and rendering
(fixmatch_accel/data/digits.py: the stored 75/25 split, 8x8 values 0..16 scaled to 0..255, RGB PNG):

    OUT/data/labeled_s<seed>/<class>/<index>.png   the demo's 50 labeled examples for that seed (5 per class,
                                                   drawn as the demo draws them: select_labeled with --seed)
    OUT/data/unlabeled/<a|b|c>/<nn>/<index>.png    all 1,347 train images, no class folders (the demo's unlabeled set)
    OUT/data/val/<class>/<index>.png               the 450 test images

(<index> is the row of load_digits). Then per seed trains train.py --train_dir labeled_s<seed> --validation_dir val
--unlabeled_dir unlabeled with the demo's settings (fixmatch_accel/config.py DEMO, given as flags), once as FixMatch
and once with --lambda_u 0, each into its own folder under OUT; a run whose eval_results.json is there is skipped.
Prints a markdown table of EMA top-1 per seed, the mean and the paired gap, and the wall time of each run, and
writes it with every run's numbers to OUT/results.json.

    taskset -c 1 python bench/unlabeled_folder_digits.py --seeds 0 1 2 --threads 1
    python bench/unlabeled_folder_digits.py --seeds 0 --extra "--max_train_steps 5"   # a smoke test
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fixmatch_accel.config import DEMO  # noqa: E402
from fixmatch_accel.data.digits import load_digits_dataset  # noqa: E402
from fixmatch_accel.data.split import select_labeled  # noqa: E402

NUM_CLASSES = 10
# The demo's settings as flags, less what names its data, labels, seed and output; no evaluation or checkpoint
# during the run (as in bench/algorithms_digits.py): only the final evaluation is read.
SKIP = {"dataset_name", "num_labeled", "seed", "output_dir", "eval_steps", "checkpointing_steps"}
DEMO_FLAGS = [f for k, v in DEMO.items() if k not in SKIP
              for f in ([f"--{k}" if v else f"--no-{k}"] if isinstance(v, bool) else [f"--{k}", str(v)])]
DEMO_FLAGS += ["--eval_steps", "0", "--checkpointing_steps", "0", "--no-plots"]
ARMS = {"fixmatch": [], "labels only": ["--lambda_u", "0"]}


def write_images(data: Path, seeds: list) -> None:
    """The image folders above; the split's train/test rows and pixels are the demo's (load_digits_dataset)."""
    split = json.loads((ROOT / "fixmatch_accel" / "data" / "digits_split.json").read_text())
    demo = load_digits_dataset()
    train, test = demo["train"], demo["test"]
    for pos, (index, row) in enumerate(zip(split["train"], train)):
        path = data / "unlabeled" / "abc"[pos % 3] / f"{pos // 100:02d}" / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        row["image"].save(path)
    for seed in seeds:
        for pos in select_labeled(train["label"], DEMO["num_labeled"], NUM_CLASSES, seed):
            path = data / f"labeled_s{seed}" / str(train[pos]["label"]) / f"{split['train'][pos]:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            train[pos]["image"].save(path)
    for index, row in zip(split["test"], test):
        path = data / "val" / str(row["label"]) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        row["image"].save(path)


def run_one(out: Path, data: Path, arm: str, seed: int, threads: int, extra: list) -> dict:
    folder = out / f"{arm.replace(' ', '_')}_s{seed}"
    results, timing = folder / "eval_results.json", folder / "bench_wall.json"
    record = dict(arm=arm, seed=seed, output_dir=str(folder))
    if results.exists():
        wall = json.loads(timing.read_text())["wall_s"] if timing.exists() else None
        return dict(record, **json.loads(results.read_text()), wall_s=wall, skipped=True)
    cmd = [sys.executable, str(ROOT / "train.py"), "--train_dir", str(data / f"labeled_s{seed}"),
           "--validation_dir", str(data / "val"), "--unlabeled_dir", str(data / "unlabeled"), *DEMO_FLAGS,
           "--seed", str(seed), "--output_dir", str(folder), *ARMS[arm], *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = round(time.perf_counter() - start, 1)
    (folder / "bench_stdout.txt").write_text(proc.stdout)
    (folder / "bench_stderr.txt").write_text(proc.stderr)
    if proc.returncode or not results.exists():
        print(f"FAILED {folder.name} (exit {proc.returncode}, {wall} s):\n{proc.stderr[-2000:]}", flush=True)
        return dict(record, failed=True, returncode=proc.returncode, wall_s=wall, command=cmd)
    timing.write_text(json.dumps(dict(wall_s=wall)))
    print(f"{folder.name}: top1 {json.loads(results.read_text())['top1']:.2f}%  {wall} s", flush=True)
    return dict(record, **json.loads(results.read_text()), wall_s=wall, skipped=False, command=cmd)


def markdown(runs: list, seeds: list) -> str:
    by = {(r["arm"], r["seed"]): r for r in runs if not r.get("failed")}
    top1 = {arm: [by[arm, s]["top1"] if (arm, s) in by else None for s in seeds] for arm in ARMS}
    lines = ["| seed | FixMatch + `--unlabeled_dir`: EMA top-1 % | labels only (`--lambda_u 0`) | gap (points) "
             "| run time s (FixMatch / labels only) |", "| --- | --- | --- | --- | --- |"]

    def fmt(v, signed=False):
        return "—" if v is None else (f"{v:+.2f}" if signed else f"{v:.2f}")

    gaps = []
    for i, s in enumerate(seeds):
        fm, lo = top1["fixmatch"][i], top1["labels only"][i]
        gap = fm - lo if fm is not None and lo is not None else None
        gaps += [gap] if gap is not None else []
        walls = " / ".join(f"{by[a, s]['wall_s']:.0f}" if (a, s) in by else "—" for a in ARMS)
        lines.append(f"| {s} | {fmt(fm)} | {fmt(lo)} | {fmt(gap, True)} | {walls} |")

    def mean(values, signed=False):
        values = [v for v in values if v is not None]
        if not values:
            return "—"
        sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return fmt(statistics.mean(values), signed) + sd

    lines.append(f"| mean ± std | {mean(top1['fixmatch'])} | {mean(top1['labels only'])} | {mean(gaps, True)} | |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_unlabeled_folder")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (torch threads) of each run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--extra", default="", help="more train.py flags for every run, e.g. for a smoke test")
    args = p.parse_args()
    data = args.out / "data"
    write_images(data, args.seeds)
    start = time.perf_counter()
    runs = [run_one(args.out, data, arm, s, args.threads, shlex.split(args.extra)) for s in args.seeds for arm in ARMS]
    total = round(time.perf_counter() - start, 1)
    table = markdown(runs, args.seeds)
    print(f"\n{table}\n\n{len(runs)} runs, {sum(r.get('failed', False) for r in runs)} failed, {total} s")
    summary = dict(command=" ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), total_wall_s=total,
                   threads=args.threads, extra=args.extra, demo_flags=DEMO_FLAGS, table=table, runs=runs)
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
