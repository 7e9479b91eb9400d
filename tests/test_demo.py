"""The README's demo: `python train.py` with no flag, against the same run on labels alone."""

import json
from concurrent.futures import ThreadPoolExecutor

from conftest import run_train


def top1(out):
    return json.loads((out / "eval_results.json").read_text())["top1"]


def test_demo_fixmatch_beats_labels_only_by_five_points(tmp_path):
    # The two runs side by side, one thread each: half the wall time on two cores.
    one_thread = dict(OMP_NUM_THREADS="1")
    with ThreadPoolExecutor(2) as pool:
        fixmatch, labels_only = pool.map(lambda args: run_train(args, env=one_thread),
                                         [["--output_dir", tmp_path / "fixmatch"],
                                          ["--output_dir", tmp_path / "labels_only", "--lambda_u", "0"]])
    assert fixmatch.returncode == 0, fixmatch.stderr[-3000:]
    assert "final EMA model: top-1" in fixmatch.stdout
    assert labels_only.returncode == 0, labels_only.stderr[-3000:]
    cfg = json.loads((tmp_path / "fixmatch" / "config.json").read_text())
    assert cfg["settings"]["dataset_name"] == "digits" and cfg["resolved"]["num_labeled"] == 50
    gap = top1(tmp_path / "fixmatch") - top1(tmp_path / "labels_only")
    assert gap >= 5.0, f"FixMatch {top1(tmp_path / 'fixmatch'):.2f} vs labels only {top1(tmp_path / 'labels_only'):.2f}"
