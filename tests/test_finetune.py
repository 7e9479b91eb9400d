"""Fine-tuning a pretrained backbone: the model's preprocessing and gradient accumulation."""

import copy
import hashlib
import json
import sys

import pytest
import timm
import torch
from conftest import ROOT, run_train
from test_e2e import TINY_DIGITS, check_ok

from fixmatch_accel.algorithms.objective import Objective
from fixmatch_accel.augment import resize_batch
from fixmatch_accel.config import TrainConfig, resolve
from fixmatch_accel.errors import UsageError
from fixmatch_accel.runlog import Window
from fixmatch_accel.step import forward_loss, model_inputs

MODEL_DATA = dict(input_size=[3, 224, 224], interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3)


def resolved(cfg=None, native=32, **kw):
    cfg = cfg or TrainConfig(dataset_name="x")
    return resolve(cfg, device_type="cuda", dataset_image_size=lambda: native, num_train=50_000, streaming=False,
                   dataset_native_size=lambda: native, **kw)


def test_a_pretrained_model_sets_the_image_size_and_small_images_are_enlarged_on_the_device():
    r = resolved(model_data=MODEL_DATA)
    # views at the model's 224 px (crop padding an eighth of it); decoded and cached at the dataset's 32 px
    assert (r.image_size, r.load_size, r.interpolation, r.crop_padding, r.cache_decoded) == (224, 32, "bicubic",
                                                                                             28, True)
    r = resolved(TrainConfig(dataset_name="x", image_size=64), model_data=MODEL_DATA)
    assert (r.image_size, r.load_size) == (64, 32)  # --image_size overrides the model's size
    r = resolved(TrainConfig(dataset_name="x", augment_device="cpu"), model_data=MODEL_DATA)
    # PIL resizes in the workers, with the model's interpolation too
    assert (r.image_size, r.load_size, r.interpolation) == (224, 224, "bicubic")
    r = resolved(native=256, model_data=MODEL_DATA)
    assert (r.image_size, r.load_size, r.interpolation) == (224, 224, "bicubic")  # larger images: PIL shrinks them
    r = resolved()  # random init: the dataset's size, as before
    assert (r.image_size, r.load_size, r.interpolation) == (32, 32, "bilinear")


def test_resize_batch_enlarges_uint8_batches():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4).to(torch.uint8)
    assert resize_batch(x, 4) is x
    assert torch.equal(resize_batch(x, 8, "nearest"), x.repeat_interleave(2, -1).repeat_interleave(2, -2))
    up = resize_batch(x, 8, "bicubic")
    assert up.dtype == torch.uint8 and up.shape == (2, 3, 8, 8)
    flat = torch.full((1, 3, 5, 5), 77, dtype=torch.uint8)
    assert torch.equal(resize_batch(flat, 9, "bicubic"), torch.full((1, 3, 9, 9), 77, dtype=torch.uint8))


