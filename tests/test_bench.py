"""bench/throughput.py runs end to end and ends with the JSON line the issue asks for."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_json_last_line_has_the_speedups():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "throughput.py"), "--model", "small_cnn", "--batch_size", "2",
         "--mu", "2", "--steps", "1", "--warmup", "0", "--augment_samples", "16", "--augment_rounds", "2",
         "--workers", "0", "--step_rounds", "2", "--json"],
        capture_output=True, text=True, timeout=300, check=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("augment_speedup_per_core", "step_speedup", "augment_reference_per_core",
                "augment_project_per_core_cpu", "reference_steps_per_s", "project_steps_per_s", "step_speedup_eager"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert len(result["augment_speedup_per_round"]) == 2
    assert isinstance(result["project_bf16"], bool)  # whether this CPU ran the project's step in bf16
    assert "augmentation, one CPU core" in out.stdout and "end to end, project" in out.stdout
