"""--pretrained and --pretrained_file: weights loaded through timm, a new classifier, one-line errors; offline."""

import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT, run_train, write_image_folder
from safetensors.torch import load_file, save_file

from fixmatch_accel.config import BUILTIN_MODEL_NAMES, parse_args
from fixmatch_accel.errors import UsageError
from fixmatch_accel.models import BUILTIN_MODELS, create_model

HEAD = ("fc.weight", "fc.bias")  # resnet10t's classifier, and the built-in models'


@pytest.fixture(scope="module")
def source():
    """The 'pretrained' model: a resnet10t with 7 classes (its own random weights stand in for trained ones)."""
    torch.manual_seed(11)
    model = timm.create_model("resnet10t", num_classes=7)
    with torch.no_grad():  # BatchNorm's affine and running statistics away from their init values too
        for t in model.state_dict().values():
            if t.is_floating_point() and t.ndim == 1:
                t.copy_(torch.rand_like(t) + 0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def save(state_dict, path: Path):
    if path.suffix == ".safetensors":
        save_file(state_dict, path)
    else:
        torch.save(state_dict, path)
    return path


def assert_loaded_with_new_head(model, state_dict, num_classes):
    loaded = model.state_dict()
    assert set(loaded) == set(state_dict)
    for k in loaded:
        if k not in HEAD:
            assert torch.equal(loaded[k], state_dict[k]), k
    assert loaded["fc.weight"].shape[0] == loaded["fc.bias"].shape[0] == num_classes == model.fc.out_features
    if loaded["fc.weight"].shape == state_dict["fc.weight"].shape:  # re-initialised even where it would fit
        assert not torch.equal(loaded["fc.weight"], state_dict["fc.weight"])
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, num_classes)


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(UsageError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("num_classes", [3, 7])
@pytest.mark.parametrize("name", ["pretrained.safetensors", "pretrained.pth", "pretrained.bin"])
def test_a_weights_file_loads_all_but_the_classifier(tmp_path, source, name, num_classes):
    path = save(source, tmp_path / name)
    model = create_model("resnet10t", num_classes, pretrained_file=str(path))
    assert_loaded_with_new_head(model, source, num_classes)
    assert "state_dict" not in model.pretrained_cfg  # no second copy of the weights kept
    # The new head is drawn from the seeded generator: a run's seed decides it.
    heads = []
    for _ in range(2):
        torch.manual_seed(0)
        heads.append(create_model("resnet10t", num_classes, pretrained_file=str(path)).fc.weight)
    assert torch.equal(*heads)


def test_safetensors_is_known_by_its_content_too(tmp_path, source):
    path = tmp_path / "weights.bin"
    save_file(source, path)
    assert_loaded_with_new_head(create_model("resnet10t", 3, pretrained_file=str(path)), source, 3)


def test_a_training_checkpoint_and_a_headless_file_load(tmp_path, source):
    # timm's train.py checkpoint: weights under state_dict (EMA preferred), DDP prefixes, its args Namespace.
    checkpoint = dict(epoch=3, arch="resnet10t", args=argparse.Namespace(lr=0.1),
                      state_dict={f"module.{k}": torch.zeros_like(v) for k, v in source.items()},
                      state_dict_ema={f"module.{k}": v for k, v in source.items()})
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(checkpoint, path)
    assert_loaded_with_new_head(create_model("resnet10t", 3, pretrained_file=str(path)), source, 3)

    # A backbone saved without its classifier (num_classes=0): everything else loads, the head is new.
    backbone = {k: v for k, v in source.items() if k not in HEAD}
    model = create_model("resnet10t", 3, pretrained_file=str(save(backbone, tmp_path / "backbone.safetensors")))
    assert_loaded_with_new_head(model, source, 3)


def test_a_built_in_model_starts_from_a_runs_weights(tmp_path):
    torch.manual_seed(1)
    run_weights = create_model("small_cnn", 10).state_dict()
    path = save(run_weights, tmp_path / "model.safetensors")
    model = create_model("small_cnn", 4, pretrained_file=str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, run_weights[k]) if k not in HEAD else v.shape[0] == 4, k
    message = one_line_error(create_model, "wrn28_2", 4, pretrained_file=str(path))
    assert message.startswith(f"--pretrained_file {str(path)!r} does not hold weights for --model wrn28_2 (")

    # --pretrained alone: there is nothing to download for a built-in model.
    message = one_line_error(create_model, "small_cnn", 4, pretrained=True)
    assert "built-in --model small_cnn has no pretrained weights" in message and "--pretrained_file" in message
    assert BUILTIN_MODEL_NAMES == tuple(BUILTIN_MODELS)  # config's copy of the names, for validate


def test_weights_of_another_architecture_are_a_one_line_error(tmp_path, source):
    other = save(timm.create_model("resnet18", num_classes=7).state_dict(), tmp_path / "resnet18.safetensors")
    message = one_line_error(create_model, "resnet10t", 3, pretrained_file=str(other))
    assert message.startswith(f"--pretrained_file {str(other)!r} does not hold weights for --model resnet10t (")
    assert "missing tensor(s), e.g. conv1.0.weight" in message and "unexpected tensor(s), e.g. conv1.weight" in message

    # Same names, other shapes (a narrower stem): each mismatch counted, the first one shown.
    narrow = save(timm.create_model("resnet10t", num_classes=7, stem_width=16).state_dict(), tmp_path / "n.pth")
    message = one_line_error(create_model, "resnet10t", 3, pretrained_file=str(narrow))
    assert "of another shape, e.g. conv1.0.weight [12, 3, 3, 3] in the file, [24, 3, 3, 3] in the model" in message

    # The reverse: resnet10t's weights offered to resnet18 (timm alone would load them non-strictly, silently).
    mine = save(source, tmp_path / "resnet10t.safetensors")
    message = one_line_error(create_model, "resnet18", 3, pretrained_file=str(mine))
    assert "does not hold weights for --model resnet18" in message


@pytest.mark.parametrize("name, content", [
    ("truncated.safetensors", "truncated"),
    ("text.pth", b"these are not weights\n"),
    ("random.bin", bytes(range(256)) * 4),
    ("empty.pth", b""),
    ("list.pth", "list"),
])
def test_a_file_that_is_not_weights_is_a_one_line_error(tmp_path, source, name, content):
    path = tmp_path / name
    if content == "truncated":
        save_file(source, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif content == "list":
        torch.save([torch.zeros(3)], path)
    else:
        path.write_bytes(content)
    message = one_line_error(create_model, "resnet10t", 3, pretrained_file=str(path))
    assert message.startswith(f"--pretrained_file {str(path)!r} ") and "torch.save(model.state_dict(), PATH)" in message


class _Planted:
    """Unpickling this runs a command: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_pickle_with_code_is_refused_and_never_run(tmp_path, source, how):
    marker = tmp_path / "code_ran"
    path = tmp_path / "weights.pth"
    if how == "torch.save":
        torch.save(dict(source, extra=_Planted(marker)), path)
    else:
        path.write_bytes(pickle.dumps(_Planted(marker), protocol=2))
    message = one_line_error(create_model, "resnet10t", 3, pretrained_file=str(path))
    assert not marker.exists()
    assert message.startswith(f"--pretrained_file {str(path)!r} ")
    # torch's weights-only unpickler names the function the pickle calls (posix.system, nt.system on Windows)
    assert "holds pickled code or objects (" in message and "system)" in message
    assert "which are never unpickled here" in message


def test_config_checks_the_flags_before_any_work(tmp_path):
    from fixmatch_accel.preflight import check_start

    missing = parse_args(["--dataset_name", "digits", "--model", "resnet10t", "--output_dir", str(tmp_path / "run"),
                          "--pretrained_file", str(tmp_path / "nowhere.safetensors")])
    with pytest.raises(UsageError, match=r"^--pretrained_file '.*nowhere\.safetensors': no such file$"):
        check_start(*missing)  # before any data is read (a resumed run does not need the file)
    with pytest.raises(UsageError, match="the built-in --model wrn28_2 has no pretrained weights"):
        parse_args(["--dataset_name", "digits", "--pretrained"])
    path = save({"w": torch.zeros(1)}, tmp_path / "w.safetensors")
    cfg, sources = parse_args(["--dataset_name", "digits", "--model", "small_cnn", "--pretrained_file", str(path)])
    assert cfg.pretrained_file == str(path) and sources["pretrained_file"] == "flag"
    # a weights file makes a pretrained run, and config.json's settings say so
    assert (cfg.pretrained, sources["pretrained"]) == (True, "pretrained_file")
    cfg, _ = parse_args(["--dataset_name", "digits", "--model", "resnet10t", "--pretrained"])
    assert cfg.pretrained is True and cfg.pretrained_file is None


HUB_ID = "timm/resnet10t.c3_in1k"  # where timm fetches resnet10t's default pretrained weights


def test_pretrained_reads_timms_weights_from_the_hf_cache_offline(tmp_path):
    """--pretrained with HF_HUB_OFFLINE=1 and the weights in the cache (laid out as huggingface_hub does)."""
    assert timm.models.get_pretrained_cfg("resnet10t").hf_hub_id == HUB_ID
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    torch.manual_seed(2)
    weights = save(timm.create_model("resnet10t").state_dict(), repo / "snapshots" / revision / "model.safetensors")
    code = ("import sys, torch; from safetensors.torch import load_file; "
            "from fixmatch_accel.models import create_model; "
            "m = create_model('resnet10t', 3, pretrained=True); f = load_file(sys.argv[1]); "
            "assert all(torch.equal(v, f[k]) for k, v in m.state_dict().items() if not k.startswith('fc.')); "
            "assert m.fc.weight.shape == (3, 512); print('loaded')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code, str(weights)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "loaded", result.stderr[-3000:]


def test_pretrained_offline_without_cached_weights_is_one_line_naming_the_fixes(tmp_path):
    empty = tmp_path / "empty_hf"
    result = run_train(["--dataset_name", "digits", "--model", "resnet10t", "--pretrained", "--image_size", "8",
                        "--num_labeled", "20", "--max_train_steps", "1", "--dataloader_num_workers", "0",
                        "--output_dir", tmp_path / "run"],
                       env=dict(HF_HUB_OFFLINE="1", HF_HOME=str(empty), HF_HUB_CACHE=str(empty / "hub")))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fixmatch-train: error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0])
    assert errors[0].startswith(f"fixmatch-train: error: --pretrained: timm's weights for --model resnet10t "
                                f"({HUB_ID}) are not in the Hugging Face cache {empty / 'hub'} ")
    assert "HF_HUB_OFFLINE" in errors[0] and "--pretrained_file PATH" in errors[0]


@pytest.mark.slow
def test_a_run_from_a_pretrained_file_then_predict_without_it(tmp_path, source):
    write_image_folder(tmp_path / "train", per_class=10)
    write_image_folder(tmp_path / "val", per_class=3, seed=1)
    pretrained = save(source, tmp_path / "pretrained.safetensors")
    out = tmp_path / "run"
    result = run_train(["--train_dir", tmp_path / "train", "--validation_dir", tmp_path / "val",
                        "--model", "resnet10t", "--pretrained_file", pretrained, "--num_labeled", "6",
                        "--per_device_train_batch_size", "3", "--mu", "2", "--max_train_steps", "2",
                        "--logging_steps", "1", "--eval_steps", "0", "--checkpointing_steps", "0",
                        "--dataloader_num_workers", "0", "--output_dir", out])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["pretrained_file"] == str(pretrained) and config["num_classes"] == 3

    # Two small steps from the file's weights stay near them: the BatchNorm biases (zeros at random init, around 1
    # in the file) within 10%, the last stage's convolutions (random init: 140% away) within 30%.
    trained = load_file(out / "model.safetensors")
    biases = [k for k in source if k.endswith(".bias") and k not in HEAD]
    assert len(biases) == 14
    for k in biases + ["layer4.0.conv1.weight", "layer4.0.conv2.weight"]:
        assert (trained[k] - source[k]).norm() < (0.1 if k in biases else 0.3) * source[k].norm(), k
    assert trained["fc.weight"].shape == (3, 512)

    # The finished run needs the pretrained file no more: predict builds the architecture bare and loads the run.
    pretrained.unlink()
    from fixmatch_accel.predict import load_run_model

    run = load_run_model(str(out), torch.device("cpu"))
    assert run.label_names == ["cat", "dog", "frog"]
    with torch.no_grad():
        assert run.model(torch.randn(2, 3, run.size, run.size)).shape == (2, 3)
