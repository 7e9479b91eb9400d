import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"


def run_train(args, cwd=None, env=None, timeout=600, launcher=None):
    """Run train.py in a fresh process (accelerate's state is per process) and return the result."""
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *map(str, args)]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch():
    """`accelerate launch` of two gloo processes on this host's CPUs, on a port of their own (tests run side by
    side under pytest-xdist: accelerate's default port would be taken)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "launch_configs" / "multi_cpu.yaml"), "--main_process_port", str(free_port())]


def run_refused(commands, workdir: Path):
    """Several train.py command lines that should each stop with an input error, run in one fresh process
    (tests/refused_commands.py: ~5 s of imports once, not per command); a result per command."""
    import json
    from types import SimpleNamespace

    cases = workdir / "refused_commands.json"
    cases.write_text(json.dumps([list(map(str, args)) for args in commands]))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "refused_commands.py"), str(cases)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [SimpleNamespace(**r) for r in json.loads((workdir / "refused_commands.json.out.json").read_text())]


def write_image_folder(root: Path, classes=("cat", "dog", "frog"), per_class=8, size=12, seed=0):
    """A tiny image folder; each class has its own mean colour so a model can learn it."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), np.uint8) + np.uint8(40 + 80 * c)
            noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            Image.fromarray(base + noise).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def cifar10_path():
    if not CIFAR10.is_dir():
        pytest.skip("../shared/data/cifar10 is absent")
    return CIFAR10
