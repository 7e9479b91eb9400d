"""Every registered algorithm against FixMatch on the digits demo, at 1 and 2 labels per class.

Runs train.py's built-in demo (scikit-learn digits, small_cnn, 16 px, 400 steps; fixmatch_accel/config.py
DEMO) once per labels-per-class x algorithm x seed, plus a labels-only reference (`--lambda_u 0`) per
labels x seed, each as a subprocess into its own folder under --out. A run whose eval_results.json is
there already is skipped, so running the same command again resumes the grid. Prints a markdown table
(EMA top-1 mean +- sample std over seeds, the per-seed values, the gap to FixMatch, mean run time) and
writes it with every run's numbers to OUT/results.json.

    python bench/algorithms_digits.py                                   # the full grid, one run at a time
    taskset -c 1 python bench/algorithms_digits.py --jobs 1 --threads 1 # as measured in bench/RESULTS.md
    python bench/algorithms_digits.py --seeds 0 --labels 1 --algorithms fixmatch --extra "--max_train_steps 20"
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10  # digits
sys.path.insert(0, str(ROOT))
from fixmatch_accel.algorithms import ALGORITHMS  # noqa: E402  (the registry: --algorithm's choices)

REFERENCE = "labels only"  # fixmatch with --lambda_u 0


def run_dir(out: Path, labels: int, algorithm: str, seed: int) -> Path:
    name = "labels_only" if algorithm == REFERENCE else algorithm
    return out / f"l{labels}_{name}_s{seed}"


def train_command(labels: int, algorithm: str, seed: int, folder: Path, extra: list) -> list:
    cmd = [sys.executable, str(ROOT / "train.py"), "--num_labeled", str(labels * NUM_CLASSES), "--seed", str(seed),
           "--eval_steps", "0", "--checkpointing_steps", "0", "--output_dir", str(folder)]
    cmd += ["--lambda_u", "0"] if algorithm == REFERENCE else ["--algorithm", algorithm]
    return cmd + extra


def run_one(job: tuple, out: Path, threads: int, extra: list) -> dict:
    """Train one cell (or read it back when done before). Returns the run's record."""
    labels, algorithm, seed = job
    folder = run_dir(out, labels, algorithm, seed)
    record = dict(labels_per_class=labels, algorithm=algorithm, seed=seed, output_dir=str(folder))
    results, timing = folder / "eval_results.json", folder / "bench_wall.json"
    if results.exists():
        wall = json.loads(timing.read_text())["wall_s"] if timing.exists() else None
        return dict(record, **json.loads(results.read_text()), wall_s=wall, skipped=True)
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.run(train_command(labels, algorithm, seed, folder, extra), cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = round(time.perf_counter() - start, 1)
    (folder / "bench_stdout.txt").write_text(proc.stdout)
    (folder / "bench_stderr.txt").write_text(proc.stderr)
    if proc.returncode or not results.exists():
        print(f"FAILED {folder.name} (exit {proc.returncode}, {wall} s):\n{proc.stderr[-2000:]}", flush=True)
        return dict(record, failed=True, returncode=proc.returncode, wall_s=wall)
    timing.write_text(json.dumps(dict(wall_s=wall)))
    record = dict(record, **json.loads(results.read_text()), wall_s=wall, skipped=False)
    print(f"{folder.name}: top1 {record['top1']:.2f}%  {wall} s", flush=True)
    return record


def mean_std(values: list) -> tuple:
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def pm(mean, std, signed=False) -> str:
    if mean is None:
        return "—"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text + (f" ± {std:.2f}" if std is not None else "")


def summarize(runs: list, labels: list, algorithms: list) -> list:
    """One row per labels x algorithm; the gap to FixMatch is paired by seed (same labeled split)."""
    rows = []
    for lab in labels:
        cell = {a: {r["seed"]: r for r in runs if r["labels_per_class"] == lab and r["algorithm"] == a}
                for a in algorithms}
        for a in algorithms:
            done = {s: r for s, r in cell[a].items() if not r.get("failed")}
            top1 = [done[s]["top1"] for s in sorted(done)]
            base = cell.get("fixmatch", {})
            gaps = [done[s]["top1"] - base[s]["top1"] for s in sorted(done)
                    if s in base and not base[s].get("failed")] if a != "fixmatch" else []
            walls = [r["wall_s"] for r in done.values() if r.get("wall_s") is not None]
            mean, std = mean_std(top1)
            gap, gap_std = mean_std(gaps)
            rows.append(dict(labels_per_class=lab, algorithm=a, top1_mean=mean, top1_std=std,
                             top1_by_seed={s: done[s]["top1"] for s in sorted(done)},
                             failed_seeds=sorted(s for s, r in cell[a].items() if r.get("failed")),
                             gap_vs_fixmatch=gap, gap_std=gap_std, wall_s_mean=mean_std(walls)[0]))
    return rows


def markdown(rows: list) -> str:
    lines = ["| labels/class | algorithm | EMA top-1 % (mean ± std) | per seed | vs FixMatch (paired) | run time s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        seeds = ", ".join(f"{s}: {v:.2f}" for s, v in r["top1_by_seed"].items())
        if r["failed_seeds"]:
            seeds += f" (FAILED seeds {r['failed_seeds']})"
        gap = "—" if r["algorithm"] == "fixmatch" else pm(r["gap_vs_fixmatch"], r["gap_std"], signed=True)
        wall = f"{r['wall_s_mean']:.0f}" if r["wall_s_mean"] is not None else "—"
        lines.append(f"| {r['labels_per_class']} | {r['algorithm']} | {pm(r['top1_mean'], r['top1_std'])} | "
                     f"{seeds} | {gap} | {wall} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_algorithms")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (torch threads) of each run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--labels", type=int, nargs="+", default=[1, 2], help="labels per class (digits: 10 classes)")
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    p.add_argument("--no_reference", action="store_true", help="skip the labels-only (--lambda_u 0) runs")
    p.add_argument("--extra", default="", help="more train.py flags for every run, e.g. for a smoke test")
    args = p.parse_args()
    algorithms = args.algorithms + ([] if args.no_reference else [REFERENCE])
    jobs = [(lab, a, s) for lab in args.labels for a in algorithms for s in args.seeds]
    extra = shlex.split(args.extra)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda job: run_one(job, args.out, args.threads, extra), jobs))
    total = round(time.perf_counter() - start, 1)
    rows = summarize(runs, args.labels, algorithms)
    table = markdown(rows)
    print(f"\n{table}\n\n{len(jobs)} runs ({sum(r.get('skipped', False) for r in runs)} found done), "
          f"{sum(r.get('failed', False) for r in runs)} failed, {total} s")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = dict(command=" ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), total_wall_s=total,
                   jobs=args.jobs, threads=args.threads, extra=args.extra, table=table, rows=rows, runs=runs)
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
