"""Surviving interruptions: signals, kills, exact resume, bounded checkpoints, unsafe or broken checkpoints."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, accelerate_launch, run_refused, run_train
from safetensors.torch import load_file
from test_e2e import TINY_DIGITS, check_ok

from fixmatch_accel.config import parse_args
from fixmatch_accel.errors import UsageError
from fixmatch_accel.preflight import check_start

# Exact resume is promised for on-device augmentation (explicit generators); the PIL path draws from
# global RNGs that DataLoader iterators also consume, so it resumes at the right data but not bit-exactly.
QUICK = TINY_DIGITS + ["--logging_steps", "1", "--eval_steps", "0", "--checkpointing_steps", "0",
                       "--augment_device", "accelerator"]


def losses(out: Path):
    """The last logged loss of each step (a resumed run may log a step twice)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def start(args):
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path):
    steps = 40
    straight = tmp_path / "straight"
    check_ok(run_train(QUICK + ["--max_train_steps", steps, "--output_dir", straight]))

    out = tmp_path / "preempted"
    proc = start(QUICK + ["--max_train_steps", steps, "--output_dir", out])
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    stopped_at = max(losses(out))
    assert f"stopped by SIGTERM after step {stopped_at}" in stderr and stopped_at < steps
    assert (out / "checkpoints" / f"step_{stopped_at}").is_dir()
    assert not (out / "model.safetensors").exists()  # not a finished run

    check_ok(run_train(QUICK + ["--max_train_steps", steps, "--output_dir", out, "--resume_from_checkpoint", "latest"]))
    # Same loss at every step and the same final weights as the uninterrupted run.
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6, abs=1e-7)
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_sigint_checkpoints_and_exits_130(tmp_path):
    out = tmp_path / "run"
    proc = start(QUICK + ["--max_train_steps", 400, "--output_dir", out, "--logging_steps", 7])
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    stopped_at = int(re.search(r"stopped by SIGINT after step (\d+)", stderr).group(1))
    assert "fixmatch-train: stopped by SIGINT" in stderr and "error:" not in stderr  # a stop asked for
    assert "continue with --resume_from_checkpoint latest" in stderr
    assert (out / "checkpoints" / f"step_{stopped_at}" / "trainer_state.json").exists()
    # the steps since the last logging step are logged too, whatever step the signal came at
    assert max(losses(out)) == stopped_at


def test_resume_keeps_the_checkpoints_labeled_split(tmp_path):
    out = tmp_path / "run"
    check_ok(run_train(QUICK + ["--max_train_steps", 3, "--checkpointing_steps", 3, "--output_dir", out]))
    first = json.loads((out / "labeled_split.json").read_text())["indices"]
    # Another seed would draw another split: a resumed run keeps the one it was trained with.
    result = run_train(QUICK + ["--max_train_steps", 4, "--output_dir", out, "--seed", 5,
                                "--resume_from_checkpoint", "latest"])
    check_ok(result)
    assert json.loads((out / "labeled_split.json").read_text())["indices"] == first
    assert "labeled split from the checkpoint" in result.stdout


