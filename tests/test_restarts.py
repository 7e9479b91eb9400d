"""What a scheduler does to a run: a stop signal to every process, workers SIGKILLed under `accelerate launch
--max_restarts`, a requeued job started again with `--resume_from_checkpoint auto`."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROOT, accelerate_launch, run_train
from safetensors.torch import load_file
from test_e2e import TINY_DIGITS, check_ok

# PIL augmentation in DataLoader workers (the CPU default): the processes a group's signal also reaches.
PIL = TINY_DIGITS + ["--logging_steps", 1, "--eval_steps", 0, "--checkpointing_steps", 0, "--augment_device", "cpu"]


def losses(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def same_weights(a: Path, b: Path) -> bool:
    """Bit for bit the same final model."""
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def start(cmd, log: Path):
    """A command in a session of its own (as a scheduler starts a job), its output to files."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=out, stderr=err, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))


def stderr(log: Path) -> str:
    return Path(f"{log}.err").read_text()


def wait_for(predicate, proc, log: Path, timeout=240):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, stderr(log)[-3000:]
        assert time.monotonic() < deadline, "timed out: " + stderr(log)[-3000:]
        time.sleep(0.05)


def tree(proc):
    """The launcher and every process under it (torchrun's workers run in sessions of their own)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(proc.pid)
        return [parent, *parent.children(recursive=True)]
    return []


def kill_tree(proc):
    for p in tree(proc):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


def logged(out: Path, at_least: int):
    return lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= at_least


def test_sigterm_to_the_process_group_of_a_run_with_dataloader_workers(tmp_path):
    """scancel's SIGTERM reaches the trainer and its PIL workers at once: the workers leave the stop to the trainer,
    which checkpoints the step and exits 0; the resumed run ends with the weights of a run never stopped."""
    args = PIL + ["--dataloader_num_workers", 2, "--max_train_steps", 24]
    straight, out = tmp_path / "straight", tmp_path / "stopped"
    check_ok(run_train(args + ["--output_dir", straight]))
    proc = start([sys.executable, ROOT / "train.py", *args, "--output_dir", out], tmp_path / "log")
    try:
        wait_for(logged(out, 3), proc, tmp_path / "log")
        assert len(tree(proc)) >= 3  # the trainer and its two workers share the group
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, stderr(tmp_path / "log")[-3000:]
    finally:
        kill_tree(proc)
    err = stderr(tmp_path / "log")
    stopped_at = max(losses(out))
    assert f"fixmatch-train: stopped by SIGTERM after step {stopped_at}" in err and "Traceback" not in err, err[-3000:]
    assert (out / "checkpoints" / f"step_{stopped_at}").is_dir() and stopped_at < 24
    check_ok(run_train(args + ["--output_dir", out, "--resume_from_checkpoint", "latest"]))
    assert same_weights(straight, out)


@pytest.fixture(scope="module")
def two_process_straight(tmp_path_factory):
    """The two-process PIL run of TWO, never stopped: the run every stopped or killed one must end as."""
    out = tmp_path_factory.mktemp("straight") / "run"
    check_ok(run_train(TWO + ["--output_dir", out], launcher=accelerate_launch(), timeout=300))
    return out


TWO = PIL + ["--dataloader_num_workers", 1, "--max_train_steps", 30]


def test_sigterm_to_every_process_of_a_two_process_launch(tmp_path, two_process_straight):
    """SIGTERM to the launcher, both trainers and their workers at once (a scheduler stopping a job's processes):
    both trainers checkpoint the same step and exit 0; the launcher exits 143 (see the README); the resume ends
    with the weights of the run never stopped."""
    out, log = tmp_path / "stopped", tmp_path / "log"
    proc = start([*accelerate_launch(), ROOT / "train.py", *TWO, "--output_dir", out], log)
    try:
        wait_for(logged(out, 3), proc, log)
        processes = tree(proc)
        assert len(processes) >= 5  # launcher, two trainers, a worker each
        for p in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        kill_tree(proc)
    err = stderr(log)
    stopped_at = max(losses(out))
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert err.count(f"fixmatch-train: stopped by SIGTERM after step {stopped_at}") == 2, err[-3000:]
    assert "DataLoader worker" not in err and "error:" not in err, err[-3000:]
    assert (out / "checkpoints" / f"step_{stopped_at}" / "complete_1.json").is_file()
    check_ok(run_train(TWO + ["--output_dir", out, "--resume_from_checkpoint", "latest"], launcher=accelerate_launch(),
                       timeout=300))
    assert same_weights(two_process_straight, out)


def trainers(launcher):
    """The launcher's training processes (torchrun's workers, one per rank)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return [p for p in psutil.Process(launcher.pid).children() if "train.py" in " ".join(p.cmdline())]
    return []


def complete_steps(out: Path):
    from fixmatch_accel.checkpoint import checkpoint_steps

    return checkpoint_steps(str(out))


