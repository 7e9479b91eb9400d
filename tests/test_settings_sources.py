"""Where a setting's value comes from: the optimizer's own learning rate, presets beside your own data, and errors
that name the preset or file a bad value came from."""

import pytest

from fixmatch_accel.checkpoint import reconcile_resume
from fixmatch_accel.config import parse_args
from fixmatch_accel.preflight import check_start


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


