"""End-to-end runs of train.py in real processes, checked by the files they leave."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, accelerate_launch, run_refused, run_train, write_image_folder
from safetensors.torch import load_file

from fixmatch_accel.config import parse_args
from fixmatch_accel.errors import UsageError
from fixmatch_accel.models import create_model
from fixmatch_accel.preflight import check_start

TINY_DIGITS = ["--dataset_name", "digits", "--model", "small_cnn", "--image_size", "8", "--num_labeled", "20",
               "--per_device_train_batch_size", "4", "--mu", "2", "--dataloader_num_workers", "0",
               "--logging_steps", "2", "--eval_steps", "4", "--checkpointing_steps", "3", "--max_eval_samples", "64",
               "--no-plots"]  # the plots cost ~2 s a run: drawn in the tests that look at them


def read_metrics(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "top1" in r]


def check_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_tiny_digits_run_leaves_everything(tmp_path):
    out = tmp_path / "run"
    result = run_train([a for a in TINY_DIGITS if a != "--no-plots"] +
                       ["--max_train_steps", "6", "--output_dir", out, "--augment_device", "accelerator"])
    check_ok(result)
    assert (out / "training_curves.png").is_file() and (out / "per_class.png").is_file()
    assert "final EMA model: top-1" in result.stdout
    per_class = next(line for line in result.stdout.splitlines() if line.startswith("per class top-1: "))
    assert per_class.count(",") == 9 and per_class.split(": ", 1)[1].startswith("0 ")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "small_cnn" and cfg["num_classes"] == 10 and cfg["world_size"] == 1
    assert cfg["resolved"]["cache_decoded"] is True and cfg["resolved"]["channels_last"] is True
    assert cfg["settings"]["mu"] == 2 and cfg["setting_sources"]["mu"] == "flag"
    assert cfg["global_batch"] == {"labeled": 4, "unlabeled": 8}
    assert cfg["pretrained_cfg"]["input_size"] == [3, 8, 8] and len(cfg["pretrained_cfg"]["mean"]) == 3
    split = json.loads((out / "labeled_split.json").read_text())
    assert len(split["indices"]) == 20 and set(split["per_class"].values()) == {2}

    train_rows, eval_rows = read_metrics(out)
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for r in train_rows:
        for key in ("loss", "loss_x", "loss_u", "mask_ratio", "lr", "images_per_s"):
            assert isinstance(r[key], float), key
        # the accuracy of no pseudo-label is not 0: null
        assert isinstance(r["pseudo_label_acc"], float) if r["mask_ratio"] > 0 else r["pseudo_label_acc"] is None
        assert 0 <= r["mask_ratio"] <= 1 and r["loss"] == pytest.approx(r["loss_x"] + r["loss_u"], rel=1e-5)
    # lr logged is the rate each step used: the cosine at step k-1.
    assert train_rows[-1]["lr"] == pytest.approx(0.03 * math.cos(7 * math.pi * 5 / (16 * 6)))
    assert [r["step"] for r in eval_rows] == [4, 6]
    assert 0 <= eval_rows[-1]["top1"] <= 100 and len(eval_rows[-1]["per_class"]) == 10
    results = json.loads((out / "eval_results.json").read_text())
    assert results["top1"] == eval_rows[-1]["top1"] and results["num_eval"] == 64
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6"]

    # The saved EMA weights load strictly into the model they came from.
    model = create_model(cfg["architecture"], cfg["num_classes"])
    model.load_state_dict(load_file(out / "model.safetensors"))


@pytest.mark.parametrize("algorithm", [["--threshold", "0"], ["--algorithm", "freematch", "--dist_align", "labeled"]])
def test_compile_on_cpu_logs_the_eager_losses(tmp_path, algorithm):
    """--compile on a CPU compiles forward + loss (and the algorithm's statistics); the strong view is made
    eagerly (each op on its own samples, the pixels of the static-shape path). With threshold 0 every strong
    view enters the loss, so the two runs' logged losses agree only if the views and the step do; FreeMatch
    with alignment adds its state updates and thresholds to the graph."""
    args = TINY_DIGITS + ["--augment_device", "accelerator", "--max_train_steps", "4",
                          "--eval_steps", "0", "--checkpointing_steps", "0", "--seed", "3", *algorithm]
    rows = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        check_ok(run_train(args + extra + ["--output_dir", tmp_path / name]))
        rows[name] = read_metrics(tmp_path / name)[0]
        assert json.loads((tmp_path / name / "config.json").read_text())["settings"]["compile"] is bool(extra)
    assert [r["step"] for r in rows["compiled"]] == [2, 4]
    for eager, compiled in zip(rows["eager"], rows["compiled"]):
        assert eager["mask_ratio"] == compiled["mask_ratio"] and eager["loss_u"] > 0
        assert eager["mask_ratio"] == 1.0 or "freematch" in algorithm
        for key in ("loss", "loss_x", "loss_u", "threshold_per_class"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-4), key


def test_resume_continues_and_refuses_to_clobber(tmp_path):
    out = tmp_path / "run"
    check_ok(run_train(TINY_DIGITS + ["--max_train_steps", "4", "--output_dir", out, "--no-cache_decoded"]))
    assert json.loads((out / "config.json").read_text())["resolved"]["cache_decoded"] is False
    with pytest.raises(UsageError, match="already holds a run"):  # refused before any data is read
        check_start(*parse_args(list(map(str, TINY_DIGITS + ["--max_train_steps", "8", "--output_dir", out]))))
    resumed = run_train(TINY_DIGITS + ["--max_train_steps", "8", "--output_dir", out,
                                       "--resume_from_checkpoint", "latest"])
    check_ok(resumed)
    assert "resumed from" in resumed.stdout and "step_4" in resumed.stdout
    resumed_cfg = json.loads((out / "config.json").read_text())
    assert resumed_cfg["setting_sources"]["labeled_split_file"] == "checkpoint"
    assert resumed_cfg["settings"]["labeled_split_file"].endswith("step_4/labeled_split.json")
    train_rows, _ = read_metrics(out)
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert (out / "checkpoints" / "step_6").is_dir()
    # A new run over it: the old run's files move aside, so its step_8 is neither `latest` nor counted by the limit.
    new = run_train(TINY_DIGITS + ["--max_train_steps", "3", "--output_dir", out, "--overwrite_output_dir",
                                   "--checkpoints_total_limit", "1"])
    check_ok(new)
    (aside,) = out.glob("replaced_*")
    assert f"the previous run's files are now in {aside}" in new.stdout
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_3", "step_4", "step_6", "step_8"]
    assert {"model.safetensors", "metrics.jsonl", "config.json", "labeled_split.json"} <= {
        p.name for p in aside.iterdir()}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_3"]
    assert [r["step"] for r in read_metrics(out)[0]] == [2, 3]  # the new run's rows only


def test_images_per_s_counts_training_steps_only(tmp_path):
    """An evaluation or a checkpoint inside a logging window does not count as training time."""
    out = tmp_path / "run"
    launcher = [sys.executable, str(ROOT / "tests" / "slow_pauses.py"), "1.5"]
    check_ok(run_train(TINY_DIGITS + ["--max_train_steps", 4, "--logging_steps", 2, "--eval_steps", 2,
                                      "--checkpointing_steps", 3, "--output_dir", out], launcher=launcher))
    rows = {r["step"]: r for r in read_metrics(out)[0]}
    # steps 3-4 (24 images) shared their window with the step-2 evaluation and the step-3 checkpoint,
    # 3 s of pauses: counted, they would make at most 8 images/s
    assert rows[4]["images_per_s"] > 40, rows


def test_cpu_augmentation_path_on_cifar10_with_wrn(tmp_path, cifar10_path):
    out = tmp_path / "run"
    result = run_train(["--dataset_name", cifar10_path, "--max_train_samples", "200", "--max_eval_samples", "40",
                        "--num_labeled", "20", "--per_device_train_batch_size", "2", "--mu", "2",
                        "--max_train_steps", "3", "--logging_steps", "1", "--eval_steps", "0",
                        "--checkpointing_steps", "0", "--augment_device", "cpu", "--dataloader_num_workers", "1",
                        "--output_dir", out])
    check_ok(result)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "wrn28_2" and cfg["label_names"][0] == "airplane"
    assert cfg["resolved"]["image_size"] == 32 and cfg["resolved"]["crop_padding"] == 4
    assert cfg["resolved"]["augment_device"] == "cpu"
    train_rows, eval_rows = read_metrics(out)
    assert len(train_rows) == 3 and eval_rows[-1]["step"] == 3
    assert not (out / "checkpoints").exists()


def test_image_folder_with_a_timm_model(tmp_path):
    write_image_folder(tmp_path / "train", per_class=10)
    write_image_folder(tmp_path / "val", per_class=3, seed=1)
    out = tmp_path / "run"
    result = run_train(["--train_dir", tmp_path / "train", "--validation_dir", tmp_path / "val",
                        "--model", "resnet10t", "--num_labeled", "6", "--per_device_train_batch_size", "3",
                        "--mu", "2", "--max_train_steps", "2", "--logging_steps", "1", "--checkpointing_steps", "0",
                        "--dataloader_num_workers", "0", "--output_dir", out])
    check_ok(result)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["label_names"] == ["cat", "dog", "frog"] and cfg["resolved"]["eval_split"] == "validation"
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_eval"] == 9 and set(results["per_class"]) == {"cat", "dog", "frog"}
    import timm
    model = timm.create_model("resnet10t", num_classes=3)
    model.load_state_dict(load_file(out / "model.safetensors"))


BAD_INPUT = [
    (["--dataset_name", "/nonexistent/dataset"], "--dataset_name '/nonexistent/dataset': no such folder"),
    (["--image_column_name", "pixels"], "--image_column_name 'pixels': no such column"),
    (["--num_labeled", "15"], "--num_labeled 15 is not a multiple of the number of classes (10)"),
    (["--num_labeled", "5000"], "--num_labeled 5000 needs 500 examples of each class"),
    (["--model", "not_a_model"], "--model 'not_a_model' is neither a built-in model"),
    (["--strong_augment", "rand-zz"], "--strong_augment"),
    (["--crop_padding", "8"], "--crop_padding 8 must be smaller than the image side (8 px)"),
    (["--augment_device", "cpu", "--cache_decoded"], "--cache_decoded needs --augment_device accelerator"),
] + ([] if torch.cuda.is_available() else
      [(["--mixed_precision", "fp16"], "--mixed_precision fp16 does not run on a CPU")])


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
    """Every BAD_INPUT command, run in one process."""
    tmp = tmp_path_factory.mktemp("bad_input")
    return run_refused([TINY_DIGITS + ["--output_dir", tmp / f"run{i}", "--max_train_steps", "1"] + extra
                        for i, (extra, _) in enumerate(BAD_INPUT)], tmp)


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[message for _, message in BAD_INPUT])
def test_bad_input_is_one_clear_line(bad_input_results, case):
    result, message = bad_input_results[case], BAD_INPUT[case][1]
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fixmatch-train: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]


def test_two_processes_shard_the_data(tmp_path):
    out = tmp_path / "ids"
    cmd = accelerate_launch() + [str(ROOT / "tests" / "loader_ids.py"), str(out), "--dataset_name", "digits",
                        "--image_size", "8", "--per_device_train_batch_size", "4", "--mu", "4",
                        "--dataloader_num_workers", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    for name, _batch in (("labeled", 4), ("unlabeled", 16)):
        a, b = set(ranks[0][name]), set(ranks[1][name])
        assert a and b and not a & b, name  # disjoint
        assert len(ranks[0][name]) == len(ranks[1][name])
    # One pass covers the unlabeled set except the remainder of the last global batch (drop_last).
    covered = set(ranks[0]["unlabeled"]) | set(ranks[1]["unlabeled"])
    assert len(covered) > ranks[0]["num_train"] - 2 * 16


def test_two_process_training_logs_global_statistics(tmp_path):
    out = tmp_path / "run"
    prints = tmp_path / "fingerprints"
    prints.mkdir()
    result = run_train(TINY_DIGITS + ["--max_train_steps", "4", "--output_dir", out, "--threshold", "0"],
                       launcher=accelerate_launch() + [str(ROOT / "tests" / "ema_at_eval.py"), str(prints)],
                       timeout=300)
    check_ok(result)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["global_batch"] == {"labeled": 8, "unlabeled": 16}
    train_rows, eval_rows = read_metrics(out)
    # threshold 0 masks every unlabeled image: the per-class counts of a 2-step window must add up to
    # both processes' images (2 steps x 8 per process x 2 processes), not one process's.
    for r in train_rows:
        assert r["mask_ratio"] == 1.0 and sum(r["mask_per_class"]) == 2 * 8 * 2
        assert r["labeled_seen"] == r["step"] * 8
    assert eval_rows[-1]["step"] == 4
    assert json.loads((out / "eval_results.json").read_text())["num_eval"] == 64  # gathered once, no duplicates
    # Both processes evaluate one model, the one saved: process 0's EMA (each process's EMA blends in the
    # BatchNorm statistics of its own batches, so they drift apart).
    assert sorted(p.name for p in prints.iterdir()) == ["eval_0_1.json", "eval_1_1.json"]  # the final evaluation
    on_0, on_1 = (json.loads((prints / f"eval_{p}_1.json").read_text()) for p in (0, 1))
    assert on_0 == on_1
    saved = {k: float(v.double().sum()) for k, v in load_file(out / "model.safetensors").items()}
    assert saved == pytest.approx({k: v for k, v in on_0.items() if k in saved})


def test_grad_norm_is_logged_before_clipping_and_max_grad_norm_clips(tmp_path):
    """Every training row has grad_norm, the gradients' total norm before clipping: the first step's is the same
    with and without --max_grad_norm. A limit far above it changes no weight (the gradients are scaled by exactly
    1); a limit below it changes the run."""
    args = TINY_DIGITS + ["--augment_device", "accelerator", "--max_train_steps", 3, "--logging_steps", 1,
                          "--eval_steps", 0, "--checkpointing_steps", 0]
    runs = {name: tmp_path / name for name in ("free", "high", "low")}
    for name, extra in (("free", []), ("high", ["--max_grad_norm", 1e9]), ("low", ["--max_grad_norm", 1e-3])):
        check_ok(run_train(args + extra + ["--output_dir", runs[name]]))
    rows = {name: read_metrics(out)[0] for name, out in runs.items()}
    norms = [r["grad_norm"] for r in rows["free"]]
    assert len(norms) == 3 and all(math.isfinite(n) and n > 1e-3 for n in norms)
    assert rows["low"][0]["grad_norm"] == pytest.approx(norms[0], rel=1e-6)  # before clipping
    assert [r["grad_norm"] for r in rows["high"]] == norms
    weights = {name: load_file(out / "model.safetensors") for name, out in runs.items()}
    assert all(torch.equal(weights["free"][k], weights["high"][k]) for k in weights["free"])
    assert not all(torch.equal(weights["free"][k], weights["low"][k]) for k in weights["free"])
