"""The FixMatch loss against hand-computed values."""

import math

import pytest
import torch

from fixmatch_accel.algorithms.fixmatch import fixmatch_loss

LOGITS_X = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
TARGETS_X = torch.tensor([0, 1])
# Weak-view confidences: sigmoid(3) = 0.9526 (class 0), 0.5 (class 0), sigmoid(4) = 0.9820 (class 1).
LOGITS_U_W = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 4.0]])
LOGITS_U_S = torch.tensor([[1.0, 0.0], [5.0, 5.0], [1.0, 1.0]])
TARGETS_U = torch.tensor([0, 1, 0])

LOSS_X = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
# Samples 0 and 2 pass 0.95; their strong-view CE against pseudo-labels 0 and 1, averaged over all 3.
LOSS_U = (math.log(1 + math.exp(-1)) + math.log(2)) / 3


def run(**kw):
    args = dict(threshold=0.95, temperature=1.0, lambda_u=1.0, targets_u=TARGETS_U)
    args.update(kw)
    return fixmatch_loss(LOGITS_X, TARGETS_X, LOGITS_U_W, LOGITS_U_S, **args)


def test_hand_computed_case():
    loss, stats = run(lambda_u=2.0)
    assert stats["loss_x"].item() == pytest.approx(LOSS_X, abs=1e-6)
    assert stats["loss_u"].item() == pytest.approx(LOSS_U, abs=1e-6)
    assert loss.item() == pytest.approx(LOSS_X + 2.0 * LOSS_U, abs=1e-6)
    assert stats["mask_ratio"].item() == pytest.approx(2 / 3)
    assert stats["mask_count"].item() == 2
    # Masked: sample 0 (pseudo 0, true 0) right, sample 2 (pseudo 1, true 0) wrong.
    assert stats["pseudo_label_acc"].item() == pytest.approx(0.5)
    assert stats["pseudo_label_correct"].item() == 1
    assert stats["mask_per_class"].tolist() == [1.0, 1.0]
    for v in stats.values():
        assert not v.requires_grad


def test_threshold_is_inclusive():
    # Sample 1 has confidence exactly 0.5: a threshold of 0.5 admits all three.
    _, stats = run(threshold=0.5)
    assert stats["mask_count"].item() == 3
    _, stats = run(threshold=0.5 + 1e-6)
    assert stats["mask_count"].item() == 2


def test_temperature_sharpens_or_flattens():
    # T=2 halves the logits: sigmoid(1.5)=0.82 and sigmoid(2)=0.88 both fall below 0.95.
    _, stats = run(temperature=2.0)
    assert stats["mask_count"].item() == 0
    # T=0.5 doubles them: sigmoid(6) and sigmoid(8) pass; sample 1 stays at 0.5.
    _, stats = run(temperature=0.5)
    assert stats["mask_count"].item() == 2


def test_none_masked_gives_zero_and_no_nan():
    loss, stats = run(threshold=1.0)
    assert stats["mask_count"].item() == 0
    assert stats["loss_u"].item() == 0.0
    assert stats["pseudo_label_acc"].item() == 0.0
    assert loss.item() == pytest.approx(LOSS_X, abs=1e-6)


def test_all_masked_averages_over_all():
    _, stats = run(threshold=0.0)
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(2)) / 3
    assert stats["loss_u"].item() == pytest.approx(expected, abs=1e-6)
    assert stats["mask_ratio"].item() == 1.0


def test_lambda_zero_is_labels_only_and_no_gradient_to_weak_view():
    lx = LOGITS_X.clone().requires_grad_()
    lw = LOGITS_U_W.clone().requires_grad_()
    ls = LOGITS_U_S.clone().requires_grad_()
    loss, _ = fixmatch_loss(lx, TARGETS_X, lw, ls, threshold=0.95, temperature=1.0, lambda_u=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(LOSS_X, abs=1e-6)
    assert lw.grad is None  # pseudo-labels are targets, never trained through
    assert torch.count_nonzero(ls.grad) == 0


def test_gradient_reaches_strong_view_only_where_masked():
    lw = LOGITS_U_W.clone().requires_grad_()
    ls = LOGITS_U_S.clone().requires_grad_()
    loss, _ = fixmatch_loss(LOGITS_X, TARGETS_X, lw, ls, threshold=0.95, temperature=1.0, lambda_u=1.0)
    loss.backward()
    assert lw.grad is None
    assert torch.count_nonzero(ls.grad[1]) == 0
    assert torch.allclose(ls.grad[2], torch.tensor([0.5, -0.5]) / 3, atol=1e-6)  # [1,1] vs pseudo-label 1
    # d/dlogits of CE/3 for row 0 (target 0): (softmax - onehot) / 3
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    assert torch.allclose(ls.grad[0], (p - torch.tensor([1.0, 0.0])) / 3, atol=1e-6)


def test_without_targets_u_no_pseudo_label_accuracy():
    _, stats = run(targets_u=None)
    assert "pseudo_label_acc" not in stats
    assert stats["mask_count"].item() == 2


def test_pseudo_label_accuracy_counts_only_images_with_a_known_class():
    """-1 marks an unlabeled image without a true class: it is trained on, but is neither right nor wrong."""
    from fixmatch_accel.algorithms.common import consistency_loss

    logits = torch.eye(3)[[0, 1, 2, 0]] * 10
    pseudo = logits.argmax(-1)
    _, stats = consistency_loss(logits[:1], torch.tensor([0]), logits, pseudo, torch.ones(4), lambda_u=1.0,
                                targets_u=torch.tensor([0, -1, 1, -1]))
    assert stats["pseudo_label_known"].item() == 2 and stats["pseudo_label_correct"].item() == 1
    assert stats["pseudo_label_acc"].item() == 0.5
    _, none = consistency_loss(logits[:1], torch.tensor([0]), logits, pseudo, torch.ones(4), lambda_u=1.0,
                               targets_u=torch.full((4,), -1))
    assert none["pseudo_label_known"].item() == 0 and none["pseudo_label_acc"].item() == 0.0
