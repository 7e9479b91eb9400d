"""Plots of a run from the files it leaves: `training_curves.png` and `per_class.png`.

`fixmatch-plot OUTPUT_DIR` (or `write_plots(output_dir)`) reads metrics.jsonl,
config.json and eval_results.json. Figures are drawn with matplotlib's object API on
the Agg canvas: no display, and no change to the pyplot backend of a caller's session.
"""

import argparse
import json
import os
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import UsageError

# Classes up to this many get one labelled bar each; more get a scatter plot.
MAX_BARS = 40
# A class whose share of confident pseudo-labels is under this fraction of an even share is flagged.
STARVED = 0.5
DPI = 110


def read_metrics(path: str) -> Tuple[List[Dict], List[Dict]]:
    """metrics.jsonl -> (train rows, eval rows), each sorted by step, as the run's surviving history.

    A resumed run appends from its checkpoint's step, so a row whose step goes back
    (or repeats one of its kind) discards every earlier row from that step on: the
    last row for a step wins, and an abandoned tail is dropped. A line cut short by
    a kill is skipped.
    """
    rows: List[Dict] = []
    last, seen = -1, set()
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                continue
            key = ("eval" if "top1" in row else "train", row["step"])
            if row["step"] < last or key in seen:
                rows = [r for r in rows if r["step"] < row["step"]]
                seen = {("eval" if "top1" in r else "train", r["step"]) for r in rows}
            rows.append(row)
            seen.add(key)
            last = row["step"]
    return [r for r in rows if "top1" not in r], [r for r in rows if "top1" in r]


