"""Several machines through accelerate's own multi-node launch (torchrun underneath), proven on one host.

Two "machines" are two `accelerate launch` commands with the shipped launch_configs/multi_node.yaml,
--machine_rank 0 and 1 and --main_process_ip 127.0.0.1, one gloo process each on the CPU.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from conftest import ROOT, free_port
from safetensors.torch import load_file
from test_e2e import TINY_DIGITS, check_ok, read_metrics

MULTI_NODE = ROOT / "launch_configs" / "multi_node.yaml"
TRAIN = ROOT / "train.py"
# One thread per process: two "machines" share this host's cores (torchrun sets it only for several local workers).
# No GPU: on a host with one, both "machines" would take cuda:0, and NCCL refuses two ranks on one device.
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def machine(rank: int, port: int, flags=()):
    """One machine's launch: the 2 x 8 GPU config scaled to one process per machine (num_processes counts both
    machines' processes), float32 on the CPU (the trainer picks gloo on the CPU when there is no GPU)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTI_NODE),
            "--num_processes", "2", "--mixed_precision", "no", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), *map(str, flags)]


def kill_machine(proc) -> None:
    """SIGKILL a launcher and every process under it, as when its machine loses power.

    torchrun starts its workers in sessions of their own: killing the launcher's process group
    would leave them running, still training with the other machine.
    """
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(proc.pid)
        for p in [*parent.children(recursive=True), parent]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    proc.wait()


@contextlib.contextmanager
def two_machines(logs: Path, script, args, extra=((), ()), flags=()):
    """Start machines 0 and 1 on `script args` (+ each one's `extra`; `flags` for the launcher); whatever is left
    is killed on exit."""
    port, procs = free_port(), []
    try:
        for rank in (0, 1):
            # Output to files: two pipes read one after the other could fill and block a machine.
            with open(f"{logs}.{rank}.out", "w") as out, open(f"{logs}.{rank}.err", "w") as err:
                cmd = machine(rank, port, flags) + [str(script), *map(str, args), *map(str, extra[rank])]
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=err, start_new_session=True))
        yield procs
    finally:
        for proc in procs:
            kill_machine(proc)


def output(logs: Path, rank: int, returncode: int):
    return SimpleNamespace(returncode=returncode, stdout=Path(f"{logs}.{rank}.out").read_text(),
                           stderr=Path(f"{logs}.{rank}.err").read_text())


def run_two_machines(logs: Path, args, script=TRAIN, extra=((), ()), timeout=300):
    """Both machines to the end; (machine 0's result, machine 1's result) like subprocess.run's."""
    deadline = time.monotonic() + timeout
    with two_machines(logs, script, args, extra) as procs:
        codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    return [output(logs, rank, code) for rank, code in enumerate(codes)]


# On-device augmentation: its explicit generators make resume exact. Threshold 0 pseudo-labels every image.
ARGS = TINY_DIGITS + ["--augment_device", "accelerator", "--threshold", "0", "--eval_steps", "0",
                      "--checkpointing_steps", "2", "--max_train_steps", "4"]


