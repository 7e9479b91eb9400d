"""What a new user hit (issue 21), each run the way a user runs it: train.py on their own data."""

import json
from pathlib import Path

import numpy as np
from conftest import run_train, write_image_folder
from PIL import Image

TINY = ["--model", "small_cnn", "--image_size", "8", "--per_device_train_batch_size", "3", "--mu", "2",
        "--max_train_steps", "2", "--logging_steps", "1", "--checkpointing_steps", "0",
        "--dataloader_num_workers", "0", "--no-plots"]


def check_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def one_error_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("fixmatch-train: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def write_train_only_parquet(root: Path, per_class=20):
    """A hub-style dataset with only a train split and a plain string column named `label`."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    names = ["ant", "cow", "yak"]
    labels = [names[i % 3] for i in range(3 * per_class)]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(np.uint8(40 + 80 * names.index(y)) + rng.integers(0, 40, (8, 8, 3), dtype=np.uint8))
              for y in labels]
    features = Features({"image": ImageFeature(), "label": Value("string")})
    root.mkdir(parents=True)
    Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(root / "train.parquet"))
    return root


def test_train_split_only_with_string_labels_holds_out_eval_rows(tmp_path):
    data, out = write_train_only_parquet(tmp_path / "mydata"), tmp_path / "run"
    result = run_train(["--dataset_name", data, "--num_labeled", "6", "--seed", "2", "--output_dir", out] + TINY)
    check_ok(result)
    assert "note: no 'validation' or 'test' split: evaluating on 9 rows held out of --train_split 'train'" \
        in result.stdout  # said once, by the trainer
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["label_names"] == ["ant", "cow", "yak"] and cfg["resolved"]["label_column"] == "label"
    resolved = cfg["resolved"]
    assert resolved["eval_split"] == "train (15% held out, seed 2)"
    assert (resolved["num_train"], resolved["num_eval"]) == (51, 9)
    assert cfg["settings"]["train_val_split"] == 0.15
    split = json.loads((out / "labeled_split.json").read_text())
    assert split["train_val_split"] == {"fraction": 0.15, "seed": 2, "held_out": 9}
    assert len(split["indices"]) == 6 and max(split["indices"]) < 51
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_eval"] == 9 and results["eval_split"] == resolved["eval_split"]


def test_nested_class_folders_are_one_line_naming_a_path(tmp_path):
    write_image_folder(tmp_path / "train" / "cat" / "indoor", classes=("",), per_class=2)
    write_image_folder(tmp_path / "train", classes=("dog", "frog"), per_class=2)
    result = run_train(["--train_dir", tmp_path / "train", "--output_dir", tmp_path / "run"] + TINY)
    assert one_error_line(result).endswith(f"--train_dir {str(tmp_path / 'train')!r}: images must sit directly in "
                                           "the class folders (one subfolder per class, no deeper), found "
                                           "cat/indoor/0.png")


def test_digits_named_explicitly_is_not_flipped(tmp_path):
    out = tmp_path / "run"
    result = run_train(["--dataset_name", "digits", "--num_labeled", "20", "--max_eval_samples", "30",
                        "--eval_split", "train", "--output_dir", out] + TINY)
    check_ok(result)
    assert result.stdout.count("note: evaluating on the training data (--eval_split 'train')") == 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["settings"]["hflip"] is False and cfg["setting_sources"]["hflip"] == "digits"
    assert cfg["setting_sources"]["num_labeled"] == "flag" and cfg["settings"]["crop_padding"] is None  # no demo
