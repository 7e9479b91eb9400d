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
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .algorithms import ALGORITHMS
from .errors import UsageError

# Classes up to this many get one labelled bar each; more get a scatter plot.
MAX_BARS = 40
# A class whose share of confident pseudo-labels is under this fraction of an even share is starved; it is drawn
# red when its accuracy is also below the mean (a starved class the model still gets right needs no attention).
STARVED = 0.5
DPI = 110
# Up to this many classes get a threshold line each (tab10's ten colours); more get a lowest-to-highest band.
MAX_THRESHOLD_LINES = 10


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
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or "restart" in row:
                continue  # not a row, or a restart's record (the resumed steps that follow drop the lost tail)
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


def _threshold_series(train_rows: Sequence[Dict]) -> Tuple[np.ndarray, np.ndarray]:
    """(steps, [rows, classes] thresholds) of the rows that log `threshold_per_class`; a missing value is NaN."""
    picked = [r for r in train_rows if isinstance(r.get("threshold_per_class"), list)]
    values = np.full((len(picked), max([len(r["threshold_per_class"]) for r in picked] + [0])), np.nan)
    for i, r in enumerate(picked):
        values[i, : len(r["threshold_per_class"])] = [np.nan if v is None else v for v in r["threshold_per_class"]]
    return np.array([r["step"] for r in picked], dtype=float), values


def _final_thresholds(num_classes: int, train_rows: List[Dict]) -> Optional[np.ndarray]:
    """The last logging window's `threshold_per_class` (NaN for a class it lacks), or None (an older run's log)."""
    _, values = _threshold_series(train_rows)
    if not values.size:
        return None
    last = np.full(num_classes, np.nan)
    last[: min(num_classes, values.shape[1])] = values[-1, :num_classes]
    return last


def _algorithm(config: Dict):
    """The run's registered algorithm; None for one this version does not know (its plots stay generic)."""
    name = str((config.get("settings") or {}).get("algorithm") or "fixmatch")  # runs before --algorithm: fixmatch
    return ALGORITHMS.get(name)


def _run_title(output_dir: str, config: Dict) -> str:
    parts = [os.path.basename(os.path.normpath(output_dir)) or output_dir]
    if config.get("architecture"):
        parts.append(str(config["architecture"]))
    num_labeled = (config.get("resolved") or {}).get("num_labeled")
    if num_labeled is not None:
        parts.append(f"{num_labeled} labels")
    if config.get("num_classes"):
        parts.append(f"{config['num_classes']} classes")
    dist_align = (config.get("settings") or {}).get("dist_align")
    if dist_align not in (None, "none"):
        parts.append(f"dist_align {dist_align}")
    algorithm = _algorithm(config)
    title = algorithm.title if algorithm else str((config.get("settings") or {}).get("algorithm"))
    return f"{title} run {parts[0]}" + (": " + ", ".join(parts[1:]) if parts[1:] else "")


def plot_training_curves(path: str, train_rows: List[Dict], eval_rows: List[Dict], config: Dict, title: str,
                         names: Sequence[str] = ()) -> str:
    """The run's curves; a run that logs `threshold_per_class` gets a full-width row of thresholds below them."""
    steps, thresholds = _threshold_series(train_rows)
    fig, axes = _curves_figure(title, with_thresholds=thresholds.size > 0)
    _loss_panel(axes["loss"], train_rows)
    _mask_panel(axes["mask"], train_rows, config)
    _pseudo_label_panel(axes["pseudo_label"], train_rows)
    _accuracy_panel(axes["accuracy"], eval_rows, config)

    ax = axes["lr"]
    ax.set_title("Learning rate (the rate each logged step used)")
    ax.set_ylabel("learning rate")
    if not _line(ax, train_rows, "lr", color="tab:red"):
        _empty(ax, "no training rows yet")

    ax = axes["throughput"]
    ax.set_title("Throughput (labeled + unlabeled, all processes)")
    ax.set_ylabel("images per second")
    if not _line(ax, train_rows, "images_per_s", color="0.3"):
        _empty(ax, "no training rows yet")

    if thresholds.size:
        _threshold_panel(axes["threshold"], steps, thresholds, names, config)
    return _save(fig, path)


