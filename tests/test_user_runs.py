"""What a new user hit, run the way a user runs it: bad labeled images, resuming with other settings, `auto`."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_train, write_image_folder
from PIL import Image

from fixmatch_accel.config import TrainConfig, parse_args
from fixmatch_accel.data import labeled_split, load_data
from fixmatch_accel.errors import UsageError
from fixmatch_accel.preflight import check_start

TINY_DIGITS = ["--dataset_name", "digits", "--model", "small_cnn", "--image_size", "8", "--num_labeled", "20",
               "--per_device_train_batch_size", "4", "--mu", "2", "--dataloader_num_workers", "0",
               "--logging_steps", "1", "--eval_steps", "0", "--max_eval_samples", "32", "--no-plots"]
FOLDER_RUN = ["--model", "small_cnn", "--image_size", "8", "--per_device_train_batch_size", "2", "--mu", "2",
              "--dataloader_num_workers", "0", "--max_train_steps", "2", "--eval_steps", "0",
              "--checkpointing_steps", "0", "--augment_device", "accelerator", "--no-plots"]


def rows(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def lines(result, prefix: str):
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(prefix)]


def folder_with_one_bad_labeled_candidate(root: Path) -> Path:
    """cat and dog with 20 images, frog with 4 and one garbage file: 2 labels a class often draw the bad one."""
    write_image_folder(root / "train", classes=("cat", "dog"), per_class=20, size=8)
    write_image_folder(root / "train", classes=("frog",), per_class=4, size=8, seed=1)
    (root / "train" / "frog" / "garbage.png").write_bytes(b"not an image at all")
    write_image_folder(root / "val", per_class=2, size=8)
    return root


def test_one_unreadable_labeled_image_is_redrawn_and_the_run_trains(tmp_path):
    root = folder_with_one_bad_labeled_candidate(tmp_path)
    cfg = TrainConfig(train_dir=str(root / "train"), validation_dir=str(root / "val"), num_labeled=6)
    data = load_data(cfg)
    bad_row = next(r for r in range(data.num_train) if data.train[r]["image"]["path"].endswith("garbage.png"))
    seed = next(s for s in range(20) if bad_row in labeled_split(TrainConfig(**{**vars(cfg), "seed": s}), data))
    common = ["--train_dir", root / "train", "--validation_dir", root / "val", "--num_labeled", "6", *FOLDER_RUN]
    result = run_train(common + ["--seed", seed, "--output_dir", tmp_path / "drawn"])
    assert result.returncode == 0, result.stderr[-2000:]
    said = lines(result, "skipped 1 unreadable image(s)")
    assert len(said) == 1 and "1 of them labeled, redrawn within their class" in said[0] and "garbage.png" in said[0]
    split = json.loads((tmp_path / "drawn" / "labeled_split.json").read_text())
    assert bad_row not in split["indices"] and split["per_class"] == {"cat": 2, "dog": 2, "frog": 2}
    # A saved split that names the bad file: it is left out, and the run trains on the rest.
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps(dict(indices=sorted(split["indices"][:5] + [bad_row]))))
    result = run_train(common + ["--labeled_split_file", split_file, "--output_dir", tmp_path / "file"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left out of" in result.stdout and len(json.loads((tmp_path / "file" / "labeled_split.json")
                                                           .read_text())["indices"]) == 5
    # Three classes: top5 is top-3, and the files say so.
    assert [r["top_k"] for r in rows(tmp_path / "file") if "top1" in r] == [3]
    assert json.loads((tmp_path / "file" / "eval_results.json").read_text())["top_k"] == 3


def test_a_mostly_unreadable_folder_still_stops_at_setup(tmp_path):
    write_image_folder(tmp_path / "train", per_class=12, size=8)
    for k, png in enumerate(sorted((tmp_path / "train").rglob("*.png"))):
        if k % 3:  # two thirds of the files
            png.write_bytes(b"garbage")
    write_image_folder(tmp_path / "val", per_class=2, size=8)
    result = run_train(["--train_dir", tmp_path / "train", "--validation_dir", tmp_path / "val", "--num_labeled", "3",
                        "--output_dir", tmp_path / "run", *FOLDER_RUN])
    error = lines(result, "fixmatch-train: error:")
    assert result.returncode == 2 and len(error) == 1 and "Traceback" not in result.stderr
    assert "24 of 36 images read could not be decoded" in error[0] and "--max_bad_image_fraction 0.01" in error[0]


def test_resume_keeps_refuses_or_applies_changed_settings(tmp_path):
    out = tmp_path / "run"
    first = run_train(TINY_DIGITS + ["--max_train_steps", "6", "--checkpointing_steps", "3", "--output_dir", out])
    assert first.returncode == 0, first.stderr[-2000:]
    step_3 = out / "checkpoints" / "step_3"
    for flag, value in (("--per_device_train_batch_size", "8"), ("--mu", "3")):  # refused before any data is read
        with pytest.raises(UsageError, match=f"cannot load it with {flag} {value}: .* cannot change"):
            check_start(*parse_args(TINY_DIGITS + ["--max_train_steps", "6", "--output_dir", str(out),
                                                   "--resume_from_checkpoint", str(step_3), flag, value]))
    refused = run_train(TINY_DIGITS + ["--max_train_steps", "6", "--output_dir", out,
                                       "--resume_from_checkpoint", step_3, "--model", "wrn28_2"])
    error = lines(refused, "fixmatch-train: error:")  # one line from the command
    assert refused.returncode == 2 and len(error) == 1, refused.stderr[-2000:]
    assert "--model " in error[0] and "cannot change" in error[0]
    assert "was trained with --model 'small_cnn'" in error[0]  # names the checkpoint's model and the one asked for
    resumed = run_train(TINY_DIGITS + ["--output_dir", out, "--resume_from_checkpoint", step_3,
                                       "--max_train_steps", "8", "--learning_rate", "0.1", "--seed", "5",
                                       "--threshold", "0.5"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    said = resumed.stdout
    assert "note: --learning_rate 0.1 does not apply: a resumed run keeps 0.03" in said
    assert "note: --seed 5 does not apply: a resumed run keeps 0" in said
    factor = [0.03 * np.cos(7 * np.pi * 3 / (16 * k)) for k in (6, 8)]
    assert f"note: --max_train_steps 8 (was 6): the cosine schedule now spans 8 steps, so the learning rate of " \
           f"step 4 moves from {factor[0]:.6g} to {factor[1]:.6g}" in said
    assert "note: --threshold 0.5 (was 0.95) takes effect from step 4" in said
    config = json.loads((out / "config.json").read_text())
    assert (config["settings"]["learning_rate"], config["settings"]["seed"]) == (0.03, 0)  # what the run uses
    assert config["settings"]["threshold"] == 0.5 and config["setting_sources"]["learning_rate"] == "checkpoint"
    after = list({r["step"]: r for r in rows(out) if "loss" in r and r["step"] > 3}.values())  # the resumed rows
    assert [r["step"] for r in after] == [4, 5, 6, 7, 8]
    assert all(abs(r["lr"] - 0.03 * np.cos(7 * np.pi * (r["step"] - 1) / (16 * 8))) < 1e-9 for r in after)
    assert all(r["labeled_seen"] == 4 * r["step"] and r["unlabeled_seen"] == 8 * r["step"] for r in after)


def test_resume_auto_starts_then_continues_and_defaults_follow_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = TINY_DIGITS + ["--output_dir", out, "--resume_from_checkpoint", "auto", "--checkpointing_steps", "2",
                          "--strong_augment", "rand-m100"]
    started = run_train(args + ["--max_train_steps", "2"])
    assert started.returncode == 0, started.stderr[-2000:]
    assert (f"--resume_from_checkpoint auto: no complete checkpoint in {out}/checkpoints, starting a new run"
            in started.stdout)
    assert "note: --strong_augment rand-m100: magnitude 100 is clipped to 10" in started.stdout
    # The same command, longer; the batch size and model are not repeated: they are the checkpoint's.
    continued = run_train(["--dataset_name", "digits", "--output_dir", out, "--resume_from_checkpoint", "auto",
                           "--max_train_steps", "4", "--eval_steps", "0", "--max_eval_samples", "32"])
    assert continued.returncode == 0, continued.stderr[-2000:]
    assert f"--resume_from_checkpoint auto: resuming from {out}/checkpoints/step_2" in continued.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["settings"]["model"], config["settings"]["per_device_train_batch_size"]) == ("small_cnn", 4)
    assert config["setting_sources"]["model"] == "checkpoint"
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4]


def test_a_refused_run_leaves_no_output_dir(tmp_path):
    result = run_train(TINY_DIGITS + ["--num_labeled", "599", "--output_dir", tmp_path / "never"])
    assert result.returncode == 2 and "--num_labeled 599" in result.stderr
    assert not (tmp_path / "never").exists()


def test_write_image_folder_images_are_readable(tmp_path):  # the helper the tests above build on
    folder = write_image_folder(tmp_path / "f", classes=("a",), per_class=1, size=8)
    assert Image.open(folder / "a" / "0.png").size == (8, 8)
