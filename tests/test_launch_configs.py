"""The accelerate launch configs in launch_configs/ load with accelerate's own config classes."""

import importlib.util
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from conftest import ROOT

CONFIGS = sorted((ROOT / "launch_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_with_accelerate(path: Path):
    config = load_config_from_file(str(path))  # unknown keys or values raise
    assert isinstance(config, ClusterConfig) and config.num_processes >= 1


def test_tpu_config_names_a_function_train_py_has():
    config = load_config_from_file(str(ROOT / "launch_configs" / "tpu.yaml"))
    assert config.distributed_type == "XLA" and config.mixed_precision == "bf16"
    # accelerate's TPU launcher imports train.py as a module and calls this function in each process.
    spec = importlib.util.spec_from_file_location("train_as_module", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, config.main_training_function))


def test_train_py_main_raises_the_failure_status(monkeypatch, capsys):
    """accelerate's TPU launcher calls train.py's main() and ignores its return value."""
    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["train.py", "--mu", "0"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2 and "--mu must be at least 1" in capsys.readouterr().err