def _curves_figure(title: str, with_thresholds: bool):
    """The figure and its panels by name, all sharing the step axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # Thresholds take a full-width row: up to ten lines (or a band) need the width more than the others do.
    mosaic = [["loss", "mask", "pseudo_label"], ["accuracy", "lr", "throughput"]]
    mosaic += [["threshold"] * 3] if with_thresholds else []
    fig = Figure(figsize=(15, 12.5 if with_thresholds else 8.5), dpi=DPI, layout="constrained")
    axes = fig.subplot_mosaic(mosaic, sharex=True, height_ratios=[1, 1, 1.1][: len(mosaic)])
    fig.suptitle(title, fontsize=13)
    for ax in axes.values():
        ax.grid(alpha=0.3)
    axes["loss"].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by all panels
    for name in set(mosaic[-1]):
        axes[name].set_xlabel("optimizer step")
    return fig, axes


def _loss_panel(ax, train_rows: List[Dict]) -> None:
    ax.set_title("Training loss (mean over each logging window)")
    ax.set_ylabel("cross-entropy (nats)")
    if _line(ax, train_rows, "loss_x", "labeled  loss_x") + _line(ax, train_rows, "loss_u", "unlabeled  loss_u"):
        _line(ax, train_rows, "loss_f", "fairness  loss_f", color="tab:olive")  # FreeMatch's, in its total
        _line(ax, train_rows, "loss", "total", color="0.6", linewidth=1)
        ax.legend(loc="upper right")
    else:
        _empty(ax, "no training rows yet")


def _mask_panel(ax, train_rows: List[Dict], config: Dict) -> None:
    algorithm, threshold = _algorithm(config), (config.get("settings") or {}).get("threshold")
    means = algorithm.mask_means if algorithm else "confidence \u2265 --threshold"
    if isinstance(threshold, (int, float)):
        means = means.replace("--threshold", f"{threshold:g}")
    ax.set_title(f"Mask ratio: unlabeled images with {means}")
    ax.set_ylabel("% of unlabeled images")
    ax.set_ylim(-2, 102)
    if not _line(ax, train_rows, "mask_ratio", "mask ratio", scale=100.0, color="tab:purple"):
        _empty(ax, "no training rows yet")
    elif _line(ax, train_rows, "mean_weight", "mean weight (% of full)", scale=100.0, color="tab:pink"):
        ax.legend(loc="lower right")  # SoftMatch: how much of its loss the unlabeled images carry


def _pseudo_label_panel(ax, train_rows: List[Dict]) -> None:
    ax.set_title("Pseudo-label accuracy (confident ones only)")
    ax.set_ylabel("% matching the true label")
    ax.set_ylim(-2, 102)
    if not _line(ax, train_rows, "pseudo_label_acc", scale=100.0, color="tab:green"):
        _empty(ax, "no training rows yet")
    elif all(r.get("pseudo_label_acc") is None for r in train_rows):  # null: no confident image of known class
        _empty(ax, "no confident image with a known class yet\n(unlabeled images without labels have none)")


def _accuracy_panel(ax, eval_rows: List[Dict], config: Dict) -> None:
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


def _threshold_panel(ax, steps: np.ndarray, thresholds: np.ndarray, names: Sequence[str], config: Dict) -> None:
    """Each class's threshold against the step: one line when all agree, a line a class, or their spread."""
    num_classes = thresholds.shape[1]
    ax.set_title("Confidence threshold per class (mean over each logging window)")
    ax.set_ylabel("threshold (max probability)")
    ax.set_ylim(-0.02, 1.02)
    style = dict(marker="o" if len(steps) <= 60 else None, markersize=3)
    if (np.abs(thresholds - thresholds[:, :1]) <= 1e-6).all():  # fixmatch's fixed one, softmatch's mean
        what = _algorithm(config).equal_thresholds_mean if _algorithm(config) else "one threshold"
        ax.plot(steps, thresholds[:, 0], label=f"all {num_classes} classes: {what}", color="tab:brown", **style)
    elif num_classes <= MAX_THRESHOLD_LINES:
        for c in range(num_classes):
            ax.plot(steps, thresholds[:, c], label=names[c] if c < len(names) else f"class {c}", **style)
    else:
        # More lines than tab10 has colours would be a tangle no legend can name: the band shows the spread.
        ax.fill_between(steps, thresholds.min(axis=1), thresholds.max(axis=1), color="tab:brown", alpha=0.25,
                        label=f"lowest to highest of {num_classes} classes")
        ax.plot(steps, thresholds.mean(axis=1), label="mean over classes", color="tab:brown", **style)
    threshold = (config.get("settings") or {}).get("threshold")
    if _algorithm(config) and _algorithm(config).threshold_is_ceiling and isinstance(threshold, (int, float)):
        ax.axhline(threshold, color="0.3", linestyle="--", linewidth=1, label=f"--threshold {threshold:g} (the most)")
    ax.legend(loc="best", fontsize=8, ncols=2 if num_classes > 5 else 1)


