"""Unlabeled data from its own source: another split, another dataset, a folder of images; rows without labels."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, accelerate_launch, run_refused, run_train, write_image_folder
from PIL import Image

TINY = ["--model", "small_cnn", "--image_size", "8", "--per_device_train_batch_size", "2", "--mu", "2",
        "--logging_steps", "1", "--checkpointing_steps", "0", "--dataloader_num_workers", "0", "--no-plots",
        "--eval_steps", "0"]
NAMES = ["a", "b", "c"]


def write_stl_like(root: Path, train=12, test=6, unlabeled=20, unlabeled_split="unlabeled"):
    """A local parquet dataset shaped like STL-10: train and test with classes, `unlabeled` with label -1."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=NAMES)})
    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True)
    splits = (("train", train, [i % 3 for i in range(train)]), ("test", test, [i % 3 for i in range(test)]),
              (unlabeled_split, unlabeled, [-1] * unlabeled))
    for split, n, labels in splits:
        if not n:
            continue
        images = [Image.fromarray(np.uint8(40 + 80 * max(y, 0)) + rng.integers(0, 40, (8, 8, 3), dtype=np.uint8))
                  for y in labels]
        Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def write_unlabeled_folder(root: Path, n=10):
    """Images at several depths, a text file and a corrupt image among them."""
    rng = np.random.default_rng(1)
    for i in range(n):
        where = root / ("deep/er" if i % 3 == 0 else "top" if i % 3 == 1 else "")
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(where / f"u{i}.png")
    (root / "notes.txt").write_text("not an image")
    (root / "top" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


@pytest.fixture(scope="module")
def stl(tmp_path_factory):
    return write_stl_like(tmp_path_factory.mktemp("stl") / "stl")


def metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
@pytest.mark.parametrize("expr", ["unlabeled", "train+unlabeled"])
def test_unlabeled_split(tmp_path, stl, expr, streaming):
    out = tmp_path / "run"
    result = run_train(["--dataset_name", stl, "--unlabeled_split", expr, "--max_train_steps", "3",
                        "--output_dir", out, "--threshold", "0"] + TINY + (["--streaming"] if streaming else []))
    check_ok(result)
    rows = 32 if expr == "train+unlabeled" else 20
    assert f"unlabeled: {rows} rows of {stl} {expr} (20 without labels)" in result.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["unlabeled"] == dict(kind="split", name=f"{stl} {expr}", rows=rows, with_label=rows - 20)
    assert cfg["resolved"]["num_labeled"] == 12  # --num_labeled defaults to all: every train row with a class
    assert cfg["setting_sources"]["num_labeled"] == "unlabeled_source"
    split = json.loads((out / "labeled_split.json").read_text())
    assert split["indices"] == list(range(12))
    accuracy = [r["pseudo_label_acc"] for r in metrics(out) if "loss" in r]
    if expr == "unlabeled":  # no unlabeled row has a true label: no accuracy, never a number made of nothing
        assert accuracy == [None] * 3 and "pl_acc -" in result.stdout
    else:  # threshold 0 keeps every image: over 3 steps some of the 12 labeled rows come by
        assert any(a is not None for a in accuracy)


def test_train_with_unlabeled_rows_draws_labels_only_from_rows_with_a_class(tmp_path):
    """A train split whose rows partly have no label (None in a string column, -1 in a ClassLabel one)."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    labels = ["ant", "cow", None, "", "ant", "cow", None, "ant", "cow", "", "ant", "cow"] * 2
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in labels]
    root = tmp_path / "blank"
    root.mkdir()
    features = Features({"image": ImageFeature(), "label": Value("string")})
    Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(root / "train.parquet"))
    Dataset.from_dict({"image": images[:4], "label": ["ant", "cow", "ant", "cow"]}, features=features).to_parquet(
        str(root / "test.parquet"))
    out = tmp_path / "run"
    result = run_train(["--dataset_name", root, "--num_labeled", "all", "--max_train_steps", "2",
                        "--output_dir", out] + TINY)
    check_ok(result)
    assert "unlabeled: 24 rows of" in result.stdout and "(8 without labels)" in result.stdout
    split = json.loads((out / "labeled_split.json").read_text())
    assert split["per_class"] == {"ant": 8, "cow": 8} and len(split["indices"]) == 16
    assert all(labels[i] for i in split["indices"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["label_names"] == ["ant", "cow"]


def test_unlabeled_dir_beside_image_folders(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=4)
    val = write_image_folder(tmp_path / "val", per_class=2, seed=1)
    dump = write_unlabeled_folder(tmp_path / "dump")
    out = tmp_path / "run"
    result = run_train(["--train_dir", train, "--validation_dir", val, "--unlabeled_dir", dump,
                        "--max_train_steps", "12", "--output_dir", out] + TINY)
    check_ok(result)
    assert f"unlabeled: 11 images in {dump} (11 without labels, 1 other file(s) left out)" in result.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["unlabeled"] == dict(kind="folder", name=str(dump), rows=11, with_label=0, other_files=1)
    assert cfg["resolved"]["num_labeled"] == 12  # every labeled image
    rows = metrics(out)
    # 12 steps of 4 unlabeled images = 48 reads of 11 (2 passes and more), the broken file among them each pass:
    # counted once, as one distinct image.
    assert max(r.get("skipped_images", 0) for r in rows) == 1
    assert all(r["pseudo_label_acc"] is None for r in rows if "loss" in r)
    assert json.loads((out / "eval_results.json").read_text())["skipped_train_images"] == 1


def test_unlabeled_dataset_name(tmp_path, stl):
    other = write_stl_like(tmp_path / "other", train=15, test=0, unlabeled=0)  # labels a, b, c: truth is known
    out = tmp_path / "run"
    result = run_train(["--dataset_name", stl, "--unlabeled_dataset_name", other, "--num_labeled", "6",
                        "--threshold", "0", "--max_train_steps", "3", "--output_dir", out] + TINY)
    check_ok(result)
    assert f"unlabeled: 15 rows of {other} train (all with labels)" in result.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["num_labeled"] == 6 and cfg["resolved"]["unlabeled"]["with_label"] == 15
    assert all(r["pseudo_label_acc"] is not None for r in metrics(out) if "loss" in r)


def test_two_processes_read_every_folder_image_once_per_pass(tmp_path):
    import subprocess

    train = write_image_folder(tmp_path / "train", per_class=4)
    dump = tmp_path / "dump"
    for i in range(40):
        (dump / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(dump / f"d{i % 4}" / f"{i}.png")
    out = tmp_path / "ids"
    cmd = accelerate_launch() + [str(ROOT / "tests" / "loader_ids.py"), str(out), "--train_dir", train,
                                 "--unlabeled_dir", dump, "--image_size", "8", "--per_device_train_batch_size", "2",
                                 "--mu", "2", "--dataloader_num_workers", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert ranks[0]["num_unlabeled"] == 40
    for epoch in ("unlabeled", "unlabeled_1"):  # 40 rows = 5 global batches of 8: every row once per pass
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert sorted(a + b) == list(range(40)), epoch
    assert ranks[0]["unlabeled"] != ranks[0]["unlabeled_1"]  # a new order every pass


def test_two_processes_read_a_streamed_split_once_per_pass(tmp_path, stl):
    import subprocess

    out = tmp_path / "ids"
    cmd = accelerate_launch() + [str(ROOT / "tests" / "loader_ids.py"), str(out), "--dataset_name", stl,
                                 "--unlabeled_split", "train+unlabeled", "--streaming", "--image_size", "8",
                                 "--per_device_train_batch_size", "2", "--mu", "2", "--dataloader_num_workers", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert ranks[0]["num_unlabeled"] == 32
    for epoch in ("unlabeled", "unlabeled_1"):  # 2 pieces of 16 = 4 batches of 4 each: all 32, once
        assert sorted(ranks[0][epoch] + ranks[1][epoch]) == list(range(32)), epoch
    assert ranks[0]["unlabeled"] != ranks[0]["unlabeled_1"]


def losses(out: Path):
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


@pytest.mark.parametrize("source", ["folder", "stream"])
def test_resume_mid_pass_is_exact(tmp_path, stl, source):
    """A checkpoint in the middle of a pass over the unlabeled source; the resumed run logs the same losses."""
    import shutil

    from safetensors.torch import load_file

    if source == "folder":
        data = ["--train_dir", write_image_folder(tmp_path / "train", per_class=4),
                "--unlabeled_dir", write_unlabeled_folder(tmp_path / "dump"), "--algorithm", "flexmatch"]
    else:
        data = ["--dataset_name", stl, "--unlabeled_split", "train+unlabeled", "--streaming"]
    args = data + TINY + ["--augment_device", "accelerator", "--max_train_steps", "9", "--checkpointing_steps", "5"]
    straight = tmp_path / "straight"
    check_ok(run_train(args + ["--output_dir", straight]))
    state = json.loads((straight / "checkpoints" / "step_5" / "trainer_state.json").read_text())
    assert state["positions"]["unlabeled"][1] > 0  # mid-pass
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    (resumed / "metrics.jsonl").write_text("")
    result = run_train(args + ["--output_dir", resumed, "--resume_from_checkpoint", resumed / "checkpoints" / "step_5"])
    check_ok(result)
    after = losses(resumed)
    assert sorted(after) == list(range(6, 10))
    assert after == pytest.approx({k: v for k, v in losses(straight).items() if k > 5}, rel=1e-6, abs=1e-7)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(np.allclose(a[k].float().numpy(), b[k].float().numpy(), atol=1e-6) for k in a)
    if source == "folder":  # the broken file: one distinct image before and after the resume
        assert [r["skipped_images"] for r in metrics(resumed) if "loss" in r][-1] == 1


def test_a_corrupt_image_among_33_costs_one_image_over_30_passes(tmp_path):
    """A bad file is read again every pass; the budget counts it once (1 of 33, under the default 1% of 100)."""
    train = write_image_folder(tmp_path / "one" / "train", classes=("a", "b", "c"), per_class=8)
    write_image_folder(train, classes=("d",), per_class=8, seed=1)  # a fourth class (colours stay in range)
    (train / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 5)
    out = tmp_path / "run"
    # 33 unlabeled rows in batches of 8: 4 batches a pass, 124 steps = 31 passes
    val = write_image_folder(tmp_path / "one" / "val", classes=("a", "b", "c", "d")[:3], per_class=2)
    write_image_folder(val, classes=("d",), per_class=2, seed=1)
    result = run_train(["--train_dir", train, "--validation_dir", val, "--num_labeled", "8", "--max_train_steps", "124",
                        "--output_dir", out] + TINY + ["--logging_steps", "31", "--mu", "2",
                        "--per_device_train_batch_size", "4"])
    check_ok(result)
    rows = [r for r in metrics(out) if "loss" in r]
    assert rows[-1]["unlabeled_seen"] == 124 * 8 and rows[-1]["skipped_images"] == 1
    assert "error" not in result.stderr and "skipped 1 unreadable image(s) of 33 read" in result.stdout


def test_bad_unlabeled_inputs_are_one_line_and_create_nothing(tmp_path, stl):
    train = write_image_folder(tmp_path / "train", per_class=3)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("no images")
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for i in range(10):
        (unreadable / f"{i}.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(unreadable / "ok.png")
    no_image = tmp_path / "no_image"
    no_image.mkdir()
    from datasets import Dataset

    Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).to_parquet(str(no_image / "train.parquet"))
    no_split = write_stl_like(tmp_path / "stl_copy", unlabeled=0)
    with_unlabeled_class = write_image_folder(tmp_path / "train_u", classes=("cat", "dog", "unlabeled"), per_class=2)
    out = tmp_path / "out"
    base = ["--output_dir", out] + TINY + ["--max_train_steps", "1"]
    cases = [
        (["--dataset_name", stl, "--unlabeled_split", "unlabelled"],
         f"--unlabeled_split 'unlabelled': no split 'unlabelled' in --dataset_name '{stl}' (splits: "),
        (["--dataset_name", stl, "--unlabeled_split", "train+extra"], "no split 'extra'"),
        (["--train_dir", train, "--unlabeled_dir", tmp_path / "nowhere"], "--unlabeled_dir"),
        (["--train_dir", train, "--unlabeled_dir", empty],
         f"--unlabeled_dir '{empty}': no image files in it or below it (1 other file(s))"),
        (["--train_dir", train, "--unlabeled_dir", unreadable], "of 11 images read could not be decoded"),
        (["--dataset_name", stl, "--unlabeled_dataset_name", no_image],
         f"unlabeled data {no_image} train: found no Image columns among text, label"),
        (["--dataset_name", stl, "--unlabeled_split", "unlabeled", "--unlabeled_dir", empty],
         "--unlabeled_split and --unlabeled_dir each name the unlabeled data: keep one"),
        (["--train_dir", train, "--unlabeled_dir", empty, "--unlabeled_excludes_labeled"],
         "--unlabeled_excludes_labeled: the unlabeled data cannot hold the labeled examples"),
        (["--train_dir", with_unlabeled_class], "a class folder named 'unlabeled'; unlabeled images are not a class, "
                                                "give them with --unlabeled_dir"),
        (["--dataset_name", stl, "--unlabeled_dataset_name", tmp_path / "missing_ds"],
         "--unlabeled_dataset_name"),
        # the STL-10 setting on a copy without the unlabeled split (as tanganke/stl10 is)
        (["--dataset_name", no_split, "--unlabeled_split", "train+unlabeled", "--num_labeled", "3"],
         f"--unlabeled_split 'train+unlabeled': no split 'unlabeled' in --dataset_name '{no_split}' "
         "(splits: train, test)"),
    ]
    results = run_refused([args + base for args, _ in cases], tmp_path)
    for (args, message), result in zip(cases, results):
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("fixmatch-train: error:")]
        assert len(errors) == 1 and message in errors[0], (message, result.stderr[-2000:])
        assert not out.exists(), args
    assert "(splits: train, test, unlabeled)" in results[0].stderr or "(splits: train, unlabeled, test)" in \
        results[0].stderr or "splits: " in results[0].stderr


def test_another_unlabeled_source_on_resume_is_refused_naming_both(tmp_path, stl):
    out = tmp_path / "run"
    args = ["--dataset_name", stl, "--output_dir", out] + TINY + ["--max_train_steps", "2",
                                                                  "--checkpointing_steps", "2"]
    check_ok(run_train(args + ["--unlabeled_split", "unlabeled"]))
    [result] = run_refused([args + ["--max_train_steps", "4", "--unlabeled_split", "train+unlabeled",
                                    "--resume_from_checkpoint", "latest"]], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("its run trained on unlabeled data from --unlabeled_split 'unlabeled', this run names --unlabeled_split "
            "'train+unlabeled'") in result.stderr
