"""The generated command line: defaults, the demo, overrides, errors."""

import pytest

from fixmatch_accel.config import DEMO, TrainConfig, parse_args
from fixmatch_accel.errors import UsageError


def test_defaults_are_the_papers_when_a_dataset_is_named():
    cfg, sources = parse_args(["--dataset_name", "uoft-cs/cifar10"])
    assert (cfg.per_device_train_batch_size, cfg.mu, cfg.threshold, cfg.lambda_u, cfg.temperature) == (
        64, 7, 0.95, 1.0, 1.0)
    assert (cfg.learning_rate, cfg.weight_decay, cfg.ema_decay, cfg.max_train_steps) == (0.03, 5e-4, 0.999, 2**20)
    assert cfg.model == "wrn28_2" and cfg.strong_augment == "rand-m9-mstd0.5"
    assert sources["dataset_name"] == "flag" and sources["mu"] == "default"


def test_no_dataset_means_the_demo_and_flags_override_it():
    cfg, sources = parse_args([])
    assert cfg.dataset_name == "digits" and cfg.model == DEMO["model"] and sources["model"] == "demo"
    cfg, sources = parse_args(["--lambda_u", "0", "--max_train_steps", "7", "--hflip"])
    assert cfg.lambda_u == 0 and cfg.max_train_steps == 7 and cfg.hflip is True
    assert sources["lambda_u"] == "flag" and sources["mu"] == "default" and sources["image_size"] == "demo"


def test_digits_is_never_flipped_however_it_is_named(tmp_path):
    cfg, sources = parse_args(["--dataset_name", "digits"])
    assert cfg.hflip is False and sources["hflip"] == "digits"
    assert cfg.model == "wrn28_2" and sources["model"] == "default"  # only the flip: not the demo's settings
    cfg, sources = parse_args(["--dataset_name", "digits", "--hflip"])  # a layer that sets it wins
    assert cfg.hflip is True and sources["hflip"] == "flag"
    config = tmp_path / "run.yaml"
    config.write_text("dataset_name: digits\nhflip: true\n")
    assert parse_args(["--config", str(config)])[0].hflip is True
    assert parse_args(["--dataset_name", "cifar10"])[0].hflip is True


def test_help_says_what_the_demo_sets(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the description
    for part in (f"dataset {DEMO['dataset_name']}", f"{DEMO['num_labeled']} labels", f"model {DEMO['model']}",
                 f"{DEMO['image_size']} px", f"B={DEMO['per_device_train_batch_size']}",
                 f"{DEMO['max_train_steps']} steps", "strong augmentation paper", "no flip",
                 f"output {DEMO['output_dir']}"):
        assert part in text, part


def test_boolean_flags():
    assert parse_args(["--dataset_name", "x", "--no-hflip"])[0].hflip is False
    assert parse_args(["--dataset_name", "x"])[0].hflip is True


def test_unknown_flag_and_bad_choice_exit(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--no_such_flag", "1"])
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--augment_device", "gpu"])


@pytest.mark.parametrize("argv, message", [
    (["--threshold", "1.5"], "--threshold must be in \\[0, 1\\], got 1.5"),
    (["--train_val_split", "0"], "--train_val_split must be in \\(0, 1\\), got 0.0"),
    (["--train_val_split", "1"], "--train_val_split must be in \\(0, 1\\), got 1.0"),
    (["--mu", "0"], "--mu must be at least 1, got 0"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--max_eval_samples", "0"], "--max_eval_samples must be at least 1, got 0"),
    (["--crop_padding", "-3"], "--crop_padding must be non-negative, got -3"),
    (["--dataset_name", "a", "--train_dir", "b"], "either --dataset_name or --train_dir"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["--lambda_u", "inf"], "--lambda_u must be a finite number, got inf"),
    (["--learning_rate", "-0.1"], "--learning_rate must be non-negative, got -0.1"),
    (["--momentum", "1.5"], "--momentum must be in \\[0, 1\\), got 1.5"),
    (["--seed", "-1"], "--seed must be in \\[0, 2\\*\\*32\\), got -1"),
    (["--seed", str(2**32)], "--seed must be in"),
    (["--output_dir", ""], "--output_dir must name a folder"),
    (["--preset", ""], "--preset '': unknown"),
])
def test_invalid_values_name_the_flag(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


def test_every_field_has_help_and_a_flag():
    import dataclasses

    from fixmatch_accel.config import build_parser

    flags = {a.dest for a in build_parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in flags and f.metadata["help"]


def test_report_to_names_the_missing_package(monkeypatch):
    import accelerate.tracking

    from fixmatch_accel.runlog import trackers

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["wandb"])
    assert trackers("none") is None and trackers("all") == "all" and trackers("wandb") == ["wandb"]
    with pytest.raises(UsageError, match="--report_to tensorboard: the package is not installed: "
                                         "pip install tensorboard"):
        trackers("wandb,tensorboard")
    with pytest.raises(UsageError, match="--report_to 'tensorbored': unknown tracker"):
        trackers("tensorbored")


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--crop_padding" in out and "12.5%" in out and "(default: 0.95)" in out and "--no-hflip" in out


def test_console_script_is_installed_and_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "fixmatch-train"
    assert script.exists(), "install the package (pip install -e .) to get the fixmatch-train command"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: fixmatch-train" in result.stdout


def test_settings_a_run_does_not_read_are_named_once_at_start(tmp_path):
    """Given by flag or file but not read by this run: one note at start, with the reason; a preset's values
    (set for every algorithm) and defaults say nothing."""
    from fixmatch_accel.preflight import check_start

    def notes(*args):
        cfg, sources = parse_args(["--dataset_name", "digits", "--output_dir", str(tmp_path / "out"), *args])
        return [n for n in check_start(cfg, sources).notes if "no effect" in n]

    assert notes("--algorithm", "softmatch", "--threshold", "0.7", "--freematch_fairness", "0.5") == [
        "note: no effect in this run: --freematch_fairness (--algorithm softmatch does not read it), "
        "--threshold (--algorithm softmatch does not read it)"]
    assert notes("--softmatch_n_sigma", "3", "--no-flexmatch_warmup") == [
        "note: no effect in this run: --flexmatch_warmup (--algorithm fixmatch does not read it), "
        "--softmatch_n_sigma (--algorithm fixmatch does not read it)"]
    assert notes("--stats_momentum", "0.9", "--shuffle_buffer_size", "10") == [
        "note: no effect in this run: --stats_momentum (--algorithm fixmatch does not read it, nor --dist_align "
        "none), --shuffle_buffer_size (only with --streaming)"]
    assert notes("--algorithm", "flexmatch", "--threshold", "0.7", "--no-flexmatch_warmup") == []
    assert notes("--stats_momentum", "0.9", "--dist_align", "uniform") == []
    assert notes("--preset", "cifar10-40", "--algorithm", "softmatch") == []  # the preset's threshold
    path = tmp_path / "run.yaml"
    path.write_text("algorithm: freematch\nthreshold: 0.8\n")
    assert notes("--config", str(path)) == [
        "note: no effect in this run: --threshold (--algorithm freematch does not read it)"]
