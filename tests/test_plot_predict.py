"""Plots, predictions and the timm round trip, checked on the files a user gets."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_train, write_image_folder
from PIL import Image

from fixmatch_accel.errors import UsageError
from fixmatch_accel.plot import read_metrics, write_plots

SCRIPTS = Path(sys.executable).parent
TAB_RED = (214, 39, 40)  # matplotlib's tab:red, the colour of a starved class in per_class.png


def script(name: str) -> str:
    path = SCRIPTS / name
    assert path.exists(), f"install the package (pip install -e .) to get the {name} command"
    return str(path)


def fabricated_thresholds(algorithm: str, step: int, num_classes: int) -> dict:
    """The keys an --algorithm adds to a training row: thresholds (per class or one for all) and its extra stat."""
    if algorithm == "fixmatch":
        return dict(threshold_per_class=[0.95] * num_classes)
    if algorithm == "softmatch":  # one running mean max-probability for all classes
        return dict(threshold_per_class=[0.3 + step / 400] * num_classes, mean_weight=0.6 + step / 1000)
    per_class = [round(0.95 * min(1.0, step / 200 * (c + 1) / num_classes), 4) for c in range(num_classes)]
    return dict(threshold_per_class=per_class, **(dict(loss_f=0.1 / step ** 0.5) if algorithm == "freematch" else {}))


def fabricate_run(root: Path, steps=range(10, 201, 10), num_classes=4, eval_every=50, starved=None,
                  config=True, results=True, algorithm=None, starved_accuracy=20.0) -> Path:
    """A run folder written by hand: metrics.jsonl rows as the trainer writes them, config.json, eval_results.json.

    algorithm: None for a run from before --algorithm (no thresholds logged, none in config.json's settings).
    starved: a class with no confident pseudo-label, at `starved_accuracy` % top-1.
    """
    root.mkdir(parents=True, exist_ok=True)
    names = [f"class_{i}" for i in range(num_classes)]
    rows = []
    for s in steps:
        mask = [10] * num_classes
        if starved is not None:
            mask[starved] = 0
        rows.append(dict(step=s, lr=0.03 * math.cos(7 * math.pi * s / (16 * 200)), images_per_s=900.0 + s,
                         loss=2.0 / s ** 0.3, loss_x=1.2 / s ** 0.3, loss_u=0.8 / s ** 0.3,
                         mask_ratio=min(1.0, s / 150), pseudo_label_acc=0.5 + s / 500, mask_per_class=mask,
                         **(fabricated_thresholds(algorithm, s, num_classes) if algorithm else {})))
        if s % eval_every == 0:
            per_class = [50.0 + i for i in range(num_classes)]
            if starved is not None:
                per_class[starved] = starved_accuracy
            rows.append(dict(step=s, top1=40 + s / 5, top5=80 + s / 20, per_class=per_class))
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config:
        (root / "config.json").write_text(json.dumps(dict(
            architecture="small_cnn", num_classes=num_classes, label_names=names,
            settings=dict(threshold=0.95, **(dict(algorithm=algorithm) if algorithm else {})),
            resolved=dict(num_labeled=4 * num_classes))))
    if results and any("top1" in r for r in rows):
        last = [r for r in rows if "top1" in r][-1]
        (root / "eval_results.json").write_text(json.dumps(dict(
            top1=last["top1"], top5=last["top5"], per_class=dict(zip(names, last["per_class"])))))
    return root


def check_png(path: Path, min_size=(800, 250)) -> np.ndarray:
    """A real picture: a sizeable PNG of at least `min_size` pixels, not one flat colour."""
    assert path.is_file() and path.stat().st_size > 15_000, path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= min_size[0] and im.height >= min_size[1], im.size
        pixels = np.asarray(im.convert("RGB"))
    packed = (pixels[..., 0].astype(np.int32) << 16) | (pixels[..., 1].astype(np.int32) << 8) | pixels[..., 2]
    assert len(np.unique(packed)) > 50  # text, lines, bars: many colours, not a blank canvas
    assert (pixels < 128).any(axis=-1).mean() > 0.005  # dark ink (titles, labels) covers a visible part
    return pixels


def has_colour(pixels: np.ndarray, rgb) -> bool:
    return bool((np.abs(pixels.astype(int) - rgb).sum(axis=-1) < 12).sum() > 50)


# ---------------------------------------------------------------- plots


def test_read_metrics_keeps_the_resumed_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [dict(step=2, loss=1.0), dict(step=4, loss=0.9), dict(step=4, top1=10.0), dict(step=6, loss=0.8),
            dict(step=8, loss=0.7), dict(step=8, top1=20.0),
            # resumed from the step-4 checkpoint: steps 6 and 8 are logged again, then 10
            dict(step=6, loss=0.5), dict(step=8, loss=0.4), dict(step=8, top1=30.0), dict(step=10, loss=0.3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 12, "lo')  # a line cut by a kill
    train, evals = read_metrics(str(path))
    assert [(r["step"], r["loss"]) for r in train] == [(2, 1.0), (4, 0.9), (6, 0.5), (8, 0.4), (10, 0.3)]
    assert [(r["step"], r["top1"]) for r in evals] == [(4, 10.0), (8, 30.0)]

    # Resumed from step 4 and stopped at 6: the abandoned branch's step 8 (train and eval) is gone too.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:6] + [dict(step=6, loss=0.5)]))
    train, evals = read_metrics(str(path))
    assert [r["step"] for r in train] == [2, 4, 6] and train[-1]["loss"] == 0.5
    assert [r["step"] for r in evals] == [4]


def test_plots_of_a_run_show_starved_classes(tmp_path):
    paths = write_plots(str(fabricate_run(tmp_path / "run", starved=2)))
    assert [Path(p).name for p in paths] == ["training_curves.png", "per_class.png"]
    curves = check_png(Path(paths[0]), min_size=(1400, 800))
    per_class = check_png(Path(paths[1]))
    assert has_colour(curves, TAB_RED)  # the learning-rate line
    assert has_colour(per_class, TAB_RED)  # the class with no confident pseudo-label is flagged
    # The same run without a starved class has no red bar.
    balanced = write_plots(str(fabricate_run(tmp_path / "balanced")))
    assert not has_colour(check_png(Path(balanced[1])), TAB_RED)


def test_a_starved_class_the_model_gets_right_is_not_red(tmp_path, monkeypatch):
    """Red means starved of pseudo-labels and below the mean accuracy; the titles say so."""
    run = fabricate_run(tmp_path / "run", starved=2, starved_accuracy=100.0)
    titles = [ax.get_title() for ax in drawn_figures(monkeypatch, run)["per_class.png"].axes]
    assert not has_colour(check_png(run / "per_class.png"), TAB_RED)
    assert any("red: starved and below the mean accuracy" in t for t in titles), titles


def test_class_names_the_font_lacks_draw_without_a_warning_per_glyph(tmp_path):
    import warnings

    root = fabricate_run(tmp_path / "run", num_classes=2)
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps(dict(config, label_names=["一只猫", "一只狗"])))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_plots(str(root))
    assert len(paths) == 2 and not [w for w in caught if "Glyph" in str(w.message)]


@pytest.mark.parametrize("kind", ["one_row", "no_eval", "no_config", "many_classes"])
def test_plots_of_partial_runs(tmp_path, kind):
    run = dict(
        one_row=lambda: fabricate_run(tmp_path / kind, steps=[1], eval_every=1000),
        no_eval=lambda: fabricate_run(tmp_path / kind, eval_every=1000),
        no_config=lambda: fabricate_run(tmp_path / kind, config=False, results=False),
        many_classes=lambda: fabricate_run(tmp_path / kind, num_classes=120, starved=7),
    )[kind]()
    curves, per_class = map(Path, write_plots(str(run)))
    check_png(curves, min_size=(1400, 800))
    check_png(per_class)


def drawn_figures(monkeypatch, run: Path) -> dict:
    """write_plots(run)'s figures by file name, kept as they are saved."""
    import fixmatch_accel.plot as plot

    figures, save = {}, plot._save

    def keep(fig, path):
        figures[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plot, "_save", keep)
    write_plots(str(run))
    return figures


def panel(fig, title: str):
    """The one axes of `fig` whose title starts with `title`, or None."""
    found = [ax for ax in fig.axes if ax.get_title().startswith(title)]
    assert len(found) <= 1
    return found[0] if found else None


@pytest.mark.parametrize("algorithm, num_classes", [("flexmatch", 4), ("softmatch", 4), ("freematch", 30),
                                                    ("flexmatch", 120)])
def test_plots_show_the_thresholds_per_class(tmp_path, monkeypatch, algorithm, num_classes):
    run = fabricate_run(tmp_path / "run", num_classes=num_classes, algorithm=algorithm, starved=1)
    logged = np.array([json.loads(line)["threshold_per_class"] for line in (run / "metrics.jsonl").read_text()
                       .splitlines() if "threshold_per_class" in line])
    figures = drawn_figures(monkeypatch, run)
    curves, per_class = figures["training_curves.png"], figures["per_class.png"]
    name = dict(flexmatch="FlexMatch", softmatch="SoftMatch", freematch="FreeMatch")[algorithm]
    assert curves.get_suptitle().startswith(f"{name} run run:") and per_class.get_suptitle().startswith(name)

    ax = panel(curves, "Confidence threshold per class")
    assert ax is not None and ax.get_xlabel() == "optimizer step"
    lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    if algorithm == "softmatch":  # one threshold for all classes: one line, not four on top of each other
        assert list(lines) == ["all 4 classes: the running mean max-probability"]
        np.testing.assert_allclose(lines[list(lines)[0]], logged[:, 0])
        mask_lines = [line.get_label() for line in panel(curves, "Mask ratio").get_lines()]
        assert mask_lines == ["mask ratio", "mean weight (% of full)"]
    elif num_classes <= 10:  # a labelled line each, and FlexMatch's tau as the ceiling
        assert list(lines) == [f"class_{c}" for c in range(4)] + ["--threshold 0.95 (the most)"]
        for c in range(4):
            np.testing.assert_allclose(lines[f"class_{c}"], logged[:, c])
    else:  # many classes: their mean and a lowest-to-highest band, no legend entry per class
        np.testing.assert_allclose(lines["mean over classes"], logged.mean(axis=1))
        band = ax.collections[0].get_paths()[0].vertices[:, 1]
        assert np.isclose(band.max(), logged.max()) and np.isclose(band.min(), logged.min())
        assert len(ax.get_legend().get_texts()) <= 3
    if algorithm == "freematch":
        assert "fairness  loss_f" in [line.get_label() for line in panel(curves, "Training loss").get_lines()]

    # per_class.png: the last window's thresholds, one point a class, the starved one red.
    ax = panel(per_class, "Final confidence threshold")
    points = ax.collections[0]
    xy = points.get_offsets()
    final = xy[:, 0] if num_classes <= 40 else xy[np.argsort(xy[:, 0]), 1]  # bars: x is the threshold
    np.testing.assert_allclose(final, logged[-1])
    colours = points.get_facecolors()
    red = [i for i, c in enumerate(colours) if np.allclose(c[:3], np.array(TAB_RED) / 255, atol=0.01)]
    assert len(red) == 1 and (xy[red[0], 1] if num_classes <= 40 else xy[red[0], 0]) == 1  # class_1, starved
    check_png(run / "training_curves.png", min_size=(1400, 1200))
    check_png(run / "per_class.png")


def test_plots_of_a_run_before_thresholds_were_logged(tmp_path, monkeypatch):
    """An older run's rows lack threshold_per_class and its config.json the algorithm: no threshold panel at all."""
    for num_classes in (4, 120):
        figures = drawn_figures(monkeypatch, fabricate_run(tmp_path / f"run_{num_classes}", num_classes=num_classes))
        curves, per_class = figures["training_curves.png"], figures["per_class.png"]
        assert curves.get_suptitle().startswith("FixMatch run") and len(curves.axes) == 6
        assert not [ax for fig in figures.values() for ax in fig.axes if "threshold" in ax.get_title().lower()
                    and "Mask ratio" not in ax.get_title()]
        assert len(per_class.axes) == (2 if num_classes <= 40 else 1)
        assert panel(curves, "Mask ratio").get_title().endswith("confidence \u2265 0.95")


def test_plot_cli_writes_both_pictures(tmp_path):
    run = fabricate_run(tmp_path / "run")
    result = subprocess.run([script("fixmatch-plot"), str(run)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(run / "training_curves.png"), str(run / "per_class.png")]
    check_png(run / "per_class.png")


@pytest.mark.parametrize("folder, message", [("missing", "no such folder"), ("empty", "has no metrics.jsonl")])
def test_plot_cli_bad_folder_is_one_line(tmp_path, capsys, folder, message):
    from fixmatch_accel.plot import main

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / folder)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fixmatch-plot: error:") and message in lines[0]


def test_a_run_without_confident_pseudo_labels_says_so(tmp_path, monkeypatch):
    import fixmatch_accel.plot as plot

    run = fabricate_run(tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "pseudo_label_acc" in row:
            row["pseudo_label_acc"] = None  # as the trainer logs a window where nothing passed the threshold
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    said = []
    monkeypatch.setattr(plot, "_empty", lambda ax, text: said.append(text))
    write_plots(str(run))
    assert said == ["no confident image with a known class yet\n(unlabeled images without labels have none)"]


def test_write_plots_on_an_empty_log_is_a_usage_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UsageError, match="holds no rows yet"):
        write_plots(str(tmp_path))


# ---------------------------------------------------------------- one real run for the rest


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """One tiny run of a timm architecture on an image folder (its val folder is the eval split)."""
    root = tmp_path_factory.mktemp("timm_run")
    write_image_folder(root / "train", per_class=10)
    write_image_folder(root / "val", per_class=3, seed=1)
    out = root / "run"
    result = run_train(["--train_dir", root / "train", "--validation_dir", root / "val", "--model", "resnet10t",
                        "--num_labeled", "6", "--per_device_train_batch_size", "3", "--mu", "2", "--threshold", "0",
                        "--max_train_steps", "3", "--logging_steps", "1", "--eval_steps", "2",
                        "--checkpointing_steps", "0", "--dataloader_num_workers", "0", "--output_dir", out])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_a_finished_run_leaves_its_plots(timm_run):
    check_png(timm_run / "training_curves.png", min_size=(1400, 800))
    check_png(timm_run / "per_class.png")


def test_plot_cli_on_a_real_run(timm_run):
    from fixmatch_accel.plot import main

    for name in ("training_curves.png", "per_class.png"):
        (timm_run / name).unlink(missing_ok=True)
    assert main([str(timm_run)]) == 0
    check_png(timm_run / "training_curves.png", min_size=(1400, 800))
    check_png(timm_run / "per_class.png")


def read_csv(path: Path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_an_image_folder_skips_a_corrupt_image(timm_run, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(timm_run.parent / "val", folder)
    (folder / "dog" / "broken.png").write_bytes(b"not a png")  # planted: skipped and counted, never a crash
    (folder / "unsorted").mkdir()
    shutil.copy(folder / "cat" / "0.png", folder / "unsorted" / "a.png")  # no class folder: no true label
    (folder / "notes.txt").write_text("not an image, not an input")
    result = subprocess.run([script("fixmatch-predict"), "--model_dir", str(timm_run), "--image_dir", str(folder),
                             "--num_workers", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 unreadable image: dog/broken.png" in result.stderr and "Traceback" not in result.stderr
    assert ("fixmatch-predict: --image_dir subfolder unsorted is not among the model's classes (cat, dog, frog): "
            "1 image without a true label\n") in result.stderr

    rows = read_csv(timm_run / "predictions.csv")
    assert list(rows[0]) == ["input", "label", "prediction", "confidence", "correct",
                             "top1", "top1_prob", "top2", "top2_prob", "top3", "top3_prob"]  # 3 classes: top-3
    assert sorted(r["input"] for r in rows) == sorted(
        [f"{c}/{i}.png" for c in ("cat", "dog", "frog") for i in range(3)] + ["unsorted/a.png"])
    for r in rows:
        assert r["prediction"] == r["top1"] and r["confidence"] == r["top1_prob"]
        probs = [float(r[f"top{i}_prob"]) for i in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
        assert sorted(r[f"top{i}"] for i in (1, 2, 3)) == ["cat", "dog", "frog"]
        assert r["label"] == ("" if r["input"].startswith("unsorted") else r["input"].split("/")[0])
        assert r["correct"] == ("" if not r["label"] else str(int(r["label"] == r["prediction"])))

    # The val folder is the run's eval split: prepared as in training, the accuracy is the run's own.
    top1 = json.loads((timm_run / "eval_results.json").read_text())["top1"]
    assert f"accuracy: top-1 {top1:.2f}%  top-3 100.00% on 9 labeled images" in result.stdout
    assert "wrote 10 predictions" in result.stdout and "(1 skipped)" in result.stdout


def test_image_dir_names_the_subfolders_that_are_not_classes(tmp_path, capsys):
    from fixmatch_accel.predict import image_folder_inputs

    for folder in ("class_3", "Class_4", "misc", "misc/deeper", "class_5/deeper"):
        (tmp_path / folder).mkdir(parents=True)
    for path in ("top.png", "class_3/a.png", "Class_4/a.png", "Class_4/b.png", "misc/deeper/a.png",
                 "class_5/deeper/a.png"):
        (tmp_path / path).write_bytes(b"")  # only the names matter here
    inputs = image_folder_inputs(str(tmp_path), [f"class_{i}" for i in range(30)])
    assert dict(zip(inputs.names, inputs.labels)) == {
        "top.png": None, "Class_4/a.png": None, "Class_4/b.png": None, "class_3/a.png": "class_3",
        "class_5/deeper/a.png": "class_5", "misc/deeper/a.png": None}
    # One line naming the odd folders and the model's classes (cut to 20 names), and nothing for top-level images.
    assert capsys.readouterr().err == (
        "fixmatch-predict: --image_dir subfolders Class_4, misc are not among the model's classes ("
        + ", ".join(f"class_{i}" for i in range(20)) + ", ... (30 in all)): 3 images without a true label\n")


def test_predict_image_files_into_a_chosen_csv(timm_run, tmp_path, capsys):
    from fixmatch_accel.predict import main

    files = [str(timm_run.parent / "val" / "frog" / "1.png"), str(timm_run.parent / "train" / "cat" / "4.png")]
    assert main(["--model_dir", str(timm_run), *files, "--output_file", str(tmp_path / "p.csv"),
                 "--num_workers", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" not in out and "wrote 2 predictions" in out  # no labels, no accuracy
    rows = read_csv(tmp_path / "p.csv")
    assert [r["input"] for r in rows] == files and all(r["label"] == "" == r["correct"] for r in rows)


def small_cnn_dir(root: Path, resolved=None) -> Path:
    """A model folder as a digits run leaves it (random weights; enough to check the dataset path)."""
    import torch
    from safetensors.torch import save_file

    from fixmatch_accel.models import create_model

    torch.manual_seed(0)
    root.mkdir()
    model = create_model("small_cnn", 10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps(dict(
        architecture="small_cnn", num_classes=10, label_names=[str(d) for d in range(10)],
        pretrained_cfg=dict(input_size=[3, 8, 8], mean=[0.3] * 3, std=[0.4] * 3, num_classes=10),
        **(dict(resolved=resolved) if resolved else {}))))
    return root


def test_predict_a_dataset_split(tmp_path, capsys):
    from fixmatch_accel.predict import main

    model_dir = small_cnn_dir(tmp_path / "digits_run")
    assert main(["--model_dir", str(model_dir), "--dataset_name", "digits", "--max_samples", "40",
                 "--num_workers", "0", "--batch_size", "16"]) == 0
    out = capsys.readouterr().out
    rows = read_csv(model_dir / "predictions.csv")
    assert [r["input"] for r in rows] == [str(i) for i in range(40)]  # the test split's rows, in order
    assert {r["label"] for r in rows} <= set("0123456789") and len({r["label"] for r in rows}) > 3
    assert len(rows[0]) == 5 + 2 * 5  # top-5 of 10 classes
    top1 = sum(r["label"] == r["prediction"] for r in rows) / 40 * 100
    assert f"accuracy: top-1 {top1:.2f}%" in out and "on 40 labeled images" in out


def test_predict_reads_label_minus_one_as_unlabeled(tmp_path, capsys):
    """datasets' ClassLabel -1 means "no label" (hidden-label test splits)."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    from fixmatch_accel.predict import main

    names = [str(d) for d in range(10)]
    images = [Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)) for i in range(4)]
    split = Dataset.from_dict({"image": images, "label": [-1, 3, -1, 7]},
                              features=Features(image=ImageFeature(), label=ClassLabel(names=names)))
    (tmp_path / "data").mkdir()
    split.to_parquet(str(tmp_path / "data" / "test.parquet"))  # hub-style: the split named by the file
    model_dir = small_cnn_dir(tmp_path / "digits_run")
    assert main(["--model_dir", str(model_dir), "--dataset_name", str(tmp_path / "data"), "--num_workers", "0"]) == 0
    assert [r["label"] for r in read_csv(model_dir / "predictions.csv")] == ["", "3", "", "7"]
    assert "on 2 labeled images" in capsys.readouterr().out


def test_predict_with_no_readable_image_fails_in_one_line(tmp_path, capsys):
    from fixmatch_accel.predict import main

    model = small_cnn_dir(tmp_path / "model")
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "b.jpg").write_bytes(b"")
    args = ["--model_dir", str(model), "--num_workers", "0", "--device", "cpu"]
    assert main([*args, str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"fixmatch-predict: error: none of the 2 input images could be read: {tmp_path / 'a.png'} (") and (
        "UnidentifiedImageError" in lines[0] and lines[0].endswith(" and 1 more"))
    assert not (model / "predictions.csv").exists()  # no empty CSV in place of a result

    # One readable image among them: a success that counts the skipped ones.
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    assert main([*args, str(tmp_path / "a.png"), str(tmp_path / "ok.png"), str(tmp_path / "b.jpg")]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 unreadable images" in captured.err and "wrote 1 predictions" in captured.out
    assert "(2 skipped)" in captured.out and len(read_csv(model / "predictions.csv")) == 1


def test_predict_takes_the_runs_recorded_columns(tmp_path, capsys):
    """config.json's resolved image and label columns come before guessing by feature type; a flag before both."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    from fixmatch_accel.predict import main

    images = [Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)) for i in range(4)]
    split = Dataset.from_dict(
        {"img": images, "thumb": images, "digit": [3, 4, 5, 6], "parity": [1, 0, 1, 0]},
        features=Features(img=ImageFeature(), thumb=ImageFeature(), digit=Value("int64"),
                          parity=ClassLabel(names=["even", "odd"])))
    (tmp_path / "data").mkdir()
    split.to_parquet(str(tmp_path / "data" / "test.parquet"))
    data = ["--dataset_name", str(tmp_path / "data"), "--num_workers", "0", "--device", "cpu"]

    def labels(model_dir, *flags):
        assert main(["--model_dir", str(model_dir), *data, *flags]) == 0
        return [r["label"] for r in read_csv(model_dir / "predictions.csv")]

    unrecorded = small_cnn_dir(tmp_path / "unrecorded")  # a run from before config.json recorded its columns
    assert main(["--model_dir", str(unrecorded), *data]) == 2
    assert "found 2 (img, thumb) Image columns" in capsys.readouterr().err
    assert labels(unrecorded, "--image_column_name", "img") == ["odd", "even", "odd", "even"]  # the one ClassLabel

    recorded = small_cnn_dir(tmp_path / "recorded", resolved=dict(image_column="img", label_column="digit"))
    assert labels(recorded) == ["3", "4", "5", "6"]  # plain int labels, as training reads them
    assert "on 4 labeled images" in capsys.readouterr().out
    assert labels(recorded, "--label_column_name", "parity") == ["odd", "even", "odd", "even"]
    # A dataset without the recorded columns: found by feature type, as before.
    assert main(["--model_dir", str(recorded), "--dataset_name", "digits", "--max_samples", "8",
                 "--num_workers", "0", "--device", "cpu"]) == 0
    assert {r["label"] for r in read_csv(recorded / "predictions.csv")} <= set("0123456789")


@pytest.mark.parametrize("args, message", [
    (["--model_dir", "{tmp}/absent", "x.png"], "--model_dir '{tmp}/absent': no such folder"),
    (["--model_dir", "{weightless}", "x.png"], "no model.safetensors"),
    (["--model_dir", "{model}"], "give exactly one input"),
    (["--model_dir", "{model}", "{tmp}/absent.png"], "image '{tmp}/absent.png': no such file"),
    (["--model_dir", "{model}", "--image_dir", "{tmp}"], "no image files in it"),
    (["--model_dir", "{model}", "--dataset_name", "digits", "--split", "dev"], "--split 'dev': no such split"),
    (["--model_dir", "{model}", "--dataset_name", "digits", "--image_column_name", "px"],
     "--image_column_name 'px': no such column"),
    (["--model_dir", "{model}", "--dataset_name", "digits", "--image_column_name", "label"],
     "--image_column_name 'label' holds ClassLabel"),
    (["--model_dir", "{model}", "--dataset_name", "digits", "--max_samples", "-3"], "--max_samples must be at least 1"),
    (["--model_dir", "{model}", "--dataset_name", "digits", "--output_file", "{tmp}"], "is a folder; name the CSV"),
])
def test_predict_bad_input_is_one_line(tmp_path, capsys, args, message):
    from fixmatch_accel.predict import main

    model = small_cnn_dir(tmp_path / "model")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(model / "config.json", weightless / "config.json")
    fill = dict(tmp=tmp_path, model=model, weightless=weightless)
    assert main([a.format(**fill) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fixmatch-predict: error:") and message.format(**fill) in lines[0]


def test_predict_help_states_each_default_once(capsys):
    import re

    from fixmatch_accel.predict import build_parser, main

    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert "default: None" not in " ".join(text.split())
    options = text.split("\noptions:\n")[1]
    blocks = {m.group(1): " ".join(m.group(2).split())  # each flag with its help text, lines joined
              for m in re.finditer(r"^  (--\w+|-h)[^\n]*?(?:  +|\n +)(.*?)(?=^  -|\Z)", options, re.S | re.M)}
    assert len(blocks) == 13 and all(text.count("(default:") <= 1 for text in blocks.values()), blocks
    assert "(default: validation, else test)" in blocks["--split"]
    defaults = build_parser().parse_args(["--model_dir", "m"])
    assert f"(default: {defaults.batch_size})" in blocks["--batch_size"] and 1 <= defaults.num_workers <= 4


def test_predict_on_a_device_this_machine_lacks_is_one_line(tmp_path, capsys):
    import torch

    from fixmatch_accel.predict import main

    device = "mps" if torch.cuda.is_available() else "cuda"  # one this machine has not
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has both CUDA and MPS")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert main(["--model_dir", str(small_cnn_dir(tmp_path / "model")), str(image), "--device", device]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fixmatch-predict: error: --device '{device}': ")


# ---------------------------------------------------------------- timm round trip


def project_inputs_and_logits(run_dir: Path):
    """The val images as training's eval path prepares them, and the logits of the project's loader."""
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    from fixmatch_accel.data import to_rgb
    from fixmatch_accel.predict import load_run_model
    from fixmatch_accel.step import model_inputs

    run = load_run_model(str(run_dir), torch.device("cpu"))
    files = sorted((run_dir.parent / "val").glob("*/*.png"))
    images = torch.stack([pil_to_tensor(to_rgb(Image.open(f), run.size)) for f in files])
    inputs = model_inputs(images, run.mean, run.std, channels_last=False)
    with torch.no_grad():
        return inputs, run.model(inputs), run


def test_model_safetensors_loads_in_plain_timm(timm_run):
    import timm
    import torch

    inputs, expected, run = project_inputs_and_logits(timm_run)

    # The run folder is a timm model folder: config.json + model.safetensors, classes and normalisation included.
    model = timm.create_model(f"local-dir:{timm_run}", pretrained=True).eval()
    assert model.pretrained_cfg["label_names"] == ["cat", "dog", "frog"] and model.num_classes == 3
    assert list(model.pretrained_cfg["mean"]) == run.mean and list(model.pretrained_cfg["std"]) == run.std
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), expected)

    # Or the weights file alone: timm's own resnet10t config says 1000 classes, so the overlay must say how many,
    # or timm drops the classifier as a mismatch and initialises a new one at random.
    model = timm.create_model("resnet10t", num_classes=3, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(timm_run / "model.safetensors"), num_classes=3))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(inputs), expected)


def test_timm_eval_transform_matches_training_preprocessing(timm_run):
    import timm
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    from fixmatch_accel.data import to_rgb
    from fixmatch_accel.predict import load_run_model
    from fixmatch_accel.step import model_inputs

    run = load_run_model(str(timm_run), torch.device("cpu"))
    model = timm.create_model(f"local-dir:{timm_run}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    rng = np.random.default_rng(0)
    for shape in ((run.size, run.size, 3), (15, 20, 3), (40, 30, 3)):  # as trained, smaller and non-square, larger
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        ours = model_inputs(pil_to_tensor(to_rgb(image, run.size))[None], run.mean, run.std, channels_last=False)
        torch.testing.assert_close(transform(image)[None], ours, atol=1e-5, rtol=0)