def test_sigkill_then_resume_from_the_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = start(QUICK + ["--max_train_steps", 400, "--checkpointing_steps", 3, "--output_dir", out])
    wait_for(lambda: (out / "checkpoints" / "step_6").is_dir(), proc)
    proc.kill()
    proc.communicate()
    # A write cut short leaves only a .tmp folder, which never counts as a checkpoint.
    partial = out / "checkpoints" / "step_999.tmp"
    partial.mkdir(exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    result = run_train(QUICK + ["--max_train_steps", 12, "--checkpointing_steps", 3, "--output_dir", out,
                                "--resume_from_checkpoint", "latest"])
    check_ok(result)
    assert "resumed from" in result.stdout and "step_999" not in result.stdout
    assert max(losses(out)) == 12


def test_sigkill_inside_a_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    out = tmp_path / "run"
    args = QUICK + ["--max_train_steps", 12, "--checkpointing_steps", 3, "--output_dir", out]
    killed = run_train(args, launcher=[sys.executable, str(ROOT / "tests" / "kill_mid_checkpoint.py"), "6"])
    assert killed.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_3", "step_6.tmp"]  # the write was cut short: model files but no rename
    assert (out / "checkpoints" / "step_6.tmp" / "model.safetensors").exists()
    result = run_train(args + ["--resume_from_checkpoint", "latest"])
    check_ok(result)
    assert "resumed from" in result.stdout and "step_3 at step 3" in result.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_12", "step_3", "step_6", "step_9"]


def test_checkpoints_total_limit_keeps_the_newest(tmp_path):
    out = tmp_path / "run"
    check_ok(run_train(QUICK + ["--max_train_steps", 8, "--checkpointing_steps", 2, "--checkpoints_total_limit", 2,
                                "--output_dir", out]))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_6", "step_8"]


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    check_ok(run_train(QUICK + ["--max_train_steps", 2, "--checkpointing_steps", 2, "--output_dir", out]))
    return out


@pytest.fixture
def finished(finished_once, tmp_path):
    """A finished 2-step run with a checkpoint at step 2: a copy of one run, each test damages its own."""
    return shutil.copytree(finished_once, tmp_path / "run")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def truncate(name, keep):
    def damage(checkpoint: Path):
        (checkpoint / name).write_bytes((checkpoint / name).read_bytes()[:keep])
    return damage


def write_code_carrying_pickle(checkpoint: Path):
    with open(checkpoint / "random_states_0.pkl", "wb") as f:
        pickle.dump({"x": Payload(checkpoint.parent.parent / "pwned")}, f)


# Each case: what is done to a copy of a finished run's checkpoint step_2, the flags of the resume, and what its
# one-line error says.
REFUSED_RESUMES = {
    "truncated model.safetensors": (truncate("model.safetensors", 100), [],
                                    ["step_2", "cannot read model.safetensors"]),
    "truncated optimizer.bin": (truncate("optimizer.bin", 0), [], ["step_2", "cannot read optimizer.bin"]),
    # not --labeled_split_file: the checkpoint's own split is broken
    "truncated labeled_split.json": (truncate("labeled_split.json", 20), [],
                                     ["step_2", "its labeled_split.json: not a labeled_split.json"]),
    "missing model.safetensors": (lambda c: (c / "model.safetensors").unlink(), [],
                                  ["cannot load it (missing model.safetensors)"]),
    "another model": (None, ["--model", "resnet10t"], ["cannot load"]),
    # never redrawn from today's flags
    "no labeled_split.json": (lambda c: (c / "labeled_split.json").unlink(), [],
                              ["step_2", "has no labeled_split.json"]),
    "past --max_train_steps": (None, ["--max_train_steps", 1], ["is at step 2, past --max_train_steps 1"]),
    "a pickle that runs code": (write_code_carrying_pickle, [], ["cannot read random_states_0.pkl"]),
}


@pytest.fixture(scope="module")
def refused_resumes(finished_once, tmp_path_factory):
    """Every REFUSED_RESUMES case on its own copy of the finished run, resumed in one process: (result, run)."""
    tmp, commands, runs = tmp_path_factory.mktemp("refused"), [], []
    for i, (damage, flags, _) in enumerate(REFUSED_RESUMES.values()):
        run = shutil.copytree(finished_once, tmp / f"run{i}")
        if damage is not None:
            damage(run / "checkpoints" / "step_2")
        commands.append(QUICK + ["--max_train_steps", 4, "--output_dir", run, "--resume_from_checkpoint", "latest",
                                 *flags])
        runs.append(run)
    return dict(zip(REFUSED_RESUMES, zip(run_refused(commands, tmp), runs)))


@pytest.mark.parametrize("case", list(REFUSED_RESUMES))
def test_a_damaged_or_mismatched_checkpoint_is_one_line_naming_it(refused_resumes, case):
    result, run = refused_resumes[case]
    assert_one_line_error(result, "--resume_from_checkpoint", *REFUSED_RESUMES[case][2])
    assert "--labeled_split_file" not in result.stderr or case == "no labeled_split.json"
    if case == "a pickle that runs code":
        assert not (run / "pwned").exists()
        assert (run / "checkpoints" / "step_2" / "random_states_0.pkl").exists()  # nothing deleted


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("fixmatch-train: error:")]
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), result.stderr[-2000:]


