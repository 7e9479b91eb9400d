"""--preset and --config: precedence, recorded sources, checked keys and values; the STL-10 WRN-37-2."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fixmatch_accel.cli import main
from fixmatch_accel.config import parse_args, preset_names
from fixmatch_accel.errors import UsageError
from fixmatch_accel.models import create_model

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_precedence_default_preset_file_flag(tmp_path):
    path = write(tmp_path, "weight_decay: 1e-3\nnum_labeled: 250\nmu: 5\n")  # 1e-3 loads as a string in YAML
    cfg, sources = parse_args(["--preset", "cifar10-40", "--config", path, "--mu", "3"])
    assert (cfg.dataset_name, sources["dataset_name"]) == ("uoft-cs/cifar10", "preset:cifar10-40")
    assert (cfg.weight_decay, sources["weight_decay"]) == (0.001, f"file:{path}")  # file over preset
    assert (cfg.num_labeled, sources["num_labeled"]) == (250, f"file:{path}")
    assert (cfg.mu, sources["mu"]) == (3, "flag")  # flag over file
    assert (cfg.seed, sources["seed"]) == (0, "default")
    assert "demo" not in sources.values()
    # Recorded in config.json through the settings.
    assert cfg.to_dict()["preset"] == "cifar10-40" and cfg.to_dict()["config"] == path


def test_a_file_may_name_the_preset_and_a_flag_overrides_it(tmp_path):
    path = write(tmp_path, "preset: svhn-40\nseed: 3\n")
    cfg, sources = parse_args(["--config", path])
    assert (cfg.dataset_name, cfg.dataset_config_name, cfg.num_labeled) == ("ufldl-stanford/svhn", "cropped_digits", 40)
    assert sources["preset"] == f"file:{path}" and sources["model"] == "preset:svhn-40" and cfg.seed == 3
    cfg, sources = parse_args(["--config", path, "--preset", "cifar100-400"])
    assert cfg.model == "wrn28_8" and cfg.seed == 3 and sources["preset"] == "flag"


def test_the_demo_applies_only_when_no_layer_names_a_dataset(tmp_path):
    cfg, sources = parse_args(["--preset", "cifar10-250"])
    assert cfg.model == "wrn28_2" and cfg.max_train_steps == 2**20 and "demo" not in sources.values()
    no_dataset = write(tmp_path, "lambda_u: 0\n", "a.yaml")
    cfg, sources = parse_args(["--config", no_dataset])
    assert (cfg.dataset_name == "digits" and sources["model"] == "demo"
            and (cfg.lambda_u, sources["lambda_u"]) == (0.0, f"file:{no_dataset}"))
    with_dataset = write(tmp_path, "train_dir: some/folder\n", "b.yaml")
    cfg, sources = parse_args(["--config", with_dataset])
    assert cfg.dataset_name is None and cfg.model == "wrn28_2" and "demo" not in sources.values()


@pytest.mark.parametrize("text, message", [
    ("lerning_rate: 0.1\n", "unknown setting 'lerning_rate' \\(did you mean 'learning_rate'\\?\\)"),
    ("--mu: 3\n", "unknown setting '--mu' \\(did you mean 'mu'\\?\\)"),
    ("config: other.yaml\n", "a config file cannot name another one"),
    ("mu: [1, 2]\n", "mu: expected an integer, got \\[1, 2\\]"),
    ("max_train_steps: 5.5\n", "max_train_steps: expected an integer, got 5.5"),
    ("threshold: high\n", "threshold: expected a number, got 'high'"),
    ("hflip: sometimes\n", "hflip: expected true or false"),
    ("mixed_precision: no\n", "mixed_precision: expected a str, got False \\(quote it"),
    ("augment_device: gpu\n", "augment_device: expected one of cpu, accelerator, got 'gpu'"),
    ("model: null\n", "model: expected a value of type str, got None"),
    ("mu: [1, 2\n", "not valid YAML \\(line 2: "),
    ("seed: 1\nmu: 3\nseed: 2\n", "not valid YAML \\(line 3: 'seed' is set twice\\)"),
    ("- mu\n- 3\n", "expected a mapping of `setting: value` lines, got a list"),
])
def test_bad_files_are_one_line_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UsageError, match=f"^--config {re.escape(path)}: {message}") as info:
        parse_args(["--config", path])
    assert "\n" not in str(info.value)


def test_values_convert_like_the_command_line(tmp_path):
    path = write(tmp_path, "learning_rate: 5e-4\nmax_train_steps: '12'\ndataset_config_name: 2014\n"
                 "image_size: null\nhflip: false\nmixed_precision: 'no'\ndataset_name: x\n")
    cfg, _ = parse_args(["--config", path])
    assert cfg.learning_rate == 5e-4 and isinstance(cfg.learning_rate, float)
    assert (cfg.max_train_steps, cfg.dataset_config_name, cfg.image_size) == (12, "2014", None)
    assert cfg.hflip is False and cfg.mixed_precision == "no"
    # empty: sets nothing
    assert parse_args(["--config", write(tmp_path, "", "empty.yaml")])[0].dataset_name == "digits"


def test_missing_or_unreadable_file_and_bad_values_say_where(tmp_path):
    with pytest.raises(UsageError, match=r"^--config .*nope\.yaml: no such file$"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(UsageError, match=r"^--config .*: cannot read it"):
        parse_args(["--config", str(tmp_path)])
    path = write(tmp_path, "dataset_name: x\nmu: 0\n")
    with pytest.raises(UsageError, match=f"^--mu must be at least 1, got 0 \\(from --config {re.escape(path)}\\)$"):
        parse_args(["--config", path])
    with pytest.raises(UsageError, match="^--mu must be at least 1, got 0$"):  # a flag: no suffix
        parse_args(["--config", path, "--mu", "0"])


def test_every_preset_is_the_papers_setting():
    names = [n for n in preset_names() if not n.startswith("ft-")]  # fine-tuning presets: below
    assert len(names) == 10 and not any(n.startswith("_") for n in preset_names())
    family = {  # (hub id, model, weight decay) per dataset, from the paper's appendix
        "cifar10": ("uoft-cs/cifar10", "wrn28_2", 5e-4),
        "cifar100": ("uoft-cs/cifar100", "wrn28_8", 1e-3),
        "svhn": ("ufldl-stanford/svhn", "wrn28_2", 5e-4),
        "stl10": ("jxie/stl10", "wrn37_2", 5e-4),
    }
    for name in names:
        cfg, sources = parse_args(["--preset", name])
        dataset, labels = name.rsplit("-", 1)
        assert (cfg.dataset_name, cfg.model, cfg.weight_decay) == family[dataset], name
        assert cfg.num_labeled == int(labels) and cfg.output_dir == f"outputs/{name}" and cfg.preset == name
        assert (cfg.per_device_train_batch_size, cfg.mu, cfg.learning_rate, cfg.threshold) == (64, 7, 0.03, 0.95)
        assert (cfg.max_train_steps, cfg.ema_decay, cfg.strong_augment, cfg.crop_padding) == (
            2**20, 0.999, "paper", None)
        assert cfg.hflip == (dataset != "svhn"), name  # the paper's code mirrors no digits
        assert sources["model"] == f"preset:{name}" and "demo" not in sources.values()
    cfg, _ = parse_args(["--preset", "cifar100-2500"])
    assert cfg.label_column_name == "fine_label"
    cfg, _ = parse_args(["--preset", "stl10-1000"])  # the paper's STL-10: unlabeled loss over train+unlabeled
    assert (cfg.unlabeled_split, cfg.eval_split, cfg.train_split) == ("train+unlabeled", "test", "train")
    assert {n.rsplit("-", 1)[0] for n in names} == set(family)


def test_preset_list_and_unknown_preset(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--preset", "list"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in preset_names()) and "jxie/stl10, 1000 labels, wrn37_2" in out
    assert main(["--preset", "cifar10-41"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fixmatch-train: error: --preset 'cifar10-41': unknown; choose from cifar10-40, ")
    assert "stl10-1000" in err and "\n" not in err


def test_a_wheel_ships_the_presets(tmp_path):
    # A non-editable install reads presets.yaml from the wheel, not from this checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(["cp", "-r", str(ROOT / "fixmatch_accel"), str(src)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("fixmatch_accel/presets.yaml") == (ROOT / "fixmatch_accel" / "presets.yaml").read_bytes()


def _wrn_params(widths, blocks_per_stage, num_classes):
    """Parameters of our WRN, counted by hand: bias-free convs, BN weight+bias, a 1x1 shortcut per stage."""
    total, a = 3 * 16 * 9, 16  # stem conv
    for b in widths:
        total += 2 * a + 9 * a * b + 2 * b + 9 * b * b + a * b  # first block: bn1, conv1, bn2, conv2, shortcut
        total += (blocks_per_stage - 1) * (2 * b + 9 * b * b) * 2
        a = b
    return total + 2 * a + a * num_classes + num_classes  # final BN, fc


def test_wrn37_2_is_the_papers_stl10_network():
    # Paper code (google-research/fixmatch libml/models.py `ResNet`, filters=32, repeat=4) with 4
    # stages, as USB's wrn_var_37_2 (semilearn/nets/wrn/wrn_var.py): widths 32-64-128-256, first
    # stage at stride 2. USB's copy has conv biases as well (+4,336); ours, like wrn28_*, has none.
    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert _wrn_params([32, 64, 128], 4, 10) == count(create_model("wrn28_2", 10)) == 1_467_610  # the derivation
    model = create_model("wrn37_2", 10).eval()
    assert count(model) == _wrn_params([32, 64, 128, 256], 4, 10) == 5_929_434
    seen = {}
    model.bn.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)
    assert seen["shape"] == (1, 256, 6, 6)  # 96 / 2^4: stride 2 in each of the 4 stages


def test_fine_tuning_presets_are_usbs_settings_on_public_timm_weights():
    import timm

    names = [n for n in preset_names() if n.startswith("ft-")]
    assert sorted(names) == ["ft-cifar100-200-resnet50", "ft-cifar100-200-vits16", "ft-cifar100-400-resnet50",
                             "ft-cifar100-400-vits16"]
    for name in names:
        cfg, sources = parse_args(["--preset", name])
        labels, model = name.split("-")[2:]
        assert cfg.pretrained and cfg.num_labeled == int(labels) and cfg.output_dir == f"outputs/{name}"
        assert (cfg.dataset_name, cfg.label_column_name) == ("uoft-cs/cifar100", "fine_label")
        assert (cfg.per_device_train_batch_size, cfg.mu, cfg.optimizer, cfg.learning_rate, cfg.weight_decay) == (
            8, 1, "adamw", 5e-4, 5e-4)
        assert (cfg.max_train_steps, cfg.warmup_steps, cfg.ema_decay) == (204800, 5120, 0.0)
        assert cfg.layer_decay == (0.5 if model == "vits16" else None)
        assert timm.models.get_pretrained_cfg(cfg.model) is not None, cfg.model  # public weights timm knows
        assert sources["optimizer"] == f"preset:{name}"