@pytest.mark.parametrize("every, third", [(["--checkpointing_steps", 5], "rank"),
                                          (["--checkpointing_minutes", 0.01], "worker")], ids=["steps", "minutes"])
def test_killed_processes_are_restarted_and_the_run_ends_as_if_never_killed(tmp_path, two_process_straight, every,
                                                                             third):
    """`accelerate launch --max_restarts 3`: a rank SIGKILLed before the first checkpoint, another at a random moment
    after one, then a third after a newer one: a rank, or (the minutes run) a rank's DataLoader worker, as the OOM
    killer would. torchrun's agent restarts both ranks each time; `auto` starts afresh (the start set aside) or
    continues from the newest complete checkpoint; the launcher exits 0 and the final weights are bit for bit those
    of the run never killed."""
    import random

    rng = random.Random(0)
    out, log = tmp_path / "run", tmp_path / "log"
    # TWO's own --checkpointing_steps 0 gives way to a later flag: steps, or minutes alone.
    args = TWO + [*every, "--output_dir", out, "--resume_from_checkpoint", "auto"]
    proc = start([*accelerate_launch(), "--max_restarts", 3, "--monitor_interval", 0.2, ROOT / "train.py", *args], log)
    try:
        killed = []

        def kill(victim):
            killed.append(victim.pid)
            victim.kill()

        # 1. Before the first checkpoint: the run has started writing (metrics.jsonl) but saved nothing.
        wait_for(lambda: (out / "metrics.jsonl").exists() and len(trainers(proc)) == 2, proc, log)
        assert not complete_steps(out)
        kill(rng.choice(trainers(proc)))
        # 2. A rank at a random moment after a checkpoint of the restarted run (perhaps inside the next one).
        wait_for(lambda: complete_steps(out) and len(trainers(proc)) == 2 and killed[-1] not in
                 [p.pid for p in trainers(proc)], proc, log)
        time.sleep(rng.uniform(0, 1))
        kill(rng.choice(trainers(proc)))
        # 3. A rank or a rank's DataLoader worker, after a newer checkpoint.
        newest = complete_steps(out)[-1]
        wait_for(lambda: complete_steps(out)[-1] > newest and len(trainers(proc)) == 2, proc, log)
        time.sleep(rng.uniform(0, 1))
        rank = rng.choice(trainers(proc))
        kill(rank if third == "rank" else rng.choice(rank.children()))
        code = proc.wait(timeout=300)
    finally:
        kill_tree(proc)
    err, printed = stderr(log), Path(f"{log}.out").read_text()
    assert code == 0, err[-4000:]
    assert same_weights(two_process_straight, out)
    restarts = json.loads((out / "checkpoints" / "step_30" / "trainer_state.json").read_text())["restarts"]
    assert [r["restart"] for r in restarts] == [1, 2, 3] and all(r["max_restarts"] == 3 for r in restarts)
    assert restarts[0]["resumed_from"] is None  # nothing complete to continue: started again, the start set aside
    assert len(list(out.glob("replaced_*"))) == 1
    assert 0 < restarts[1]["resumed_from"] < restarts[2]["resumed_from"] < 30
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["restart"] for r in rows if "restart" in r] == [1, 2, 3]
    for r in restarts[1:]:
        assert f"restart {r['restart']} of 3: resumed from step {r['resumed_from']} (lost {r['lost_steps']} step" \
            in printed, printed[-3000:]


def test_auto_passes_over_incomplete_checkpoints_and_starts_again_after_a_bare_start(tmp_path):
    """What `auto` chooses from the files a killed run left (no training: the choice is made before it)."""
    from fixmatch_accel.config import parse_args
    from fixmatch_accel.errors import UsageError
    from fixmatch_accel.preflight import check_start

    out = tmp_path / "run"
    step = out / "checkpoints" / "step_4"
    step.mkdir(parents=True)
    for name in ("metrics.jsonl", "config.json"):
        (out / name).write_text("{}\n")
    (step / "labeled_split.json").write_text("{}")
    (step / "trainer_state.json").write_text(json.dumps({"step": 4, "layout": {"processes": 2}}))
    (step / "complete_0.json").write_text("{}")  # process 1 never finished its part
    flags = ["--dataset_name", "digits", "--output_dir", str(out), "--resume_from_checkpoint", "auto"]
    start = check_start(*parse_args(flags))
    assert start.resume_path is None and start.replacing  # only a start: set aside, not refused
    assert any("incomplete checkpoint(s): step_4 (no complete_1.json)" in n for n in start.notes)
    assert any("no complete checkpoint" in n and "set aside" in n for n in start.notes)
    (step / "complete_1.json").write_text("{}")
    start = check_start(*parse_args(flags))
    assert start.resume_path == str(step) and not start.replacing
    (step / "complete_1.json").unlink()
    (out / "model.safetensors").write_bytes(b"")  # a finished run is more than a start: refused as before
    with pytest.raises(UsageError, match="already holds a run"):
        check_start(*parse_args(flags))