def test_only_an_own_checkpoint_continues_the_run_in_output_dir(finished, tmp_path):
    """A checkpoint of another run starts a new run: refused where a run is, as any new run there."""
    from fixmatch_accel.checkpoint import check_output_dir, resolve_resume
    from fixmatch_accel.config import TrainConfig
    from fixmatch_accel.errors import UsageError

    own = str(finished / "checkpoints" / "step_2")
    other = str(shutil.copytree(finished, tmp_path / "other") / "checkpoints" / "step_2")
    assert check_output_dir(TrainConfig(output_dir=str(finished)), own) is False  # continues it
    with pytest.raises(UsageError, match="already holds a run .* and --resume_from_checkpoint .* is not one of its"):
        check_output_dir(TrainConfig(output_dir=str(finished)), other)
    assert check_output_dir(TrainConfig(output_dir=str(finished), overwrite_output_dir=True), other) is True
    assert check_output_dir(TrainConfig(output_dir=str(tmp_path / "new")), other) is False
    with pytest.raises(UsageError, match="--overwrite_output_dir with --resume_from_checkpoint .*drop one of the two"):
        check_output_dir(TrainConfig(output_dir=str(finished), overwrite_output_dir=True), own)
    with pytest.raises(UsageError, match="--output_dir .* is a file, not a folder"):
        check_output_dir(TrainConfig(output_dir=str(finished / "config.json")), None)
    with pytest.raises(UsageError, match="--resume_from_checkpoint .*checkpoints': "
                                         "not a checkpoint \\(no trainer_state"):
        resolve_resume(TrainConfig(output_dir=str(finished), resume_from_checkpoint=str(finished / "checkpoints")))
    (finished / "checkpoints" / "step_9").mkdir()  # an empty step folder is incomplete: never chosen
    assert resolve_resume(TrainConfig(output_dir=str(finished), resume_from_checkpoint="latest")) == own


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = run_train(QUICK + ["--max_train_steps", 20, "--checkpointing_steps", 1, "--learning_rate", "1e12",
                                "--output_dir", out])
    assert result.returncode == 1, result.stderr[-2000:]
    assert "are not finite at step" in result.stderr and "Last good checkpoint" in result.stderr
    saved = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").iterdir())
    assert saved, "at least the first, finite step is checkpointed"
    for step in saved:  # no checkpoint holds non-finite weights
        weights = load_file(out / "checkpoints" / f"step_{step}" / "model.safetensors")
        assert all(torch.isfinite(w.float()).all() for w in weights.values())


def test_one_nonfinite_step_is_skipped_and_counted_on_request(tmp_path):
    launcher = [sys.executable, str(ROOT / "tests" / "nan_at_step.py"), "3"]
    out = tmp_path / "skip"
    result = run_train(QUICK + ["--max_train_steps", 6, "--output_dir", out, "--skip_nonfinite_steps"],
                       launcher=launcher)
    check_ok(result)
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert 3 not in rows and sorted(rows) == [1, 2, 4, 5, 6]  # step 3 was skipped, not logged as NaN
    assert rows[2]["skipped_steps"] == 0 and rows[6]["skipped_steps"] == 1
    assert all(torch.isfinite(w.float()).all() for w in load_file(out / "model.safetensors").values())

    out = tmp_path / "stop"
    result = run_train(QUICK + ["--max_train_steps", 6, "--output_dir", out], launcher=launcher)
    assert result.returncode == 1 and "are not finite at step 3" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("streaming", [False, True])
