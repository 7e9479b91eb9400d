"""`fixmatch-predict`: a trained run's model on image files, an image folder or a dataset split.

Images are prepared exactly as the training run's evaluation prepares them: decoded
(data.decode_image), made RGB at the run's size (data.to_rgb), then normalised on the
device with the run's mean and std (step.model_inputs). The predictions go to a CSV
file, one row per image; accuracy is printed when true labels are known.
"""

import argparse
import csv
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from PIL import Image as PILImage
from torchvision.transforms.functional import pil_to_tensor

from .data import BadImage, check_image_column, decode_image, load_named_dataset, pick_column, to_rgb
from .errors import UsageError, describe

TOP_K = 5


@dataclass
class Inputs:
    """What to predict: stored image values (a list, or one column of a datasets.Dataset) and what is known of each."""

    values: Sequence  # file {'path', 'bytes'} dicts, or undecoded datasets Image values
    names: Sequence[str]  # the CSV's `input`: a file path or a row number
    labels: Sequence[Optional[str]]  # true class names where known


@dataclass
class RunModel:
    """A run's final EMA model (eval mode) and how its inputs were prepared in training."""

    model: torch.nn.Module
    label_names: List[str]
    size: int  # square side, pixels
    mean: List[float]  # per channel, 0..1 units
    std: List[float]
    image_column: Optional[str] = None  # the training data's columns, from config.json's `resolved`
    label_column: Optional[str] = None
    load_size: Optional[int] = None  # decoded at this side, then resized to `size` on the device, as in training
    interpolation: str = "bilinear"


class _Images(torch.utils.data.Dataset):
    """(uint8 [3, size, size], index, error) per input; a bad image is a black filler with its error message."""

    def __init__(self, values: Sequence, size: int, interpolation: str = "bilinear"):
        self.values, self.size, self.interpolation = values, size, interpolation

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i):
        try:
            return pil_to_tensor(to_rgb(decode_image(self.values[i]), self.size, self.interpolation)), i, ""
        except BadImage as e:  # first line only: the message goes into one-line reports
            text = str(e).strip()
            error = text.splitlines()[0] if text else "unreadable"
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), i, error