def test_two_machines_train_evaluate_and_resume_on_two_machines(tmp_path):
    """One run over two machines, then step 2's checkpoint resumed on two machines reaches the same step 4."""
    straight = tmp_path / "straight"
    results = run_two_machines(tmp_path / "straight_log", ARGS + ["--output_dir", straight])
    for result in results:
        check_ok(result)
    assert "final EMA model" in results[0].stdout
    cfg = json.loads((straight / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["num_machines"] == 2
    assert cfg["global_batch"] == {"labeled": 8, "unlabeled": 16}
    train_rows, eval_rows = read_metrics(straight)
    assert [r["step"] for r in train_rows] == [2, 4]  # one writer: each row once
    for r in train_rows:
        # Global figures: a 2-step window holds both machines' unlabeled images (2 steps x 8 x 2 machines).
        assert r["mask_ratio"] == 1.0 and sum(r["mask_per_class"]) == 2 * 8 * 2
        assert r["labeled_seen"] == r["step"] * 8
    assert [r["step"] for r in eval_rows] == [4]
    assert json.loads((straight / "eval_results.json").read_text())["num_eval"] == 64  # gathered once
    # A checkpoint holds each process's RNG states (on a disk both machines share); no .tmp is left.
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_2", "step_4"]
    saved = {p.name for p in (straight / "checkpoints" / "step_2").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "generator_0.safetensors", "generator_1.safetensors",
            "trainer_state.json", "ema.safetensors"} <= saved

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    (resumed / "metrics.jsonl").write_text("")
    results = run_two_machines(tmp_path / "resumed_log", ARGS + [
        "--output_dir", resumed, "--resume_from_checkpoint", resumed / "checkpoints" / "step_2"])
    for result in results:
        check_ok(result)
    assert "resumed from" in results[0].stdout and "at step 2" in results[0].stdout
    again, again_eval = read_metrics(resumed)
    assert [r["step"] for r in again] == [4]
    assert again[0]["loss"] == pytest.approx(train_rows[-1]["loss"], rel=1e-6, abs=1e-7)
    assert again_eval[-1]["top1"] == eval_rows[-1]["top1"]
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_only_machine_zero_writes_the_run_files(tmp_path):
    """Machine 1 writes to a folder of its own, as on machines without a shared disk: it stays empty."""
    disks = tmp_path / "machine0", tmp_path / "machine1"
    results = run_two_machines(tmp_path / "logs",
                               TINY_DIGITS + ["--max_train_steps", "2", "--checkpointing_steps", "0"],
                               extra=[["--output_dir", disk] for disk in disks])
    for result in results:
        check_ok(result)
    assert {"config.json", "labeled_split.json", "metrics.jsonl", "model.safetensors",
            "eval_results.json"} <= {p.name for p in disks[0].iterdir()}
    assert not disks[1].exists() or list(disks[1].rglob("*")) == []
    assert "final EMA model" in results[1].stdout  # machine 1 did run to the end


def test_a_stream_is_split_exactly_across_two_machines(tmp_path):
    """The data issue's case, launched as two machines: 3 parquet shards, 2 workers per process."""
    from test_streaming import write_sharded_parquet

    parquet = write_sharded_parquet(tmp_path / "ds")
    ids = tmp_path / "ids"
    results = run_two_machines(tmp_path / "logs", [
        ids, "--dataset_name", parquet, "--streaming", "--image_size", "8", "--num_labeled", "30",
        "--per_device_train_batch_size", "2", "--mu", "2", "--dataloader_num_workers", "2"],
        script=ROOT / "tests" / "loader_ids.py")
    for result in results:
        check_ok(result)
    ranks = [json.loads(Path(f"{ids}.{r}").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    for name in ("labeled", "unlabeled"):
        a, b = ranks[0][name], ranks[1][name]
        assert len(a) == len(b) and len(set(a)) == len(a) and not set(a) & set(b), name  # disjoint
    # Complete: 4 pieces of 50 rows, one per worker, each dropping its last partial batch of 4.
    covered = set(ranks[0]["unlabeled"]) | set(ranks[1]["unlabeled"])
    assert len(covered) == 4 * 48 and covered <= set(range(200))


@pytest.mark.parametrize("how, timeout, message", [
    # A crash or power loss closes the dead machine's connections: the other fails at its next collective
    # (gloo says "Connection closed by peer" or "Connection reset by peer", whichever it meets first).
    ("killed", 1800, "by peer"),
    # A frozen or unreachable machine closes nothing: --ddp_timeout bounds the wait. It must exceed every wait
    # of a healthy run, such as machine 1 waiting while machine 0 prepares the data (a healthy run passed at 2 s).
    ("frozen", 10, "timed out"),
])
def test_when_one_machine_dies_the_other_ends(tmp_path, how, timeout, message):
    out = tmp_path / "run"
    args = TINY_DIGITS + ["--augment_device", "accelerator", "--max_train_steps", "1000000", "--logging_steps", "1",
                          "--eval_steps", "0", "--checkpointing_steps", "0", "--ddp_timeout", timeout,
                          "--output_dir", out]
    metrics = out / "metrics.jsonl"
    with two_machines(tmp_path / "logs", TRAIN, args) as (machine0, machine1):
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text()):  # a row: both machines are training
            if machine0.poll() is not None or machine1.poll() is not None:
                pytest.fail("a machine ended before training began:\n" + "\n".join(
                    output(tmp_path / "logs", rank, None).stderr[-2000:] for rank in (0, 1)))
            assert time.monotonic() < deadline, "training never began"
            time.sleep(0.1)
        stopped = time.monotonic()
        if how == "killed":
            kill_machine(machine1)
        else:
            victim = psutil.Process(machine1.pid)
            for p in [victim, *victim.children(recursive=True)]:
                p.suspend()
        code = machine0.wait(timeout=120)
        took = time.monotonic() - stopped
    result = output(tmp_path / "logs", 0, code)
    assert result.returncode != 0 and message in result.stderr.lower(), result.stderr[-3000:]
    assert took < min(timeout, 30) + 30, took
    if how == "frozen":
        assert took >= timeout, took  # it was --ddp_timeout that ended the wait


def test_ddp_timeout_must_be_positive():
    from fixmatch_accel.config import parse_args
    from fixmatch_accel.errors import UsageError

    assert parse_args(["--dataset_name", "digits"])[0].ddp_timeout == 1800
    with pytest.raises(UsageError, match="--ddp_timeout must be at least 1, got 0"):
        parse_args(["--dataset_name", "digits", "--ddp_timeout", "0"])


def test_a_killed_process_on_one_machine_is_restarted_on_both(tmp_path):
    """`--max_restarts 2` on both machines: a trainer SIGKILLed on machine 1 is restarted by its agent; machine 0's
    trainer fails at its next collective and is restarted by its own; both meet again (a store prefix per restart)
    and continue from the newest complete checkpoint, ending with the weights of the run never killed."""
    args = ARGS[:-2] + ["--max_train_steps", "24", "--logging_steps", "1", "--ddp_timeout", "60",
                        "--resume_from_checkpoint", "auto"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    for result in run_two_machines(tmp_path / "straight_log", args + ["--output_dir", straight]):
        check_ok(result)
    with two_machines(tmp_path / "logs", TRAIN, args + ["--output_dir", out],
                      flags=["--max_restarts", 2, "--monitor_interval", 0.2]) as (machine0, machine1):
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "step_2").is_dir():  # training with a checkpoint to go back to
            assert machine0.poll() is None and machine1.poll() is None, "a machine ended before the kill"
            assert time.monotonic() < deadline, "training never began"
            time.sleep(0.05)
        trainer = next(p for p in psutil.Process(machine1.pid).children() if "train.py" in " ".join(p.cmdline()))
        trainer.kill()
        killed = time.monotonic()
        codes = [m.wait(timeout=240) for m in (machine0, machine1)]
        took = time.monotonic() - killed
    results = [output(tmp_path / "logs", rank, code) for rank, code in enumerate(codes)]
    for result in results:
        check_ok(result)
    assert "restart 1 of 2: resumed from step" in results[0].stdout, results[0].stdout[-2000:]
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert took < 120, took
