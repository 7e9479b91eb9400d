"""Where a setting's value comes from: the optimizer's own learning rate, presets beside your own data, and errors
that name the preset or file a bad value came from."""

import io

from conftest import run_refused, write_image_folder
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from fixmatch_accel.checkpoint import reconcile_resume
from fixmatch_accel.config import parse_args
from fixmatch_accel.preflight import check_start


def png_bytes(size=(8, 8), colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def test_adamw_without_a_learning_rate_takes_its_own(tmp_path):
    cfg, sources = parse_args(["--dataset_name", "x", "--optimizer", "adamw", "--output_dir", str(tmp_path / "r")])
    assert (cfg.learning_rate, sources["learning_rate"]) == (5e-4, "optimizer")
    assert ("note: --optimizer adamw without --learning_rate: its default 0.0005 (give --learning_rate to choose "
            "another)") in check_start(cfg, sources).notes
    # SGD keeps the paper's rate, a field default; a rate given anywhere wins
    cfg, sources = parse_args(["--dataset_name", "x"])
    assert (cfg.optimizer, cfg.learning_rate, sources["learning_rate"]) == ("sgd", 0.03, "default")
    cfg, sources = parse_args(["--dataset_name", "x", "--optimizer", "adamw", "--learning_rate", "0.01"])
    assert (cfg.learning_rate, sources["learning_rate"]) == (0.01, "flag")
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: adamw\n")
    cfg, sources = parse_args(["--config", str(path)])  # the demo with AdamW
    assert (cfg.dataset_name, cfg.learning_rate, sources["learning_rate"]) == ("digits", 5e-4, "optimizer")
    path.write_text("optimizer: adamw\nlearning_rate: 1e-3\n")
    assert parse_args(["--config", str(path)])[0].learning_rate == 1e-3


def test_a_resumed_run_keeps_its_rate_when_the_optimizer_chose_it():
    cfg, sources = parse_args(["--dataset_name", "x", "--optimizer", "adamw"])
    saved = dict(optimizer="adamw", learning_rate=1e-3)
    cfg, sources, notes = reconcile_resume(cfg, sources, "ckpt", saved, 5)
    assert (cfg.learning_rate, sources["learning_rate"], notes) == (1e-3, "checkpoint", [])




def test_a_preset_takes_your_own_data_source(tmp_path):
    """--train_dir under a preset replaces the preset's dataset with its columns and splits, as a whole."""
    cfg, sources = parse_args(["--preset", "ft-cifar100-200-vits16", "--train_dir", "folders/train",
                               "--validation_dir", "folders/val"])
    assert (cfg.train_dir, cfg.dataset_name, cfg.label_column_name) == ("folders/train", None, None)
    assert sources["dataset_name"] == sources["label_column_name"] == "default"
    assert (cfg.model, sources["model"]) == ("vit_small_patch16_224.augreg_in21k_ft_in1k",
                                             "preset:ft-cifar100-200-vits16")
    path = tmp_path / "data.yaml"
    path.write_text("dataset_name: my/parquet\nlabel_column_name: kind\n")
    cfg, sources = parse_args(["--preset", "svhn-40", "--config", str(path)])
    assert (cfg.dataset_name, cfg.dataset_config_name, cfg.label_column_name) == ("my/parquet", None, "kind")
    # the flag's own data replaces the file's too; a column alone keeps the dataset it belongs to
    cfg, _ = parse_args(["--config", str(path), "--train_dir", "folders/train"])
    assert (cfg.dataset_name, cfg.label_column_name) == (None, None)
    cfg, _ = parse_args(["--preset", "cifar100-400", "--label_column_name", "coarse_label"])
    assert (cfg.dataset_name, cfg.label_column_name) == ("uoft-cs/cifar100", "coarse_label")
    # the preset's unlabeled split belongs to its dataset: your folders bring their own unlabeled data, or none
    cfg, _ = parse_args(["--preset", "stl10-1000", "--train_dir", "folders/train", "--validation_dir", "folders/val"])
    assert (cfg.dataset_name, cfg.unlabeled_split, cfg.eval_split, cfg.model) == (None, None, None, "wrn37_2")
    cfg, _ = parse_args(["--preset", "stl10-1000", "--train_dir", "folders/train", "--unlabeled_dir", "dump"])
    assert (cfg.unlabeled_split, cfg.unlabeled_dir) == (None, "dump")


def test_errors_name_the_preset_or_file_a_value_came_from(tmp_path):
    train, val = write_image_folder(tmp_path / "train"), write_image_folder(tmp_path / "val", per_class=2)
    parquet = tmp_path / "pq"
    parquet.mkdir()
    Dataset.from_dict({"img": [{"bytes": png_bytes(), "path": None}] * 4, "label": [0, 1, 0, 1]},
                      features=Features(img=Image(), label=Value("int64"))).to_parquet(str(parquet / "train.parquet"))
    config = tmp_path / "run.yaml"
    config.write_text(f"dataset_name: {parquet}\nlabel_column_name: fine_label\n")
    own, from_file = run_refused([
        ["--preset", "cifar10-40", "--train_dir", train, "--validation_dir", val, "--output_dir", tmp_path / "a"],
        ["--config", config, "--output_dir", tmp_path / "b"],
    ], tmp_path)
    assert own.returncode == 2 and own.stderr.strip().splitlines()[-1] == (
        "fixmatch-train: error: --num_labeled 40 (from --preset cifar10-40) is not a multiple of the number of "
        "classes (3)")
    assert from_file.returncode == 2 and from_file.stderr.strip().splitlines()[-1] == (
        f"fixmatch-train: error: --label_column_name 'fine_label' (from --config {config}): no such column "
        "(columns: img, label)")
