"""Model construction, the EMA, the schedule and optimizer groups."""

import math

import pytest
import torch

from fixmatch_accel.ema import ModelEMA, ema_decay_at
from fixmatch_accel.errors import UsageError
from fixmatch_accel.models import BN_MOMENTUM, create_model
from fixmatch_accel.optim import cosine_lr_factor, param_groups


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_wrn_parameter_counts_match_the_paper_code():
    # The counts of the paper's reference implementations (1.47M and 23.4M).
    assert n_params(create_model("wrn28_2", 10)) == 1_467_610
    assert n_params(create_model("wrn28_8", 100)) == 23_401_012


def test_wrn_layout():
    model = create_model("wrn28_2", 10)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bn.momentum == BN_MOMENTUM == 0.001 for bn in bns)
    acts = [m for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.1 for a in acts)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_small_cnn_and_timm_model():
    assert create_model("small_cnn", 7)(torch.randn(3, 3, 16, 16)).shape == (3, 7)
    model = create_model("resnet18", 4)
    assert type(model).__module__.startswith("timm.") and model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_unknown_model_is_a_usage_error():
    with pytest.raises(UsageError, match="--model 'wrn99_9' is neither a built-in model"):
        create_model("wrn99_9", 10)


def test_cosine_schedule_endpoints():
    assert cosine_lr_factor(0, 1000) == 1.0
    assert cosine_lr_factor(1000, 1000) == pytest.approx(math.cos(7 * math.pi / 16))
    assert cosine_lr_factor(500, 1000) == pytest.approx(math.cos(7 * math.pi / 32))


def test_no_weight_decay_on_biases_and_batchnorm():
    model = create_model("wrn28_2", 10)
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    bn_and_bias = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    bn_and_bias.add(id(model.fc.bias))
    assert {id(p) for p in no_decay["params"]} == bn_and_bias
    assert id(model.fc.weight) in {id(p) for p in decay["params"]}


def test_ema_warmup_and_update():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10**6, 0.999) == 0.999
    live = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(live, decay=0.999)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        live[0].weight.add_(1.0)
        live[1].running_mean.fill_(2.0)
        live[1].num_batches_tracked.fill_(5)
    ema.update(live, step=0)  # decay 0.1: 90% of the way to the live weights
    assert torch.allclose(ema.module[0].weight, before + 0.9, atol=1e-6)
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), 1.8))
    assert ema.module[1].num_batches_tracked.item() == 5
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    assert live[0].weight.requires_grad  # the live model is untouched