@pytest.fixture
def accumulating_accelerator():
    """An Accelerator of 2 accumulation steps in this process; accelerate's shared state is reset after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    yield Accelerator(cpu=True, gradient_accumulation_steps=2)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_gradient_accumulation_is_one_large_batch_for_a_model_without_batchnorm(accumulating_accelerator):
    """Two micro-batches through accelerate's accumulate: the gradient of one batch twice as large (a ViT has
    no BatchNorm, whose statistics would differ per micro-batch), and the same logged statistics."""
    accelerator = accumulating_accelerator
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, embed_dim=24, num_heads=2,
                              num_classes=4)
    micro = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, u_w, u_s = (torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g) for n in (4, 8, 8))
    y, u_y = torch.randint(0, 4, (4,), generator=g), torch.randint(0, 4, (8,), generator=g)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    with torch.no_grad():  # the median confidence as threshold: about half the pseudo-labels are used
        threshold = float(torch.softmax(model(model_inputs(u_w, mean, std, False)), -1).max(-1).values.median())
    objective = Objective("fixmatch", num_classes=4, threshold=threshold, temperature=1.0, lambda_u=1.0)
    kw = dict(objective=objective, mean=mean, std=std, channels_last=False)
    state, rows = objective.init_state(), torch.arange(8)

    loss, big_stats, _ = forward_loss(model, state, x, y, u_w, u_s, u_y, rows, **kw)
    loss.backward()
    big, small = Window(torch.device("cpu")), Window(torch.device("cpu"))
    big.add(big_stats, rows)
    for half in (slice(0, 2), slice(2, 4)):
        part = slice(half.start * 2, half.stop * 2)
        with accelerator.accumulate(micro):
            loss, stats, _ = forward_loss(micro, state, x[half], y[half], u_w[part], u_s[part], u_y[part],
                                          rows[part], **kw)
            accelerator.backward(loss)  # divided by the 2 accumulation steps
        small.add(stats, rows[part])
    assert accelerator.sync_gradients
    for (name, p), q in zip(model.named_parameters(), micro.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    a, b = big.summarise(accelerator), small.summarise(accelerator)
    assert 0 < a["mask_ratio"] < 1
    for k in ("loss", "loss_x", "loss_u", "mask_ratio", "pseudo_label_acc", "mask_per_class", "threshold_per_class"):
        assert b[k] == pytest.approx(a[k], rel=1e-5), k


def test_a_run_with_gradient_accumulation_counts_optimizer_steps(tmp_path):
    out = tmp_path / "run"
    check_ok(run_train(TINY_DIGITS + ["--augment_device", "accelerator", "--max_train_steps", 4,
                                      "--gradient_accumulation_steps", 3, "--output_dir", out]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    assert train[-1]["labeled_seen"] == 4 * 3 * 4 and train[-1]["unlabeled_seen"] == 4 * 3 * 8
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["global_batch"] == {"labeled": 12, "unlabeled": 24}
    trainer_state = json.loads((out / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert trainer_state["step"] == 3 and trainer_state["labeled_seen"] == 3 * 3 * 4


@pytest.mark.parametrize("augment_device", ["accelerator", "cpu"])
def test_images_reach_a_pretrained_model_at_its_input_size_in_both_augmentation_paths(tmp_path, augment_device):
    """resnet10t's pretrained_cfg: 176 px, ImageNet mean/std, bicubic. The 8 px digits are enlarged on the
    device (on-device augmentation) or by PIL in the loaders (CPU augmentation); the model sees 176 px only."""
    from safetensors.torch import save_file

    weights = tmp_path / "resnet10t.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=5).state_dict(), str(weights))
    args = [a for a in TINY_DIGITS if a not in ("--image_size", "8")]
    out, sizes = tmp_path / "run", tmp_path / "sizes.json"
    result = run_train(args + ["--model", "resnet10t", "--pretrained_file", weights, "--augment_device", augment_device,
                               "--per_device_train_batch_size", 2, "--mu", 1, "--max_train_steps", 2,
                               "--eval_steps", 0, "--checkpointing_steps", 0, "--max_eval_samples", 8,
                               "--output_dir", out],
                       launcher=[sys.executable, str(ROOT / "tests" / "input_sizes.py"), str(sizes)])
    check_ok(result)
    assert json.loads(sizes.read_text()) == [[176, 176]]
    cfg = json.loads((out / "config.json").read_text())
    enlarged = augment_device == "accelerator"
    assert cfg["pretrained_cfg"]["input_size"] == [3, 176, 176]
    assert cfg["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406] and cfg["pretrained_cfg"]["std"] == [0.229, 0.224,
                                                                                                         0.225]
    assert cfg["pretrained_cfg"]["interpolation"] == cfg["resolved"]["interpolation"] == "bicubic"  # both paths
    # the run records that it started from that file
    assert (cfg["settings"]["pretrained"], cfg["setting_sources"]["pretrained"]) == (True, "pretrained_file")
    assert cfg["pretrained_weights"] == dict(file=str(weights), sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    assert (cfg["resolved"]["load_size"], cfg["resolved"]["crop_padding"]) == ((8 if enlarged else 176), 22)
    assert cfg["resolved"]["normalization"] == "model"


def test_a_vit_is_built_for_the_image_size_and_its_pretrained_position_embeddings_resampled(tmp_path):
    from safetensors.torch import save_file

    from fixmatch_accel.models import create_model

    weights = tmp_path / "vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=5).state_dict(), str(weights))  # at 224 px
    model = create_model("vit_tiny_patch16_224", 3, pretrained_file=str(weights), image_size=32)
    assert model.pos_embed.shape == (1, 1 + (32 // 16) ** 2, 192)  # 2 x 2 patches and the class token
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert create_model("resnet10t", 3, image_size=32).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)  # no img_size
    # 30 px would leave 14 px of every side out of the one 16-px patch
    with pytest.raises(UsageError, match="--image_size 30 is not a multiple of vit_tiny_patch16_224's patch size 16: "
                                         "use 16 or 32"):
        create_model("vit_tiny_patch16_224", 3, pretrained_file=str(weights), image_size=30)


def test_a_pretrained_vit_run_with_fine_tuning_defaults_resumes_exactly(tmp_path):
    """AdamW, layer decay and warm-up (the pretrained defaults) through a checkpoint: the resumed steps log the
    uninterrupted run's losses, and the pretrained file is not needed again."""
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=5).state_dict(), str(weights))
    args = [a for a in TINY_DIGITS if a not in ("--image_size", "8")] + [
        "--model", "vit_tiny_patch16_224", "--pretrained_file", weights, "--image_size", 32,
        "--augment_device", "accelerator", "--max_train_steps", 6, "--logging_steps", 1, "--eval_steps", 0,
        "--checkpointing_steps", 3, "--warmup_steps", 2]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_train(args + ["--output_dir", straight])
    check_ok(result)
    assert "fine-tuning defaults: --optimizer adamw, --learning_rate 0.0005, --layer_decay 0.65" in result.stdout
    cfg = json.loads((straight / "config.json").read_text())
    assert cfg["setting_sources"]["optimizer"] == "pretrained" and cfg["settings"]["warmup_steps"] == 2
    # timm builds the run's model again from its folder: at 32 px, as trained, with the run's weights
    assert cfg["model_args"] == {"img_size": [32, 32]}
    from fixmatch_accel.predict import load_run_model

    images = torch.rand(2, 3, 32, 32)
    again = timm.create_model(f"local-dir:{straight}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(images), load_run_model(str(straight), torch.device("cpu")).model(images))
    weights.unlink()  # a resumed run's weights are its checkpoint's
    check_ok(run_train(args + ["--output_dir", resumed, "--resume_from_checkpoint",
                               straight / "checkpoints" / "step_3"]))

    def losses(out):
        return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    assert losses(resumed) == pytest.approx({s: v for s, v in losses(straight).items() if s > 3}, rel=1e-6)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