def load_run_model(model_dir: str, device: torch.device) -> RunModel:
    """The run's final EMA model in eval mode on `device`, with its classes and input settings from config.json."""
    import json

    from safetensors.torch import load_file

    from .models import create_model

    if not os.path.isdir(model_dir):
        raise UsageError(f"--model_dir {model_dir!r}: no such folder")
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        architecture, num_classes = config["architecture"], int(config["num_classes"])
        input_size, mean, std = (config["pretrained_cfg"][k] for k in ("input_size", "mean", "std"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--model_dir {model_dir!r}: no readable config.json of a fixmatch-train run "
                         f"({type(e).__name__}: {e})") from None
    weights = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(weights):
        raise UsageError(f"--model_dir {model_dir!r}: no model.safetensors (a run writes it when training ends)")
    model = create_model(architecture, num_classes, in_chans=input_size[0], image_size=int(input_size[-1]))
    try:
        model.load_state_dict(load_file(weights))
    except Exception as e:  # a truncated file, or weights of another model
        raise UsageError(f"--model_dir {model_dir!r}: model.safetensors does not load into {architecture} "
                         f"({describe(e)})") from None
    names = [str(n) for n in config.get("label_names") or range(num_classes)]
    resolved = config.get("resolved") if isinstance(config.get("resolved"), dict) else {}
    return RunModel(model.to(device).eval(), names, int(input_size[-1]), list(mean), list(std),
                    resolved.get("image_column"), resolved.get("label_column"), resolved.get("load_size"),
                    resolved.get("interpolation", "bilinear"))


def image_folder_inputs(image_dir: str, label_names: Sequence[str]) -> Inputs:
    """Every image file under `image_dir`; a file in a subfolder named like a class has that true label."""
    if not os.path.isdir(image_dir):
        raise UsageError(f"--image_dir {image_dir!r}: no such folder")
    extensions = {e for e, f in PILImage.registered_extensions().items() if f in PILImage.OPEN}
    classes = set(label_names)
    paths = []
    for root, dirs, files in os.walk(image_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions]
    if not paths:
        raise UsageError(f"--image_dir {image_dir!r}: no image files in it")
    names = [os.path.relpath(p, image_dir) for p in paths]
    folders = [n.split(os.sep)[0] if os.sep in n else None for n in names]
    foreign = sorted({f for f in folders if f is not None and f not in classes})
    if foreign:  # a misspelt class folder would otherwise quietly drop out of the accuracy
        count = sum(f in foreign for f in folders)
        print(f"fixmatch-predict: --image_dir subfolder{'s' if len(foreign) > 1 else ''} {listed(foreign)} "
              f"{'are' if len(foreign) > 1 else 'is'} not among the model's classes ({listed(label_names)}): "
              f"{count} image{'s' if count > 1 else ''} without a true label", file=sys.stderr)
    labels = [f if f in classes else None for f in folders]
    return Inputs([dict(path=p, bytes=None) for p in paths], names, labels)


def listed(names: Sequence[str], limit: int = 20) -> str:
    """`a, b, c`, cut after `limit` names: a 1000-class model still gets one readable line."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def file_inputs(files: Sequence[str]) -> Inputs:
    for path in files:
        if os.path.isdir(path):
            raise UsageError(f"image {path!r} is a folder: give it with --image_dir")
        if not os.path.isfile(path):
            raise UsageError(f"image {path!r}: no such file")
    return Inputs([dict(path=p, bytes=None) for p in files], list(files), [None] * len(files))


def dataset_columns(features, args, run: RunModel):
    """(image column, label column or None): the flags, else the run's recorded columns, else by feature type."""
    from datasets import ClassLabel, Image, Value

    if args.image_column_name is None and isinstance(features.get(run.image_column), Image):
        image_col = run.image_column
    else:
        image_col = pick_column(features, "image_column_name", args.image_column_name, Image, "Image")
        check_image_column(features, image_col)
    if args.label_column_name is not None:
        return image_col, pick_column(features, "label_column_name", args.label_column_name, ClassLabel, "ClassLabel")
    recorded = features.get(run.label_column)
    dtype = recorded.dtype if isinstance(recorded, Value) else ""
    # training also takes plain int / string labels (its class names are their str values)
    if isinstance(recorded, ClassLabel) or dtype.startswith(("int", "uint")) or dtype == "string":
        return image_col, run.label_column
    found = [k for k, v in features.items() if isinstance(v, ClassLabel)]
    return image_col, found[0] if len(found) == 1 else None  # optional here: predictions need no labels


def dataset_inputs(args, run: RunModel) -> Inputs:
    """A split of a hub / local dataset (or 'digits'), loaded as training loads it, images left undecoded."""
    from datasets import ClassLabel, Image

    raw = load_named_dataset(args.dataset_name, args.dataset_config_name)
    split = args.split or next((s for s in ("validation", "test") if s in raw), None)
    if split is None or split not in raw:
        what = f"--split {args.split!r}: no such split" if args.split else "no 'validation' or 'test' split"
        raise UsageError(f"{what} (splits: {', '.join(raw)}): name one with --split")
    dataset = raw[split]
    features = dataset.features
    image_col, label_col = dataset_columns(features, args, run)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    dataset = dataset.cast_column(image_col, Image(decode=False))
    labels = [None] * len(dataset)
    if label_col is not None:
        feature = features[label_col]
        # ClassLabel -1 (and None) is datasets' "no label", as in hidden-label test splits
        labels = [None if v is None or (isinstance(feature, ClassLabel) and v < 0)
                  else feature.int2str(v) if isinstance(feature, ClassLabel) else str(v)
                  for v in dataset[label_col]]
    return Inputs(_Column(dataset, image_col), [str(i) for i in range(len(dataset))], labels)


class _Column:
    """One column of a datasets.Dataset, read row by row: a large split never sits in memory whole."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[int(i)][self.column]


@torch.inference_mode()
def predict(run: RunModel, inputs: Inputs, device: torch.device, batch_size: int = 256, num_workers: int = 0,
            show_progress: Optional[bool] = None):
    """(rows for the CSV, [(name, error)] of the images that could not be read); progress bar on a terminal."""
    from tqdm.auto import tqdm

    from .augment import resize_batch
    from .step import model_inputs

    names = run.label_names
    k = min(TOP_K, len(names))
    loader = torch.utils.data.DataLoader(_Images(inputs.values, run.load_size or run.size, run.interpolation),
                                         batch_size=batch_size, num_workers=num_workers)
    rows, skipped = [], []
    for images, index, errors in tqdm(loader, desc="predict", unit="batch", disable=None if show_progress is None
                                      else not show_progress):
        good = torch.tensor([not e for e in errors])
        skipped += [(inputs.names[i], e) for i, e in zip(index.tolist(), errors) if e]
        if not good.any():
            continue
        batch = resize_batch(images[good].to(device), run.size, run.interpolation)
        logits = run.model(model_inputs(batch, run.mean, run.std, channels_last=False))
        probs, classes = logits.float().softmax(dim=-1).topk(k, dim=-1)
        for i, p, c in zip(index[good].tolist(), probs.cpu().tolist(), classes.cpu().tolist()):
            label = inputs.labels[i]
            top = [names[j] for j in c]
            row = dict(input=inputs.names[i], label=label or "", prediction=top[0], confidence=f"{p[0]:.6f}",
                       correct="" if label is None else int(label == top[0]))
            for r, (name, prob) in enumerate(zip(top, p), start=1):
                row[f"top{r}"], row[f"top{r}_prob"] = name, f"{prob:.6f}"
            rows.append(row)
    return rows, skipped


def write_csv(path: str, rows: List[Dict], k: int) -> None:
    columns = ["input", "label", "prediction", "confidence", "correct"]
    columns += [c for r in range(1, k + 1) for c in (f"top{r}", f"top{r}_prob")]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def summary(rows: List[Dict], label_names: Sequence[str], k: int) -> List[str]:
    """Accuracy over the images whose true label is one of the model's classes, and what was left out."""
    classes = set(label_names)
    known = [r for r in rows if r["label"] in classes]
    lines = []
    if known:
        top1 = sum(r["correct"] for r in known) / len(known) * 100
        topk = sum(r["label"] in {r[f"top{i}"] for i in range(1, k + 1)} for r in known) / len(known) * 100
        lines.append(f"accuracy: top-1 {top1:.2f}%  top-{k} {topk:.2f}% on {len(known)} labeled images")
    foreign = sum(1 for r in rows if r["label"] and r["label"] not in classes)
    if foreign:
        lines.append(f"{foreign} images have a label that is not one of the model's classes: left out of the accuracy")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fixmatch-predict",
        description="Predict classes with a fixmatch-train run's final model (model.safetensors + config.json). "
                    "Inputs: image files, --image_dir (subfolders named like classes give true labels) or "
                    "--dataset_name. Writes a CSV with the top-5 classes of each image.")
    # Each help text states its own default: argparse's ArgumentDefaultsHelpFormatter would add a second one.
    p.add_argument("images", nargs="*", help="image files to classify")
    p.add_argument("--model_dir", required=True, help="the run's --output_dir")
    p.add_argument("--image_dir", help="a folder of images; a subfolder named like a class gives its images that label")
    p.add_argument("--dataset_name", help="hub id, local dataset folder, or 'digits'")
    p.add_argument("--dataset_config_name", help="the dataset's configuration, if it has several")
    p.add_argument("--split", help="the split to classify (default: validation, else test)")
    p.add_argument("--image_column_name",
                   help="the image column (default: the run's, if the dataset has it, else the one Image column)")
    p.add_argument("--label_column_name", help="the true label column (default: the run's, if the dataset has it, "
                                               "else the one ClassLabel column, if any)")
    p.add_argument("--max_samples", type=int, help="classify only the first N rows of the split (default: every row)")
    p.add_argument("--output_file", help="the CSV to write (default: MODEL_DIR/predictions.csv)")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass (default: 256)")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes decoding images (default: 4, or fewer on a machine with fewer CPUs)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return p