class ClassStats(NamedTuple):
    """What per_class.png shows of each class; share and starved are NaN/False without confident pseudo-labels."""

    names: List[str]
    accuracy: Optional[np.ndarray]  # final EMA top-1 (%), None without an evaluation
    share: np.ndarray  # % of the run's confident pseudo-labels, by predicted class
    starved: np.ndarray  # share under STARVED x an even share
    flagged: np.ndarray  # drawn red: starved and below the mean accuracy (starved alone without an evaluation)
    red: str  # what red means, for the panel titles
    even: float  # an even share (%)
    total: float  # the run's confident pseudo-labels
    thresholds: Optional[np.ndarray]  # the last window's threshold per class, None for an older run's log


def plot_per_class(path: str, names: List[str], accuracy: Optional[np.ndarray], counts: np.ndarray,
                   title: str, thresholds: Optional[np.ndarray] = None) -> str:
    n = len(names)
    total = counts.sum()
    share = counts / total * 100 if total > 0 else np.full(n, np.nan)
    even = 100.0 / max(n, 1)
    starved = share < STARVED * even
    if accuracy is not None and np.isfinite(accuracy).any():
        mean = float(np.nanmean(accuracy))
        flagged, red = starved & (accuracy < mean), f"starved and below the mean accuracy {mean:.0f}%"
    else:
        flagged, red = starved, "starved"
    stats = ClassStats(names, accuracy, share, starved, flagged, red, even, total, thresholds)
    fig = _per_class_bars(stats) if n <= MAX_BARS else _per_class_scatter(stats)
    fig.suptitle(f"{title}\nPer class: final EMA top-1 accuracy and share of the run's {int(total):,} confident "
                 f"pseudo-label{'' if total == 1 else 's'} (dashed: an even share, 1/{n})", fontsize=12)
    return _save(fig, path)


def _per_class_bars(s: ClassStats):
    """One labelled row a class: accuracy, share of pseudo-labels and (when logged) the final threshold."""
    from matplotlib.figure import Figure

    n = len(s.names)
    panels = 2 if s.thresholds is None else 3
    fig = Figure(figsize=(6 * panels, max(3.5, 0.32 * n + 2.0)), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, panels, sharey=True)
    y = np.arange(n)
    axes[0].invert_yaxis()  # first class on top, as listed in label_names
    axes[0].set_yticks(y, s.names)
    _accuracy_bars(axes[0], y, s)
    _share_bars(axes[1], y, s)
    if s.thresholds is not None:
        ax = axes[2]
        ax.set_title(f"Final confidence threshold (last logging window; red: {s.red})")
        ax.set_xlabel("threshold (max probability)")
        ax.set_xlim(0, 1.15)
        ax.scatter(s.thresholds, y, s=24, c=np.where(s.flagged, "tab:red", "tab:brown"), zorder=3)
        for i, t in enumerate(s.thresholds):
            ax.text(0 if np.isnan(t) else t, i, "  n/a" if np.isnan(t) else f"  {t:.2f}", va="center", fontsize=8)
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    return fig


