"""The training step's core (augmentation + forward + loss) compiles to one graph: no host syncs,
no Python branching on tensors, no data-dependent shapes."""

import pytest
import torch

from fixmatch_accel import augment
from fixmatch_accel.algorithms.objective import Objective
from fixmatch_accel.models import create_model
from fixmatch_accel.step import StrongInputs, forward_loss, strong_forward_loss

FIXMATCH = Objective("fixmatch", num_classes=10, threshold=0.5, temperature=1.0, lambda_u=1.0)
KW = dict(mean=torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), std=torch.tensor([0.2, 0.2, 0.25]).view(1, 3, 1, 1),
          channels_last=False, objective=FIXMATCH)
STATE = FIXMATCH.init_state()


def batch(seed=0, b=4, mu=2, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)
    u = torch.randint(0, 256, (mu * b, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (b,), generator=g)
    u_y = torch.randint(0, 10, (mu * b,), generator=g)
    x = augment.weak_batch(x, pad=2, generator=g)
    u_w = augment.weak_batch(u, pad=2, generator=g)
    return x, y, u_w, u_y, g


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5", "paper"])
def test_augment_forward_loss_compiles_fullgraph(config):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("small_cnn", 10).train()
    x, y, u_w, u_y, g = batch()
    base = augment.weak_batch(u_w, pad=2, generator=g)  # stands in for the strong view's own flip + crop
    strong = StrongInputs(base, augment.sample_rand_augment_params(u_w.shape[0], config, generator=g,
                                                                  image_size=(16, 16)))

    rows = torch.arange(u_y.shape[0])

    def step(x, y, u_w, strong, u_y):
        loss, stats, _ = strong_forward_loss(model, STATE, x, y, u_w, strong, u_y, rows, strong_config=config, **KW)
        return loss, stats

    # A BatchNorm step in train mode changes running stats: compare eager and compiled from the same state.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager_loss, eager_stats = step(x, y, u_w, strong, u_y)
    eager_loss.backward()
    eager_grad = model.fc.weight.grad.clone()
    model.load_state_dict(state)
    model.zero_grad()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break fails
    loss, stats = compiled(x, y, u_w, strong, u_y)
    loss.backward()
    assert torch.allclose(loss, eager_loss, atol=1e-5)
    assert set(stats) == set(eager_stats)
    for k in stats:
        assert torch.allclose(stats[k], eager_stats[k], atol=1e-5), k
    assert torch.allclose(model.fc.weight.grad, eager_grad, atol=1e-5)


def test_forward_loss_channels_last_matches():
    torch.manual_seed(0)
    model = create_model("small_cnn", 10).eval()
    x, y, u_w, u_y, _ = batch(seed=1)
    rows = torch.arange(u_y.shape[0])
    loss, _, _ = forward_loss(model, STATE, x, y, u_w, u_w.flip(-1), u_y, rows, **KW)
    model = model.to(memory_format=torch.channels_last)
    loss_cl, _, _ = forward_loss(model, STATE, x, y, u_w, u_w.flip(-1), u_y, rows, **dict(KW, channels_last=True))
    assert torch.allclose(loss, loss_cl, atol=1e-5)