def test_two_process_resume_is_exact(tmp_path, streaming):
    import shutil

    args = QUICK + ["--max_train_steps", 12, "--checkpointing_steps", 6] + (
        ["--streaming", "--max_train_samples", 200] if streaming else [])
    straight = tmp_path / "straight"
    check_ok(run_train(args + ["--output_dir", straight], launcher=accelerate_launch(), timeout=300))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    (resumed / "metrics.jsonl").write_text("")
    result = run_train(args + ["--output_dir", resumed, "--resume_from_checkpoint", resumed / "checkpoints" / "step_6"],
                       launcher=accelerate_launch(), timeout=300)
    check_ok(result)
    after = losses(resumed)
    assert sorted(after) == list(range(7, 13))
    assert after == pytest.approx({k: v for k, v in losses(straight).items() if k > 6}, rel=1e-6, abs=1e-7)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_streaming_resume_is_exact_across_passes(tmp_path):
    """A stream of 2 pieces x 30 rows, 2 workers, 6 batches a pass: resume mid-pass, run on through the next pass."""
    import shutil

    args = QUICK + ["--streaming", "--max_train_samples", 60, "--dataloader_num_workers", 2, "--max_train_steps", 14,
                    "--checkpointing_steps", 5]
    straight = tmp_path / "straight"
    check_ok(run_train(args + ["--output_dir", straight]))
    state = json.loads((straight / "checkpoints" / "step_5" / "trainer_state.json").read_text())
    assert state["positions"]["unlabeled"] == [0, 5]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    (resumed / "metrics.jsonl").write_text("")
    check_ok(run_train(args + ["--output_dir", resumed,
                               "--resume_from_checkpoint", resumed / "checkpoints" / "step_5"]))
    after = losses(resumed)
    assert sorted(after) == list(range(6, 15))
    assert after == pytest.approx({k: v for k, v in losses(straight).items() if k > 5}, rel=1e-6, abs=1e-7)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


@pytest.mark.parametrize("streaming", [False, True])
def test_cpu_augmentation_resume_is_exact_whatever_the_worker_count(tmp_path, streaming):
    """PIL augmentation is seeded per sample, so a run with 2 workers and its resume with none log the same losses.

    A stream is read in one piece per worker, so its order (not its augmentation) depends on the
    worker count: a stream resumes with the count it started with.
    """
    import shutil

    args = TINY_DIGITS + ["--logging_steps", 1, "--eval_steps", 0, "--augment_device", "cpu", "--max_train_steps", 8,
                          "--checkpointing_steps", 4, "--max_train_samples", 200]
    args += ["--streaming"] if streaming else []
    straight = tmp_path / "straight"
    check_ok(run_train(args + ["--output_dir", straight, "--dataloader_num_workers", 2]))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    (resumed / "metrics.jsonl").write_text("")
    check_ok(run_train(args + ["--output_dir", resumed, "--dataloader_num_workers", 2 if streaming else 0,
                               "--resume_from_checkpoint", resumed / "checkpoints" / "step_4"]))
    after = losses(resumed)
    assert sorted(after) == list(range(5, 9))
    assert after == pytest.approx({k: v for k, v in losses(straight).items() if k > 4}, rel=1e-6, abs=1e-7)


