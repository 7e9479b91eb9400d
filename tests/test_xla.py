"""The TPU path, run on XLA's CPU device (PJRT_DEVICE=CPU): trains, compiles once, never falls back, agrees with eager.

A step that compiles to one graph and has no CPU fallback on XLA's CPU device runs
the same way on a TPU. These tests need torch_xla (torch 2.9): .ci/run installs it in
a second venv and runs `pytest -m xla` there; elsewhere they skip.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_train
from safetensors.torch import load_file
from test_e2e import TINY_DIGITS, check_ok

from fixmatch_accel.algorithms import ALGORITHMS

pytestmark = [pytest.mark.xla,
              pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch_xla is not installed")]

XLA = {"PJRT_DEVICE": "CPU", "USE_TORCH_XLA": "1"}
# accelerate's switch for plain PyTorch where torch_xla is installed: the eager reference on the same torch.
EAGER = {"USE_TORCH_XLA": "0"}
STEPS, LOG, SAVE = 30, 3, 24  # logging every 3 steps; one evaluation + checkpoint at 24 before the final ones
RUN = TINY_DIGITS + ["--augment_device", "accelerator", "--max_train_steps", STEPS, "--logging_steps", LOG,
                     "--eval_steps", SAVE, "--checkpointing_steps", SAVE, "--max_eval_samples", 61,
                     "--per_device_eval_batch_size", 16, "--threshold", 0.5]


def rows_by_step(out: Path):
    rows = json.loads((out / "xla_metrics.json").read_text())
    return {r["step"]: r for r in rows if not r.get("end")}, [r for r in rows if r.get("end")]


def losses(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def xla_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("xla") / "run"
    result = run_train([a for a in RUN if a != "--no-plots"] + ["--output_dir", out], env=XLA)  # plots too
    check_ok(result)
    return out


def test_trains_on_the_xla_device_and_writes_the_run_files(xla_run):
    cfg = json.loads((xla_run / "config.json").read_text())
    assert cfg["device"].startswith("xla") and cfg["resolved"]["augment_device"] == "accelerator"
    for name in ("labeled_split.json", "metrics.jsonl", "eval_results.json", "model.safetensors",
                 "training_curves.png", "per_class.png", "xla_metrics.json"):
        assert (xla_run / name).is_file(), name
    assert sorted(p.name for p in (xla_run / "checkpoints").iterdir()) == [f"step_{SAVE}", f"step_{STEPS}"]
    result = json.loads((xla_run / "eval_results.json").read_text())
    # 61 images in batches of 16: the padding of the last batch is neither counted nor reported as skipped.
    assert result["num_eval"] == 61 and result["skipped_images"] == 0 and 0 <= result["top1"] <= 100


def test_compiles_once_never_falls_back_and_reads_values_only_when_logging(xla_run):
    rows, end = rows_by_step(xla_run)
    assert sorted(rows) == list(range(LOG, STEPS + 1, LOG)) and len(end) == 1
    training = [rows[s] for s in range(LOG, SAVE + 1, LOG)]  # steps 3..24: training and logging only
    # After a warm-up of 3 steps (one graph for the first step, which creates the momentum buffers, one
    # for every later step, one for the log's reduction) no step compiles anything over 21 more steps.
    assert {r["compiles"] for r in training} == {training[0]["compiles"]}, [r["compiles"] for r in training]
    # One host read per logging window (the log row's numbers), none in the steps between.
    reads = [b["transfers_to_host"] - a["transfers_to_host"] for a, b in zip(training, training[1:])]
    assert reads == [1] * len(reads)
    # Every operation has an XLA lowering: the only aten:: counter is accelerate's rendezvous reading a
    # value on the host (and later the checkpoint's finite check), and it does not move while training.
    assert {r["fallbacks"] == training[0]["fallbacks"] for r in training} == {True}
    assert set(training[0]["fallbacks"]) <= {"aten::_local_scalar_dense"}
    # The evaluation and checkpoint at step 24 compile a bounded number of graphs, once: the steps after
    # them, the final evaluation (same shapes: its short batch is padded) and checkpoint add none.
    later = [rows[s] for s in range(SAVE + LOG, STEPS + 1, LOG)] + end
    added = later[0]["compiles"] - training[-1]["compiles"]
    assert 0 < added <= 8 and {r["compiles"] for r in later} == {later[0]["compiles"]}
    assert set(end[0]["fallbacks"]) <= {"aten::_local_scalar_dense"}


def test_resume_on_xla_is_exact(xla_run, tmp_path):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    checkpoint = out / "checkpoints" / f"step_{SAVE}"
    shutil.copytree(xla_run / "checkpoints" / f"step_{SAVE}", checkpoint)
    check_ok(run_train(RUN + ["--output_dir", out, "--resume_from_checkpoint", checkpoint], env=XLA))
    straight = losses(xla_run)
    assert losses(out) == pytest.approx({s: straight[s] for s in straight if s > SAVE}, rel=1e-6, abs=1e-7)
    a, b = load_file(xla_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    rows, end = rows_by_step(out)
    assert min(rows) == SAVE + LOG and end[0]["since_step"] == SAVE


def test_agrees_with_eager_cpu(tmp_path):
    # threshold 0: every pseudo-label counts, so the strong view's pixels enter the first loss too.
    args = TINY_DIGITS + ["--augment_device", "accelerator", "--threshold", 0, "--logging_steps", 1,
                          "--max_train_steps", 2, "--eval_steps", 0, "--checkpointing_steps", 2]
    runs = {}
    for name, env in (("xla", XLA), ("eager", EAGER)):
        runs[name] = tmp_path / name
        check_ok(run_train(args + ["--output_dir", runs[name]], env=env))
    xla, eager = runs["xla"], runs["eager"]
    assert json.loads((eager / "config.json").read_text())["device"] == "cpu"
    first = [json.loads((out / "metrics.jsonl").read_text().splitlines()[0]) for out in (xla, eager)]
    assert first[0]["step"] == first[1]["step"] == 1 and first[1]["loss_u"] > 0
    for key in ("loss", "loss_x", "loss_u"):
        assert abs(first[0][key] - first[1][key]) < 1e-4, key
    assert first[0]["mask_per_class"] == first[1]["mask_per_class"]
    assert (xla / "labeled_split.json").read_text() == (eager / "labeled_split.json").read_text()

    def files(out):
        return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != "xla_metrics.json")

    assert files(xla) == files(eager)  # the same run folder, checkpoints included
    results = [json.loads((out / "eval_results.json").read_text()) for out in (xla, eager)]
    assert results[0]["num_eval"] == results[1]["num_eval"]
    assert abs(results[0]["top1"] - results[1]["top1"]) <= 100 / results[0]["num_eval"] + 1e-6


def test_streaming_and_a_launchers_bf16_on_xla(tmp_path):
    # XLA_USE_BF16 is how accelerate's TPU launcher passes a config's bf16 (torch_xla itself ignores it now).
    out = tmp_path / "stream"
    check_ok(run_train(TINY_DIGITS + ["--streaming", "--max_train_samples", 60, "--max_train_steps", 12,
                                      "--logging_steps", LOG, "--eval_steps", 6, "--checkpointing_steps", 6,
                                      "--max_eval_samples", 30, "--per_device_eval_batch_size", 8,
                                      "--output_dir", out], env=dict(XLA, XLA_USE_BF16="1")))
    assert json.loads((out / "config.json").read_text())["mixed_precision"] == "bf16"
    assert json.loads((out / "eval_results.json").read_text())["num_eval"] == 30  # 4 batches, the last padded
    rows, end = rows_by_step(out)
    # The first evaluation (step 6) compiles its graphs once; the second (12) and the steps between none.
    assert rows[9]["compiles"] == rows[12]["compiles"] == end[0]["compiles"]
    assert rows[3]["compiles"] == rows[6]["compiles"]


def test_compile_flag_is_one_clear_line_on_xla(tmp_path):
    result = run_train(TINY_DIGITS + ["--compile", "--output_dir", tmp_path / "c"], env=XLA)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fixmatch-train: error: --compile (torch.compile) is not")


# Every registered algorithm but fixmatch (the run above); flexmatch with the labeled alignment as well.
ALIGNED = {"flexmatch": ["--dist_align", "labeled"]}


@pytest.mark.parametrize("algorithm", [["--algorithm", name, *ALIGNED.get(name, [])]
                                       for name in ALGORITHMS if name != "fixmatch"])
def test_every_algorithm_compiles_once_and_agrees_with_eager(tmp_path, algorithm):
    """The algorithms' statistics (FlexMatch's scatter_reduce(amax) included) lower to XLA: after the warm-up
    no step compiles anything, nothing falls back to the CPU, and the first steps log eager's numbers."""
    # A row every step: the first holds step 1 alone (later steps drift apart by float rounding).
    args = TINY_DIGITS + ["--augment_device", "accelerator", "--max_train_steps", 12, "--logging_steps", 1,
                          "--eval_steps", 0, "--checkpointing_steps", 0, "--threshold", 0.5, *algorithm]
    runs = {name: tmp_path / name for name in ("xla", "eager")}
    for name, env in (("xla", XLA), ("eager", EAGER)):
        check_ok(run_train(args + ["--output_dir", runs[name]], env=env))
    rows, end = rows_by_step(runs["xla"])
    assert rows[6]["compiles"] == rows[9]["compiles"] == rows[12]["compiles"], [r["compiles"] for r in rows.values()]
    assert set(end[0]["fallbacks"]) <= {"aten::_local_scalar_dense"}
    first = [json.loads((runs[n] / "metrics.jsonl").read_text().splitlines()[0]) for n in ("xla", "eager")]
    for key in ("loss", "loss_x", "loss_u", "mask_ratio"):
        assert first[0][key] == pytest.approx(first[1][key], abs=1e-4), key
    assert first[0]["threshold_per_class"] == pytest.approx(first[1]["threshold_per_class"], abs=1e-4)
