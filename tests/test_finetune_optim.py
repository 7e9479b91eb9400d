"""Fine-tuning optimisation: --optimizer, --layer_decay (timm's groups), --warmup_steps, and the defaults of a
pretrained run. No training runs: optimizers are built on small models and stepped by hand."""

import math

import pytest
import timm
import timm.optim
import torch

from fixmatch_accel.checkpoint import reconcile_resume
from fixmatch_accel.config import parse_args, pretrained_defaults_note
from fixmatch_accel.errors import UsageError
from fixmatch_accel.models import create_model
from fixmatch_accel.optim import build_optimizer, cosine_lr_factor, lr_factor, param_groups, schedule_at

# schedule_at on an optimizer that has not stepped yet, as a resume does before its first step
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")

CPU = torch.device("cpu")
COS_7PI_32 = 0.773010453362737  # cos(7*pi/32): the cosine halfway through its span
COS_7PI_16 = 0.19509032201612833  # cos(7*pi/16): its end


def tiny_vit():
    """A two-block ViT with timm's layout (group_matcher, no_weight_decay), random init, no download."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3,
                             depth=2)


def config(*flags):
    return parse_args(["--dataset_name", "x", "--model", "vit_tiny_patch16_224", *map(str, flags)])[0]


def group_key(group):
    return group["lr_scale"], group["weight_decay"], frozenset(id(p) for p in group["params"])


def test_layer_decay_groups_are_timms():
    model = tiny_vit()
    cfg = config("--optimizer", "adamw", "--learning_rate", 1e-3, "--layer_decay", 0.65)
    optimizer, _ = build_optimizer(cfg, model, CPU)
    timms = timm.optim.param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=0.65,
                                                no_weight_decay_list=model.no_weight_decay())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {group_key(g) for g in optimizer.param_groups} == {group_key(g) for g in timms}
    # stem, two blocks, head: four layers at 0.65**3 ... 1, each with and without weight decay
    assert sorted({g["lr_scale"] for g in timms}) == pytest.approx([0.65 ** 3, 0.65 ** 2, 0.65, 1.0])
    # every trainable parameter once
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("layer_decay", [None, 0.65])
def test_no_weight_decay_on_norms_biases_and_tokens(layer_decay):
    model = tiny_vit()
    flags = ["--optimizer", "adamw", "--weight_decay", 0.05] + (["--layer_decay", layer_decay] if layer_decay else [])
    optimizer, _ = build_optimizer(config(*flags), model, CPU)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        exempt = p.ndim <= 1 or name in ("pos_embed", "cls_token")  # biases, LayerNorms, timm's no_weight_decay()
        assert decay_of[id(p)] == (0.0 if exempt else 0.05), name
    assert decay_of[id(model.blocks[0].norm1.weight)] == 0.0 and decay_of[id(model.head.bias)] == 0.0
    assert decay_of[id(model.blocks[0].attn.qkv.weight)] == 0.05


def test_each_group_trains_at_its_scale_of_the_warmed_up_rate():
    """LambdaLR scales each group's initial lr, so the layer scale has to be in it (timm's own schedulers
    multiply by lr_scale instead)."""
    model = tiny_vit()
    optimizer, scheduler = build_optimizer(config("--optimizer", "adamw", "--learning_rate", 1e-3,
                                                  "--layer_decay", 0.5, "--warmup_steps", 10,
                                                  "--max_train_steps", 100), model, CPU)
    assert optimizer.param_groups[0]["lr_scale"] == 1.0  # the head first: get_last_lr()[0] (logged) is the peak's
    for k, factor in [(0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0), (55, COS_7PI_32), (100, COS_7PI_16)]:
        schedule_at(scheduler, k)  # the rate of step k + 1 (k steps done)
        for g in optimizer.param_groups:
            assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"] * factor, rel=1e-12), (k, g["lr_scale"])
        assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 * factor, rel=1e-12)
    assert {g["lr_scale"] for g in optimizer.param_groups} == {0.125, 0.25, 0.5, 1.0}

    # And the update uses it: AdamW's first step moves a parameter without weight decay by lr * g / (|g| + eps).
    schedule_at(scheduler, 0)
    stem_bias, head_bias = model.patch_embed.proj.bias, model.head.bias
    with torch.no_grad():  # from 0, so float32 holds the step exactly enough
        stem_bias.zero_(), head_bias.zero_()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert stem_bias.abs().max().item() == pytest.approx(1e-3 * 0.1 * 0.125, rel=1e-5)
    assert head_bias.abs().max().item() == pytest.approx(1e-3 * 0.1 * 1.0, rel=1e-5)


def test_stepping_the_schedule_and_schedule_at_agree():
    """A resumed run sets the rate with schedule_at; an uninterrupted one steps the scheduler."""
    model = tiny_vit()
    cfg = config("--optimizer", "adamw", "--layer_decay", 0.7, "--warmup_steps", 3, "--max_train_steps", 12)
    optimizer, scheduler = build_optimizer(cfg, model, CPU)
    stepped = []
    for _ in range(12):
        stepped.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    _, resumed = build_optimizer(cfg, model, CPU)
    for k in (0, 2, 3, 7, 11):
        schedule_at(resumed, k)
        assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx(stepped[k], rel=1e-12)


def test_warmup_factor_at_chosen_steps():
    # W = 4, K = 20: (k + 1) / 4 while k < 4, then the cosine over the remaining 16 steps.
    assert [lr_factor(k, 20, 4) for k in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(12, 20, 4) == pytest.approx(COS_7PI_32, rel=1e-12)  # 8 of 16 cosine steps
    assert lr_factor(20, 20, 4) == pytest.approx(COS_7PI_16, rel=1e-12)
    assert lr_factor(0, 20, 1) == lr_factor(1, 20, 1) == 1.0  # W = 1: the first step at the peak; the cosine from k = 1
    assert lr_factor(2, 20, 1) == pytest.approx(math.cos(7 * math.pi / (16 * 19)), rel=1e-12)
    # W = 0 is the paper's schedule exactly
    assert all(lr_factor(k, 1000, 0) == cosine_lr_factor(k, 1000) for k in (0, 1, 17, 500, 999, 1000))


def test_default_sgd_is_the_papers_optimizer_as_before():
    model = create_model("wrn28_2", 10)
    cfg, _ = parse_args(["--dataset_name", "x", "--max_train_steps", "1000"])
    optimizer, scheduler = build_optimizer(cfg, model, CPU)
    # what build_optimizer built before --optimizer existed
    before = torch.optim.SGD(param_groups(model, 5e-4), lr=0.03, momentum=0.9, nesterov=True, fused=None)
    assert type(optimizer) is torch.optim.SGD
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == \
           [[id(p) for p in g["params"]] for g in before.param_groups]
    strip = [{k: v for k, v in g.items() if k not in ("params", "initial_lr")} for g in optimizer.param_groups]
    assert strip == [{k: v for k, v in g.items() if k != "params"} for g in before.param_groups]
    assert all(scheduler.lr_lambdas[0](k) == cosine_lr_factor(k, 1000) for k in (0, 1, 333, 1000))
    # --layer_decay 1 is off: the same optimizer
    optimizer, _ = build_optimizer(config("--layer_decay", 1.0), create_model("wrn28_2", 10), CPU)
    assert len(optimizer.param_groups) == 2 and "lr_scale" not in optimizer.param_groups[0]


def test_sgd_with_layer_decay_is_timms_nesterov_sgd():
    optimizer, _ = build_optimizer(config("--layer_decay", 0.5, "--momentum", 0.8), tiny_vit(), CPU)
    assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 8
    assert all(g["nesterov"] and g["momentum"] == 0.8 for g in optimizer.param_groups)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([0.03 * 0.5 ** i for i in (3, 2, 1, 0)])


def test_layer_decay_on_a_model_without_layer_groups_is_refused():
    with pytest.raises(UsageError, match="--layer_decay 0.5: --model small_cnn has no layer groups"):
        build_optimizer(parse_args(["--model", "small_cnn", "--layer_decay", "0.5"])[0],
                        create_model("small_cnn", 3), CPU)


def test_a_pretrained_run_gets_the_fine_tuning_defaults():
    cfg, sources = parse_args(["--dataset_name", "x", "--model", "vit_small_patch16_224", "--pretrained"])
    assert (cfg.optimizer, cfg.learning_rate, cfg.layer_decay, cfg.warmup_steps) == ("adamw", 5e-4, 0.65, 2**20 // 40)
    assert {sources[k] for k in ("optimizer", "learning_rate", "layer_decay", "warmup_steps")} == {"pretrained"}
    assert (cfg.weight_decay, sources["weight_decay"]) == (5e-4, "default")  # USB's is the paper's
    assert pretrained_defaults_note(cfg, sources) == (
        "note: pretrained weights, so fine-tuning defaults: --optimizer adamw, --learning_rate 0.0005, "
        "--layer_decay 0.65, --warmup_steps 26214 (a flag, preset or config file overrides them)")
    # a local weights file is a pretrained run too; the warm-up follows the final --max_train_steps;
    # a ResNet gets no layer decay
    cfg, sources = parse_args(["--dataset_name", "x", "--model", "resnet50", "--pretrained_file", "w.safetensors",
                               "--max_train_steps", "400"])
    assert (cfg.optimizer, cfg.warmup_steps, cfg.layer_decay, sources["layer_decay"]) == ("adamw", 10, None, "default")


def test_flags_and_files_override_the_pretrained_defaults(tmp_path):
    base = ["--dataset_name", "x", "--model", "vit_base_patch16_224", "--pretrained"]
    cfg, sources = parse_args(base + ["--learning_rate", "1e-4", "--warmup_steps", "0"])
    assert (cfg.learning_rate, sources["learning_rate"], cfg.warmup_steps, sources["warmup_steps"]) == (
        1e-4, "flag", 0, "flag")
    assert sources["optimizer"] == sources["layer_decay"] == "pretrained"
    # SGD asked for keeps the paper's SGD rate, not the AdamW one
    cfg, sources = parse_args(base + ["--optimizer", "sgd"])
    assert (cfg.optimizer, cfg.learning_rate, sources["learning_rate"]) == ("sgd", 0.03, "default")
    assert "--optimizer" not in pretrained_defaults_note(cfg, sources)
    path = tmp_path / "run.yaml"
    path.write_text("layer_decay: 0.8\n")
    cfg, sources = parse_args(base + ["--config", str(path)])
    assert (cfg.layer_decay, sources["layer_decay"]) == (0.8, f"file:{path}")


def test_a_random_init_run_keeps_the_papers_settings():
    cfg, sources = parse_args(["--dataset_name", "x", "--model", "vit_small_patch16_224"])
    assert (cfg.optimizer, cfg.learning_rate, cfg.layer_decay, cfg.warmup_steps) == ("sgd", 0.03, None, 0)
    assert {sources[k] for k in ("optimizer", "learning_rate", "layer_decay", "warmup_steps")} == {"default"}
    assert pretrained_defaults_note(cfg, sources) is None


@pytest.mark.parametrize("argv, message", [
    (["--layer_decay", "0"], "--layer_decay must be in \\(0, 1\\] \\(1: off\\), got 0.0"),
    (["--layer_decay", "1.5"], "--layer_decay must be in \\(0, 1\\]"),
    (["--layer_decay", "nan"], "--layer_decay must be a finite number"),
    (["--warmup_steps", "-1"], "--warmup_steps must be non-negative, got -1"),
    (["--warmup_steps", "10", "--max_train_steps", "10"],
     "--warmup_steps must be smaller than --max_train_steps \\(10\\), got 10"),
])
def test_invalid_values_name_the_flag(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(["--dataset_name", "x", *argv])


def test_unknown_optimizer_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--optimizer", "adam"])
    assert "--optimizer: invalid choice: 'adam'" in capsys.readouterr().err


def test_a_resumed_run_keeps_its_optimizer():
    """The optimizer state and parameter groups of a checkpoint fit only the optimizer that wrote them."""
    saved = dict(optimizer="sgd", layer_decay=None, warmup_steps=0, learning_rate=0.03)
    cfg, sources = parse_args(["--dataset_name", "x", "--optimizer", "adamw", "--layer_decay", "0.7"])
    cfg, sources, notes = reconcile_resume(cfg, sources, "ckpt", saved, 5)
    assert (cfg.optimizer, cfg.layer_decay) == ("sgd", None)
    assert "note: --optimizer adamw does not apply: a resumed run keeps sgd" in notes[0]
    # the fine-tuning defaults were not asked for: the checkpoint's settings continue, silently
    cfg, sources = parse_args(["--dataset_name", "x", "--model", "vit_small_patch16_224", "--pretrained"])
    cfg, sources, notes = reconcile_resume(cfg, sources, "ckpt", dict(saved, warmup_steps=7), 5)
    assert (cfg.optimizer, cfg.learning_rate, cfg.warmup_steps, notes) == ("sgd", 0.03, 7, [])
    assert sources["warmup_steps"] == "checkpoint"
