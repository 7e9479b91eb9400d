"""The linters CI runs: ruff and the import-linter layer contracts in pyproject.toml."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(tool: str, *args, cwd=ROOT, env=None):
    exe = shutil.which(tool, path=str(BIN)) or shutil.which(tool)
    assert exe, f"{tool} is not installed: pip install -e '.[test]'"
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_ruff_check_passes():
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_hold():
    result = _run("lint-imports", "--no-cache")
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout + result.stderr


def test_import_contracts_catch_a_model_that_imports_the_loop(tmp_path):
    """A copy of the package whose models module imports the trainer breaks the layers contract."""
    shutil.copytree(ROOT / "fixmatch_accel", tmp_path / "fixmatch_accel",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    models = tmp_path / "fixmatch_accel" / "models.py"
    models.write_text(models.read_text() + "\nfrom . import trainer  # noqa\n")
    result = _run("lint-imports", "--no-cache", cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert result.returncode != 0 and "fixmatch_accel.models -> fixmatch_accel.trainer" in result.stdout, result.stdout