def _accuracy_bars(ax, y: np.ndarray, s: ClassStats) -> None:
    ax.set_title(f"Final EMA top-1 accuracy (red: {s.red})")
    ax.set_xlabel("accuracy (%)")
    ax.set_xlim(0, 112)
    if s.accuracy is None:
        _empty(ax, "no evaluation yet")
        return
    ax.barh(y, np.nan_to_num(s.accuracy), color=np.where(s.flagged, "tab:red", "tab:blue"))
    for i, a in enumerate(s.accuracy):
        ax.text(0 if np.isnan(a) else a, i, " n/a" if np.isnan(a) else f" {a:.0f}%", va="center", fontsize=8)


def _share_bars(ax, y: np.ndarray, s: ClassStats) -> None:
    ax.set_title(f"Share of confident pseudo-labels (starved: under {STARVED:g} x an even share; red: {s.red})")
    ax.set_xlabel("% of the run's confident pseudo-labels, by predicted class")
    ax.axvline(s.even, color="0.3", linestyle="--", linewidth=1)
    if s.total > 0:
        ax.barh(y, s.share, color=np.where(s.flagged, "tab:red", "tab:purple"))
        ax.set_xlim(0, max(np.nanmax(s.share), s.even) * 1.18)
        for i, share in enumerate(s.share):
            ax.text(share, i, f" {share:.1f}%", va="center", fontsize=8)
    else:
        ax.set_xlim(0, 2 * s.even)
        _empty(ax, "no confident pseudo-labels yet\n(no prediction reached the threshold)")


def _per_class_scatter(s: ClassStats):
    """Too many classes for readable bars: one point a class, the most starved named; thresholds in label order."""
    from matplotlib.figure import Figure

    with_thresholds = s.thresholds is not None
    fig = Figure(figsize=(17 if with_thresholds else 11, 7.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2, width_ratios=[11, 6]) if with_thresholds else [fig.subplots()]
    ax = axes[0]
    ax.set_xlabel("% of the run's confident pseudo-labels, by predicted class")
    ax.set_ylabel("final EMA top-1 accuracy (%)")
    ax.axvline(s.even, color="0.3", linestyle="--", linewidth=1)
    if s.accuracy is None or s.total == 0:
        _empty(ax, "no evaluation yet" if s.accuracy is None else "no confident pseudo-labels yet")
    else:
        ax.scatter(s.share, s.accuracy, s=14, c=np.where(s.flagged, "tab:red", "tab:blue"))
        for i in np.argsort(s.share)[:8]:
            ax.annotate(s.names[i], (s.share[i], s.accuracy[i]), textcoords="offset points", xytext=(4, 2),
                        fontsize=8)
        ax.set_title(f"Red: {s.red} (starved: under {STARVED:g} x an even share); the 8 lowest shares are named")
    if with_thresholds:
        ax = axes[1]
        ax.set_title(f"Final confidence threshold per class (red: {s.red})")
        ax.set_xlabel("class, in label order")
        ax.set_ylabel("threshold (max probability)")
        ax.set_ylim(-0.02, 1.02)
        order = np.argsort(s.flagged, kind="stable")  # red classes drawn last, over their neighbours
        ax.scatter(order, s.thresholds[order], s=14, c=np.where(s.flagged[order], "tab:red", "tab:brown"))
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


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
        plot_training_curves(os.path.join(output_dir, "training_curves.png"), train_rows, eval_rows, config, title,
                             names),
        plot_per_class(os.path.join(output_dir, "per_class.png"), names, _final_accuracy(names, results, eval_rows),
                       _mask_counts(len(names), train_rows), title, _final_thresholds(len(names), train_rows)),
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
