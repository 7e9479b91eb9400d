import os
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