def _read_json(path: str) -> Dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _series(rows: Sequence[Dict], key: str, scale: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that hold `key`; None (a JSON null) becomes NaN."""
    picked = [(r["step"], r[key]) for r in rows if key in r]
    steps = np.array([s for s, _ in picked], dtype=float)
    values = np.array([np.nan if v is None else v * scale for _, v in picked], dtype=float)
    return steps, values


def _line(ax, rows, key, label=None, scale=1.0, **kwargs):
    steps, values = _series(rows, key, scale)
    if len(steps):
        # Markers keep a short run (even a single row) visible; long runs read better as lines.
        ax.plot(steps, values, label=label, marker="o" if len(steps) <= 60 else None, markersize=3, **kwargs)
    return len(steps)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _class_names(config: Dict, results: Dict, eval_rows: List[Dict], train_rows: List[Dict]) -> List[str]:
    if config.get("label_names"):
        return [str(n) for n in config["label_names"]]
    if isinstance(results.get("per_class"), dict):
        return list(results["per_class"])
    n = max([len(r.get("per_class") or []) for r in eval_rows]
            + [len(r.get("mask_per_class") or []) for r in train_rows] + [0])
    return [f"class {i}" for i in range(n)]


def _final_accuracy(names: List[str], results: Dict, eval_rows: List[Dict]) -> Optional[np.ndarray]:
    """Per-class top-1 (%) of the final evaluation (NaN for a class absent from the eval split), or None."""
    per_class = results.get("per_class")
    if isinstance(per_class, dict):
        values = [per_class.get(n) for n in names]
    elif eval_rows and eval_rows[-1].get("per_class"):
        values = list(eval_rows[-1]["per_class"])[: len(names)]
        values += [None] * (len(names) - len(values))
    else:
        return None
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _mask_counts(num_classes: int, train_rows: List[Dict]) -> np.ndarray:
    """Confident pseudo-labels per predicted class, summed over the run's logging windows."""
    counts = np.zeros(num_classes)
    for r in train_rows:
        c = np.asarray(r.get("mask_per_class") or [], dtype=float)[:num_classes]
        counts[: len(c)] += c
    return counts


def _run_title(output_dir: str, config: Dict) -> str:
    parts = [os.path.basename(os.path.normpath(output_dir)) or output_dir]
    if config.get("architecture"):
        parts.append(str(config["architecture"]))
    num_labeled = (config.get("resolved") or {}).get("num_labeled")
    if num_labeled is not None:
        parts.append(f"{num_labeled} labels")
    if config.get("num_classes"):
        parts.append(f"{config['num_classes']} classes")
    return f"FixMatch run {parts[0]}" + (": " + ", ".join(parts[1:]) if parts[1:] else "")


def plot_training_curves(path: str, train_rows: List[Dict], eval_rows: List[Dict], config: Dict, title: str) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    threshold = (config.get("settings") or {}).get("threshold")
    fig = Figure(figsize=(15, 8.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 3, sharex=True).ravel()
    fig.suptitle(title, fontsize=13)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by all panels
    for ax in axes[3:]:
        ax.set_xlabel("optimizer step")

    ax = axes[0]
    ax.set_title("Training loss (mean over each logging window)")
    ax.set_ylabel("cross-entropy (nats)")
    if _line(ax, train_rows, "loss_x", "labeled  loss_x") + _line(ax, train_rows, "loss_u", "unlabeled  loss_u"):
        _line(ax, train_rows, "loss", "total", color="0.6", linewidth=1)
        ax.legend(loc="upper right")
    else:
        _empty(ax, "no training rows yet")

    ax = axes[1]
    tau = f" \u2265 {threshold:g}" if isinstance(threshold, (int, float)) else " \u2265 threshold"
    ax.set_title(f"Mask ratio: unlabeled images with confidence{tau}")
    ax.set_ylabel("% of unlabeled images")
    ax.set_ylim(-2, 102)
    if not _line(ax, train_rows, "mask_ratio", scale=100.0, color="tab:purple"):
        _empty(ax, "no training rows yet")

    ax = axes[2]
    ax.set_title("Pseudo-label accuracy (confident ones only)")
    ax.set_ylabel("% matching the true label")
    ax.set_ylim(-2, 102)
    if not _line(ax, train_rows, "pseudo_label_acc", scale=100.0, color="tab:green"):
        _empty(ax, "no training rows yet")
    elif all(r.get("pseudo_label_acc") is None for r in train_rows):  # null: no confident image in the window
        _empty(ax, "no image has passed the threshold yet")

    ax = axes[3]
    ax.set_title("EMA model accuracy on the eval split")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    if _line(ax, eval_rows, "top1", "top-1", color="tab:blue"):
        k = min(5, config.get("num_classes") or 5)  # top5 is top-k with fewer than five classes
        _line(ax, eval_rows, "top5", f"top-{k}", color="tab:orange", linestyle="--")
        last = eval_rows[-1]
        ax.annotate(f"{last['top1']:.2f}%", (last["step"], last["top1"]), textcoords="offset points",
                    xytext=(-4, -14), ha="right", color="tab:blue")
        ax.legend(loc="best")  # a fixed corner hid early low-accuracy points
    else:
        _empty(ax, "no evaluation yet")

    ax = axes[4]
    ax.set_title("Learning rate (the rate each logged step used)")
    ax.set_ylabel("learning rate")
    if not _line(ax, train_rows, "lr", color="tab:red"):
        _empty(ax, "no training rows yet")

    ax = axes[5]
    ax.set_title("Throughput (labeled + unlabeled, all processes)")
    ax.set_ylabel("images per second")
    if not _line(ax, train_rows, "images_per_s", color="0.3"):
        _empty(ax, "no training rows yet")
    return _save(fig, path)


def plot_per_class(path: str, names: List[str], accuracy: Optional[np.ndarray], counts: np.ndarray,
                   title: str) -> str:
    from matplotlib.figure import Figure

    n = len(names)
    total = counts.sum()
    share = counts / total * 100 if total > 0 else np.full(n, np.nan)
    even = 100.0 / max(n, 1)
    starved = share < STARVED * even
    headline = (f"{title}\nPer class: final EMA top-1 accuracy and share of the run's "
                f"{int(total):,} confident pseudo-label{'' if total == 1 else 's'} (dashed: an even share, 1/{n})")
    if n <= MAX_BARS:
        fig = Figure(figsize=(12, max(3.5, 0.32 * n + 2.0)), dpi=DPI, layout="constrained")
        ax_acc, ax_share = fig.subplots(1, 2, sharey=True)
        y = np.arange(n)
        ax_acc.invert_yaxis()  # first class on top, as listed in label_names
        ax_acc.set_yticks(y, names)
        ax_acc.set_title("Final EMA top-1 accuracy (red: starved classes)")
        ax_acc.set_xlabel("accuracy (%)")
        ax_acc.set_xlim(0, 112)
        if accuracy is None:
            _empty(ax_acc, "no evaluation yet")
        else:
            ax_acc.barh(y, np.nan_to_num(accuracy), color=np.where(starved, "tab:red", "tab:blue"))
            for i, a in enumerate(accuracy):
                ax_acc.text(0 if np.isnan(a) else a, i, " n/a" if np.isnan(a) else f" {a:.0f}%", va="center",
                            fontsize=8)
        ax_share.set_title(f"Share of confident pseudo-labels (red: under {STARVED:g} x even share)")
        ax_share.set_xlabel("% of the run's confident pseudo-labels, by predicted class")
        if total > 0:
            ax_share.barh(y, share, color=np.where(starved, "tab:red", "tab:purple"))
            ax_share.set_xlim(0, max(np.nanmax(share), even) * 1.18)
            for i, s in enumerate(share):
                ax_share.text(s, i, f" {s:.1f}%", va="center", fontsize=8)
        else:
            ax_share.set_xlim(0, 2 * even)
            _empty(ax_share, "no confident pseudo-labels yet\n(no prediction reached the threshold)")
        ax_share.axvline(even, color="0.3", linestyle="--", linewidth=1)
        for ax in (ax_acc, ax_share):
            ax.grid(axis="x", alpha=0.3)
    else:
        # Too many classes for readable bars: one point per class, the most starved named.
        fig = Figure(figsize=(11, 7.5), dpi=DPI, layout="constrained")
        ax = fig.subplots()
        ax.set_xlabel("% of the run's confident pseudo-labels, by predicted class")
        ax.set_ylabel("final EMA top-1 accuracy (%)")
        ax.axvline(even, color="0.3", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
        if accuracy is None or total == 0:
            _empty(ax, "no evaluation yet" if accuracy is None else "no confident pseudo-labels yet")
        else:
            ax.scatter(share, accuracy, s=14, c=np.where(starved, "tab:red", "tab:blue"))
            for i in np.argsort(share)[:8]:
                ax.annotate(names[i], (share[i], accuracy[i]), textcoords="offset points", xytext=(4, 2), fontsize=8)
            ax.set_title(f"Red: under {STARVED:g} x an even share; the 8 lowest shares are named")
    fig.suptitle(headline, fontsize=12)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    tmp = path + ".tmp"
    with warnings.catch_warnings():
        # class names in a script the font lacks draw as boxes; a warning per glyph would flood the run's log
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(tmp, format="png")  # written whole, then renamed: a reader never sees half a file
    os.replace(tmp, path)
    return path


def write_plots(output_dir: str) -> List[str]:
    """Write training_curves.png and per_class.png into `output_dir`; return their paths."""
    if not os.path.isdir(output_dir):
        raise UsageError(f"{output_dir!r}: no such folder")
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise UsageError(f"{output_dir!r} has no metrics.jsonl (not a fixmatch-train output folder, or no step logged)")
    train_rows, eval_rows = read_metrics(metrics_path)
    if not train_rows and not eval_rows:
        raise UsageError(f"{metrics_path!r} holds no rows yet")
    config = _read_json(os.path.join(output_dir, "config.json"))
    results = _read_json(os.path.join(output_dir, "eval_results.json"))
    title = _run_title(output_dir, config)
    names = _class_names(config, results, eval_rows, train_rows)
    return [
        plot_training_curves(os.path.join(output_dir, "training_curves.png"), train_rows, eval_rows, config, title),
        plot_per_class(os.path.join(output_dir, "per_class.png"), names, _final_accuracy(names, results, eval_rows),
                       _mask_counts(len(names), train_rows), title),
    ]


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import report_usage_errors

    parser = argparse.ArgumentParser(
        prog="fixmatch-plot",
        description="Draw training_curves.png and per_class.png from a fixmatch-train output folder.")
    parser.add_argument("output_dir", help="the run's --output_dir (holds metrics.jsonl)")
    args = parser.parse_args(argv)

    def run() -> int:
        for path in write_plots(args.output_dir):
            print(path)
        return 0

    return report_usage_errors("fixmatch-plot", run)


if __name__ == "__main__":
    sys.exit(main())