def test_sigterm_to_a_two_process_launch_checkpoints_through_torchrun(tmp_path):
    """A preempted multi-process job: SIGTERM reaches accelerate launch, torchrun forwards it to both processes."""
    out = tmp_path / "run"
    args = QUICK + ["--max_train_steps", 400, "--output_dir", out]
    proc = subprocess.Popen([*accelerate_launch(), str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 3, proc, timeout=240)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stopped_at = max(losses(out))
    # Both processes agreed on the step, wrote one checkpoint together and said so.
    assert stderr.count(f"stopped by SIGTERM after step {stopped_at}") == 2, stderr[-3000:]
    assert (out / "checkpoints" / f"step_{stopped_at}").is_dir()
    assert {p.name for p in (out / "checkpoints" / f"step_{stopped_at}").glob("generator_*")} == \
        {"generator_0.safetensors", "generator_1.safetensors"}
    result = run_train(QUICK + ["--max_train_steps", stopped_at + 2, "--output_dir", out,
                                "--resume_from_checkpoint", "latest"], launcher=accelerate_launch(), timeout=300)
    check_ok(result)
    assert max(losses(out)) == stopped_at + 2


@pytest.mark.parametrize("algorithm, extra", [("flexmatch", ["--threshold", "0.3", "--dist_align", "labeled"]),
                                              ("freematch", ["--stats_momentum", "0.5"]),
                                              ("softmatch", ["--stats_momentum", "0.5"]),
                                              ("adamatch", ["--stats_momentum", "0.5", "--threshold", "0.5"])])
def test_resume_is_exact_for_every_algorithm(tmp_path, algorithm, extra):
    """Resumed at step 4 of 8: the algorithm's state comes back from objective.safetensors, so every later
    step's loss and the final weights are the uninterrupted run's; another --algorithm is refused. The console
    line shows the algorithm's own figures: SoftMatch's mean weight instead of its mask (always 1), FreeMatch's
    fairness loss beside its mask."""
    args = QUICK + ["--max_train_steps", 8, "--checkpointing_steps", 4, "--algorithm", algorithm, *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_train(args + ["--output_dir", straight])
    check_ok(result)
    line = next(line for line in result.stdout.splitlines() if line.startswith("step 8/8 loss"))
    shown = dict(softmatch=(" weight ", " mask "), freematch=(" loss_f ", None)).get(algorithm, (" mask ", None))
    assert shown[0] in line and (shown[1] is None or shown[1] not in line), line
    checkpoint = straight / "checkpoints" / "step_4"
    assert (checkpoint / "objective.safetensors").is_file()
    check_ok(run_train(args + ["--output_dir", resumed, "--resume_from_checkpoint", checkpoint]))
    after = {step: loss for step, loss in losses(resumed).items() if step > 4}
    assert sorted(after) == [5, 6, 7, 8]
    assert after == pytest.approx({s: losses(straight)[s] for s in after}, rel=1e-6, abs=1e-7)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    other = parse_args(list(map(str, args + ["--output_dir", tmp_path / "other", "--resume_from_checkpoint", checkpoint,
                                              "--algorithm", "fixmatch"])))
    with pytest.raises(UsageError, match=f"cannot load it with --algorithm 'fixmatch': its run was trained with "
                                         f"--algorithm '{algorithm}'"):
        check_start(*other)


def test_a_checkpoint_of_the_earlier_layout_resumes_exactly(tmp_path):
    """tests/data/checkpoint_b75ee29: step 2 of a 4-step FlexMatch run (labeled alignment, no threshold warm-up, so
    its thresholds come from the saved per-example labels at once) written by commit b75ee29,
    before the checkpoint walked its components; metrics_after.jsonl holds that run's steps 3 and 4. Resumed by
    this code, the same steps log the same losses and thresholds."""
    data = ROOT / "tests" / "data" / "checkpoint_b75ee29"
    checkpoint = tmp_path / "old" / "checkpoints" / "step_2"
    shutil.copytree(data / "step_2", checkpoint)
    args = QUICK + ["--max_train_steps", 4, "--algorithm", "flexmatch", "--dist_align", "labeled", "--threshold",
                    0.12, "--no-flexmatch_warmup", "--output_dir", tmp_path / "resumed",
                    "--resume_from_checkpoint", checkpoint]
    check_ok(run_train(args))
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}
    then = [json.loads(line) for line in (data / "metrics_after.jsonl").read_text().splitlines()]
    assert sorted(rows) == [3, 4] == [r["step"] for r in then]
    for old in then:
        for key, value in old.items():
            assert rows[old["step"]][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (old["step"], key)