def run_predict(args) -> int:
    given = [bool(args.images), args.image_dir is not None, args.dataset_name is not None]
    if sum(given) != 1:
        raise UsageError("give exactly one input: image files, --image_dir or --dataset_name")
    if args.batch_size < 1 or args.num_workers < 0:
        raise UsageError("--batch_size must be at least 1 and --num_workers at least 0")
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError(f"--max_samples must be at least 1, got {args.max_samples}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=device)  # a device this machine lacks fails here, in one line
    except (RuntimeError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--device {args.device!r}: {first}") from None
    run = load_run_model(args.model_dir, device)
    if args.image_dir is not None:
        inputs = image_folder_inputs(args.image_dir, run.label_names)
    elif args.images:
        inputs = file_inputs(args.images)
    else:
        inputs = dataset_inputs(args, run)
    output = args.output_file or os.path.join(args.model_dir, "predictions.csv")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise UsageError(f"--output_file {output!r}: its folder does not exist")
    if os.path.isdir(output):
        raise UsageError(f"--output_file {output!r} is a folder; name the CSV file to write")

    rows, skipped = predict(run, inputs, device, args.batch_size, args.num_workers)
    if not rows:  # nothing to show: a failure, and a previous predictions.csv is left as it was
        name, error = skipped[0]
        raise UsageError(f"none of the {len(skipped)} input images could be read: {name} ({error})"
                         + (f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""))
    k = min(TOP_K, len(run.label_names))
    write_csv(output, rows, k)
    if skipped:
        shown = "; ".join(f"{name} ({error})" for name, error in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        print(f"fixmatch-predict: skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''}: "
              f"{shown}{more}", file=sys.stderr)
    for line in summary(rows, run.label_names, k):
        print(line)
    print(f"wrote {len(rows)} predictions to {output}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import report_usage_errors

    args = build_parser().parse_args(argv)
    return report_usage_errors("fixmatch-predict", lambda: run_predict(args))


if __name__ == "__main__":
    sys.exit(main())
