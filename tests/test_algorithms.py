"""FlexMatch, FreeMatch, SoftMatch and distribution alignment against hand-computed cases.

Each update is checked three ways: a hand-computed case (the paper's equation in the test's
name or docstring), USB's formula on the whole (all-gathered) batch, and the two-process split:
the statistics of two halves summed (FlexMatch: concatenated) give the whole batch's update.
"""

import math

import pytest
import torch

from fixmatch_accel.algorithms import dist_align, fixmatch, flexmatch, freematch, softmatch
from fixmatch_accel.algorithms.common import weak_probs
from fixmatch_accel.algorithms.fixmatch import fixmatch_loss

BASE_KEYS = {
    "loss",
    "loss_x",
    "loss_u",
    "mask_ratio",
    "mask_count",
    "num_unlabeled",
    "mask_per_class",
    "pseudo_label_correct",
    "pseudo_label_known",
    "pseudo_label_acc",
}
LOGITS_X = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
TARGETS_X = torch.tensor([0, 1])
LOSS_X = (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(math.e / (math.e + 2))) / 2
LOG3 = math.log(3.0)


def approx(x, abs=1e-6):
    return pytest.approx(x, abs=abs)


def summed(a, b):
    return {k: a[k] + b[k] for k in a}


def concatenated(a, b):
    return {k: torch.cat([a[k], b[k]]) for k in a}


def random_probs(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, c, generator=g), dim=-1)


# ---------------------------------------------------------------- distribution alignment


def test_dist_align_first_update_sets_p_model_then_ema():
    """ReMixMatch sec. 3.2 / USB DistAlignEMAHook: p_model = first batch mean, then m*p + (1-m)*mean."""
    state = dist_align.DistAlignState.init(2)
    assert state.p_target.tolist() == approx([0.5, 0.5])
    state = dist_align.update_state(state, dist_align.batch_statistics(torch.tensor([[0.5, 0.5], [0.9, 0.1]])))
    assert state.p_model.tolist() == approx([0.7, 0.3])
    assert int(state.steps) == 1
    state = dist_align.update_state(state, dist_align.batch_statistics(torch.tensor([[0.1, 0.9]])), momentum=0.5)
    assert state.p_model.tolist() == approx([0.4, 0.6])
    assert int(state.steps) == 2


def test_dist_align_p_times_target_over_model_renormalised():
    """aligned = SumNorm(p * p_target / p_model): [0.6, 0.4] * 0.5 / [0.75, 0.25] = [0.4, 0.8] -> [1/3, 2/3]."""
    state = dist_align.DistAlignState(torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5]), torch.tensor(1))
    aligned = dist_align.align(torch.tensor([[0.6, 0.4]]), state)
    assert aligned[0].tolist() == approx([1 / 3, 2 / 3], abs=1e-5)


def test_dist_align_labeled_target_is_class_frequencies():
    freq = dist_align.label_frequencies(torch.tensor([0, 0, 1, 2]), 3)
    assert freq.tolist() == approx([0.5, 0.25, 0.25])
    state = dist_align.DistAlignState.init(3, target=freq)
    assert state.p_target.tolist() == approx([0.5, 0.25, 0.25])
    with pytest.raises(ValueError):
        dist_align.DistAlignState.init(4, target=freq)


def test_dist_align_two_processes_match_one():
    probs = random_probs(8, 5, seed=0)
    state = dist_align.DistAlignState.init(5)
    state = dist_align.update_state(state, dist_align.batch_statistics(random_probs(8, 5, seed=1)))
    whole = dist_align.update_state(state, dist_align.batch_statistics(probs))
    split = dist_align.update_state(
        state, summed(dist_align.batch_statistics(probs[:4]), dist_align.batch_statistics(probs[4:]))
    )
    torch.testing.assert_close(split.p_model, whole.p_model)
    # USB's update on the all-gathered batch.
    torch.testing.assert_close(whole.p_model, 0.999 * state.p_model + 0.001 * probs.mean(0))


# ---------------------------------------------------------------- FlexMatch

# 6 unlabeled examples: two confidently labeled 0, one 1, three unused.
FLEX_STATE = flexmatch.FlexMatchState(torch.tensor([-1, 0, -1, 1, 0, -1]))


def test_flexmatch_learning_effect_with_warmup_eq7():
    """beta_c = sigma_c / max(max_c sigma_c, N_unused) = [2, 1, 0] / max(2, 3)."""
    beta = flexmatch.learning_effect(FLEX_STATE, 3)
    assert beta.tolist() == approx([2 / 3, 1 / 3, 0.0])


def test_flexmatch_learning_effect_without_warmup_eq5():
    """beta_c = sigma_c / max_c sigma_c = [2, 1, 0] / 2."""
    beta = flexmatch.learning_effect(FLEX_STATE, 3, warmup=False)
    assert beta.tolist() == approx([1.0, 0.5, 0.0])
    # Nothing labeled yet: 0 / 0 counts as beta 0.
    assert flexmatch.learning_effect(flexmatch.FlexMatchState.init(3, 4), 3, warmup=False).tolist() == [0.0] * 3


def test_flexmatch_convex_threshold_eq6():
    """T_c = tau * beta / (2 - beta): beta 2/3 -> 0.95 * 0.5, beta 1/3 -> 0.95 * 0.2, beta 0 -> 0."""
    per_class = flexmatch.thresholds(FLEX_STATE, 3, threshold=0.95)
    assert per_class.tolist() == approx([0.475, 0.19, 0.0])
    no_warmup = flexmatch.thresholds(FLEX_STATE, 3, threshold=0.95, warmup=False)
    assert no_warmup.tolist() == approx([0.95, 0.95 / 3, 0.0])


def test_flexmatch_loss_masks_with_per_class_thresholds():
    """Thresholds [0.475, 0.19, 0]: confidence 0.5 (class 0) passes, 0.45 (class 0) does not, 0.7 (class 1) passes."""
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.45, 0.35, 0.2], [0.2, 0.7, 0.1]])
    logits_u_s = torch.zeros(3, 3)  # CE = log 3 against any label
    loss, stats = flexmatch.loss(
        LOGITS_X, TARGETS_X, probs, logits_u_s, FLEX_STATE, lambda_u=2.0, targets_u=torch.tensor([0, 0, 2])
    )
    assert set(stats) == BASE_KEYS | {"threshold_per_class"}
    assert stats["threshold_per_class"].tolist() == approx([0.475, 0.19, 0.0])
    assert stats["mask_count"].item() == 2
    assert stats["mask_ratio"].item() == approx(2 / 3)
    assert stats["mask_per_class"].tolist() == [1.0, 1.0, 0.0]
    assert stats["pseudo_label_acc"].item() == approx(0.5)
    assert stats["loss_u"].item() == approx(2 * LOG3 / 3)
    assert loss.item() == approx(LOSS_X + 2.0 * 2 * LOG3 / 3)


def test_flexmatch_initial_state_uses_every_sample():
    """At the start every beta_c is 0, so every threshold is 0 (FlexMatch's warm start)."""
    state = flexmatch.FlexMatchState.init(3, 10)
    assert state.selected_label.tolist() == [-1] * 10
    _, stats = flexmatch.loss(LOGITS_X, TARGETS_X, random_probs(4, 3, 0), torch.zeros(4, 3), state, lambda_u=1.0)
    assert stats["mask_ratio"].item() == 1.0


def test_flexmatch_update_keeps_latest_confident_label_last_duplicate_wins():
    """Only max-prob >= tau writes; an index twice among the confident entries: the later one wins."""
    probs = torch.tensor([[0.01, 0.01, 0.98], [0.96, 0.02, 0.02], [0.5, 0.4, 0.1], [0.02, 0.97, 0.01]])
    stats = flexmatch.batch_statistics(probs, torch.tensor([4, 1, 2, 4]), threshold=0.95)
    assert stats["label"].tolist() == [2, 0, 0, 1]
    assert stats["confident"].tolist() == [1, 1, 0, 1]
    new = flexmatch.update_state(FLEX_STATE, stats)
    # Example 4: 0 -> 2 -> 1 (the last); 1: unchanged label 0; 2: not confident, stays -1.
    assert new.selected_label.tolist() == [-1, 0, -1, 1, 1, -1]


def test_flexmatch_two_processes_match_one():
    probs = random_probs(8, 4, seed=2)
    probs[0] = torch.tensor([0.97, 0.01, 0.01, 0.01])
    probs[5] = torch.tensor([0.01, 0.01, 0.01, 0.97])
    index = torch.tensor([3, 7, 0, 9, 3, 5, 1, 2])
    state = flexmatch.FlexMatchState.init(4, 10)
    whole = flexmatch.update_state(state, flexmatch.batch_statistics(probs, index))
    gathered = concatenated(
        flexmatch.batch_statistics(probs[:4], index[:4]), flexmatch.batch_statistics(probs[4:], index[4:])
    )
    split = flexmatch.update_state(state, gathered)
    assert split.selected_label.tolist() == whole.selected_label.tolist()
    assert whole.selected_label[3].item() == 0 and whole.selected_label[5].item() == 3


# ---------------------------------------------------------------- FreeMatch


def test_freematch_init_and_ema_updates_eq6_7_11():
    """tau_0 = p_0 = h_0 = 1/C; with m = 0.5 and max-probs [0.9, 0.7]: tau = 0.5*0.5 + 0.5*0.8 = 0.65,
    p = 0.5*[0.5, 0.5] + 0.5*[0.6, 0.4], h = 0.5*[0.5, 0.5] + 0.5*[1/2, 1/2]; eq. 9: tau * p / max(p)."""
    state = freematch.FreeMatchState.init(2)
    assert state.time_p.item() == approx(0.5)
    assert state.p_model.tolist() == approx([0.5, 0.5]) and state.label_hist.tolist() == approx([0.5, 0.5])
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    state = freematch.update_state(state, freematch.batch_statistics(probs), momentum=0.5)
    assert state.time_p.item() == approx(0.65)
    assert state.p_model.tolist() == approx([0.55, 0.45])
    assert state.label_hist.tolist() == approx([0.5, 0.5])
    assert freematch.thresholds(state).tolist() == approx([0.65, 0.65 * 0.45 / 0.55])


def test_freematch_update_matches_usb_formula_and_two_processes():
    probs = random_probs(12, 5, seed=3)
    state = freematch.FreeMatchState.init(5)
    whole = freematch.update_state(state, freematch.batch_statistics(probs))
    split = freematch.update_state(
        state, summed(freematch.batch_statistics(probs[:5]), freematch.batch_statistics(probs[5:]))
    )
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b)
    m = 0.999
    hist = torch.bincount(probs.argmax(-1), minlength=5).float()
    torch.testing.assert_close(whole.time_p, m * state.time_p + (1 - m) * probs.max(-1).values.mean())
    torch.testing.assert_close(whole.p_model, m * state.p_model + (1 - m) * probs.mean(0))
    torch.testing.assert_close(whole.label_hist, m * state.label_hist + (1 - m) * hist / hist.sum())


# Thresholds tau * MaxNorm(p) = 0.8 * [1, 0.5]; h = [0.75, 0.25] -> SumNorm(p / h) = SumNorm([2/3, 1]) = [0.4, 0.6].
FREE_STATE = freematch.FreeMatchState(torch.tensor(0.8), torch.tensor([0.5, 0.25]), torch.tensor([0.75, 0.25]))
FREE_PROBS = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.45, 0.55]])  # used, not (0.7 < 0.8), used (0.55 >= 0.4)
FREE_X = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
FREE_LOSS_X = math.log(1 + math.exp(-1))


def test_freematch_self_adaptive_fairness_loss_eq12():
    """Strong views of the used samples: [0.75, 0.25] (argmax 0) and [1/3, 2/3] (argmax 1); the masked one is
    ignored. pbar / hbar per class = [0.75 + 1/3, 0.25 + 2/3] / [1, 1] -> SumNorm = [13/24, 11/24];
    L_f = sum([0.4, 0.6] * log([13/24, 11/24])) (USB's sign: -H(target, pbar))."""
    logits_u_s = torch.tensor([[LOG3, 0.0], [0.0, 5.0], [0.0, math.log(2.0)]])
    mask = torch.tensor([1.0, 0.0, 1.0])
    loss_f = freematch.fairness_loss(logits_u_s, mask, FREE_STATE)
    expected = 0.4 * math.log(13 / 24) + 0.6 * math.log(11 / 24)
    assert loss_f.item() == approx(expected)

    total, stats = freematch.loss(FREE_X, torch.tensor([0, 1]), FREE_PROBS, logits_u_s, FREE_STATE, lambda_u=1.0)
    truth = {"pseudo_label_correct", "pseudo_label_known", "pseudo_label_acc"}
    assert set(stats) == (BASE_KEYS - truth) | {"threshold_per_class", "loss_f"}
    assert stats["threshold_per_class"].tolist() == approx([0.8, 0.4])
    assert stats["mask_per_class"].tolist() == [1.0, 1.0]
    assert stats["loss_f"].item() == approx(expected)
    # CE of the used strong views: -log 0.75 (label 0) and -log(2/3) (label 1), over all 3.
    loss_u = (-math.log(0.75) - math.log(2 / 3)) / 3
    assert stats["loss_u"].item() == approx(loss_u)
    assert total.item() == approx(FREE_LOSS_X + loss_u + 0.001 * expected)
    assert stats["loss"].item() == approx(total.item())


def test_freematch_fairness_class_never_argmax_scales_to_zero():
    """USB replaces 1 / hbar_c = inf by 0: both used strong views argmax 0, so SumNorm(pbar / hbar) = [1, 0]
    and L_f = 0.4 * log(1) + 0.6 * log(1e-12)."""
    logits_u_s = torch.tensor([[LOG3, 0.0], [0.0, 5.0], [math.log(2.0), 0.0]])
    loss_f = freematch.fairness_loss(logits_u_s, torch.tensor([1.0, 0.0, 1.0]), FREE_STATE)
    assert loss_f.item() == approx(0.6 * math.log(1e-12), abs=1e-4)


def test_freematch_nothing_used_gives_zero_fairness_and_finite_gradients():
    logits_u_s = torch.tensor([[LOG3, 0.0], [0.0, 5.0], [0.0, 1.0]], requires_grad=True)
    state = FREE_STATE._replace(time_p=torch.tensor(1.0), p_model=torch.tensor([0.5, 0.5]))  # thresholds [1, 1]
    total, stats = freematch.loss(FREE_X, torch.tensor([0, 1]), FREE_PROBS, logits_u_s, state, lambda_u=1.0)
    assert stats["mask_count"].item() == 0 and stats["loss_f"].item() == 0.0
    assert total.item() == approx(FREE_LOSS_X)
    total.backward()
    assert torch.isfinite(logits_u_s.grad).all() and logits_u_s.grad.abs().sum().item() == 0.0


# ---------------------------------------------------------------- SoftMatch


def test_softmatch_truncated_gaussian_weight_eq7():
    """mu 0.7, var 0.02, n_sigma 2: 2 var / n_sigma^2 = 0.01; p 0.9 -> 1, 0.6 -> e^-1, 0.5 -> e^-4."""
    state = softmatch.SoftMatchState(torch.tensor(0.7), torch.tensor(0.02))
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]])
    w = softmatch.weights(probs, state, n_sigma=2.0)
    assert w.tolist() == approx([1.0, math.exp(-1), math.exp(-4)], abs=1e-5)


def test_softmatch_init_and_ema_of_mean_and_unbiased_variance():
    """mu_0 = 1/C, var_0 = 1; max-probs [0.5, 0.7, 0.9]: mean 0.7, unbiased var 0.04; m = 0.5."""
    state = softmatch.SoftMatchState.init(4)
    assert state.prob_max_mu.item() == approx(0.25) and state.prob_max_var.item() == 1.0
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.1, 0.7, 0.1, 0.1], [0.0, 0.0, 0.1, 0.9]])
    new = softmatch.update_state(state, softmatch.batch_statistics(probs, state), momentum=0.5)
    assert new.prob_max_mu.item() == approx(0.475)
    assert new.prob_max_var.item() == approx(0.52)
    # One sample: no variance; the variance EMA keeps its value.
    one = softmatch.update_state(state, softmatch.batch_statistics(probs[:1], state), momentum=0.5)
    assert one.prob_max_var.item() == 1.0 and one.prob_max_mu.item() == approx(0.375)


def test_softmatch_update_matches_usb_formula_and_two_processes():
    probs = random_probs(16, 10, seed=4)
    state = softmatch.SoftMatchState(torch.tensor(0.6), torch.tensor(0.05))
    whole = softmatch.update_state(state, softmatch.batch_statistics(probs, state))
    split = softmatch.update_state(
        state, summed(softmatch.batch_statistics(probs[:7], state), softmatch.batch_statistics(probs[7:], state))
    )
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b)
    maxp = probs.max(-1).values
    torch.testing.assert_close(whole.prob_max_mu, 0.999 * state.prob_max_mu + 0.001 * maxp.mean())
    torch.testing.assert_close(whole.prob_max_var, 0.999 * state.prob_max_var + 0.001 * maxp.var(unbiased=True))


def test_softmatch_loss_weights_from_aligned_labels_from_raw():
    """Weights from weight_probs (max 0.9 -> 1, 0.6 -> e^-1, 0.5 -> e^-4), pseudo-labels from probs_u_w
    ([1, 0, 1]); loss_u = mean(w * log 2) with zero strong logits over 2 classes."""
    state = softmatch.SoftMatchState(torch.tensor(0.7), torch.tensor(0.02))
    weight_probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]])
    probs = torch.tensor([[0.4, 0.6], [0.8, 0.2], [0.3, 0.7]])
    w = [1.0, math.exp(-1), math.exp(-4)]
    total, stats = softmatch.loss(
        FREE_X,
        torch.tensor([0, 1]),
        probs,
        torch.zeros(3, 2),
        state,
        lambda_u=1.0,
        weight_probs=weight_probs,
        targets_u=torch.tensor([1, 1, 1]),
    )
    assert set(stats) == BASE_KEYS | {"threshold_per_class", "mean_weight"}
    assert stats["mean_weight"].item() == approx(sum(w) / 3)
    assert stats["loss_u"].item() == approx(sum(w) * math.log(2) / 3)
    assert total.item() == approx(FREE_LOSS_X + sum(w) * math.log(2) / 3)
    assert stats["mask_ratio"].item() == 1.0 and stats["mask_per_class"].tolist() == [1.0, 2.0]
    assert stats["pseudo_label_acc"].item() == approx(2 / 3)
    assert stats["threshold_per_class"].tolist() == approx([0.7, 0.7])
    # A weight that underflows to 0 does not count as used.
    tiny = softmatch.SoftMatchState(torch.tensor(0.95), torch.tensor(1e-6))
    _, stats = softmatch.loss(FREE_X, torch.tensor([0, 1]), probs, torch.zeros(3, 2), tiny, lambda_u=1.0)
    assert stats["mask_count"].item() == 0.0 and stats["mask_ratio"].item() == 0.0


# ---------------------------------------------------------------- shared


def test_fixmatch_loss_from_probs_matches_fixmatch_loss():
    logits_u_w = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    logits_u_s = torch.tensor([[1.0, 0.0, 0.0], [5.0, 5.0, 0.0], [1.0, 1.0, 1.0]])
    kw = dict(threshold=0.9, lambda_u=1.0, targets_u=torch.tensor([0, 1, 0]))
    ref_loss, ref = fixmatch_loss(LOGITS_X, TARGETS_X, logits_u_w, logits_u_s, temperature=1.0, **kw)
    loss, stats = fixmatch.loss(LOGITS_X, TARGETS_X, weak_probs(logits_u_w, 1.0), logits_u_s, **kw)
    assert set(stats) == set(ref) | {"threshold_per_class"}
    assert loss.item() == ref_loss.item()
    for k in ref:
        assert torch.equal(stats[k], ref[k]), k
    assert stats["threshold_per_class"].tolist() == approx([0.9] * 3)


# ---------------------------------------------------------------- one step, compiled


def _step_fixmatch_da(lx, y, lw, ls, idx, states):
    (da,) = states
    probs = weak_probs(lw)
    da = dist_align.update_state(da, dist_align.batch_statistics(probs))
    loss, stats = fixmatch.loss(lx, y, dist_align.align(probs, da), ls, threshold=0.6, lambda_u=1.0)
    return loss, stats, (da,)


def _step_flexmatch(lx, y, lw, ls, idx, states):
    (state,) = states
    probs = weak_probs(lw)
    loss, stats = flexmatch.loss(lx, y, probs, ls, state, lambda_u=1.0, threshold=0.6)
    state = flexmatch.update_state(state, flexmatch.batch_statistics(probs, idx, threshold=0.6))
    return loss, stats, (state,)


def _step_freematch(lx, y, lw, ls, idx, states):
    (state,) = states
    probs = weak_probs(lw)
    state = freematch.update_state(state, freematch.batch_statistics(probs), momentum=0.9)
    loss, stats = freematch.loss(lx, y, probs, ls, state, lambda_u=1.0)
    return loss, stats, (state,)


def _step_softmatch_ua(lx, y, lw, ls, idx, states):
    da, state = states
    probs = weak_probs(lw)
    da = dist_align.update_state(da, dist_align.batch_statistics(probs))
    aligned = dist_align.align(probs, da)
    state = softmatch.update_state(state, softmatch.batch_statistics(aligned, state), momentum=0.9)
    loss, stats = softmatch.loss(lx, y, probs, ls, state, lambda_u=1.0, weight_probs=aligned)
    return loss, stats, (da, state)


def test_one_step_of_each_algorithm_compiles_fullgraph_and_matches_eager():
    """statistics + update + loss of every algorithm in one graph (no .item(), no data-dependent shapes);
    two steps each, so the second starts from the state the first returned. aot_eager, as test_step.py:
    fullgraph is what is checked, and it keeps the test to seconds."""
    g = torch.Generator().manual_seed(5)
    c, n = 4, 6
    lx, y = torch.randn(3, c, generator=g), torch.tensor([0, 1, 2])
    batches = [(3 * torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)) for _ in range(2)]
    idx = torch.tensor([0, 3, 5, 7, 3, 1])
    cases = [
        (_step_fixmatch_da, (dist_align.DistAlignState.init(c, target=torch.tensor([1.0, 2.0, 3.0, 4.0])),)),
        (_step_flexmatch, (flexmatch.FlexMatchState.init(c, 8),)),
        (_step_freematch, (freematch.FreeMatchState.init(c),)),
        (_step_softmatch_ua, (dist_align.DistAlignState.init(c), softmatch.SoftMatchState.init(c))),
    ]
    for step, init in cases:
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        eager_states, compiled_states = init, init
        for lw, ls in batches:
            ls = ls.clone().requires_grad_()
            e_loss, e_stats, eager_states = step(lx, y, lw, ls, idx, eager_states)
            c_loss, c_stats, compiled_states = compiled(lx, y, lw, ls, idx, compiled_states)
            torch.testing.assert_close(c_loss, e_loss, msg=step.__name__)
            assert c_stats.keys() == e_stats.keys()
            for k in e_stats:
                torch.testing.assert_close(c_stats[k], e_stats[k], msg=f"{step.__name__} {k}")
            for a, b in zip(compiled_states, eager_states):
                for ta, tb in zip(a, b):
                    torch.testing.assert_close(ta, tb, msg=step.__name__)
            c_loss.backward()
            assert torch.isfinite(ls.grad).all()


def test_adamatch_aligns_to_labeled_predictions_and_thresholds_relative_to_labeled_confidence():
    """AdaMatch's SSL step by hand (Berthelot et al., 2021, sec. 3: distribution alignment, relative threshold).

    Labeled probabilities [0.9, 0.1] and [0.1, 0.9]: mean [0.5, 0.5] (p_target stays uniform), mean confidence
    0.9, so c_tau = 0.8 * 0.9 = 0.72. Unlabeled weak [0.9, 0.1] and [0.5, 0.5]: p_model = their mean [0.7, 0.3]
    (the first update). Aligned: p * [5/7, 5/3] renormalised = [27/34, 7/34] (used: 0.794 >= 0.72, class 0) and
    [0.3, 0.7] (not used: 0.7 < 0.72).
    """
    from fixmatch_accel.algorithms import adamatch
    from fixmatch_accel.algorithms.objective import Objective

    objective = Objective("adamatch", num_classes=2, threshold=0.8, temperature=1.0, lambda_u=1.0,
                          stats_momentum=0.5)
    ln9 = math.log(9.0)
    logits_x = torch.tensor([[ln9, 0.0], [0.0, ln9]])
    logits_u_w = torch.tensor([[ln9, 0.0], [0.0, 0.0]])
    logits_u_s = torch.zeros(2, 2)
    loss, stats, state = objective(objective.init_state(), logits_x, torch.tensor([0, 1]), logits_u_w, logits_u_s,
                                   torch.arange(2), torch.ones(2, dtype=torch.bool), torch.tensor([0, 0]))
    assert state.algorithm.p_model.tolist() == approx([0.7, 0.3])
    assert state.algorithm.p_target.tolist() == approx([0.5, 0.5])
    assert int(state.algorithm.steps) == 1
    assert adamatch.align(weak_probs(logits_u_w), state.algorithm).tolist() == [approx([27 / 34, 7 / 34]),
                                                                                 approx([0.3, 0.7])]
    assert stats["threshold_per_class"].tolist() == approx([0.72, 0.72])
    assert stats["mask_ratio"].item() == 0.5 and stats["mask_per_class"].tolist() == [1.0, 0.0]
    assert stats["pseudo_label_correct"].item() == 1.0  # the used sample's pseudo-label 0 is its true label
    # loss_x = -ln 0.9 for each labeled sample; loss_u = (ln 2 * 1 + ln 2 * 0) / 2 over both unlabeled samples
    assert stats["loss_x"].item() == approx(-math.log(0.9))
    assert stats["loss_u"].item() == approx(math.log(2.0) / 2)
    assert loss.item() == approx(-math.log(0.9) + math.log(2.0) / 2)
    # Both running means then move by (1 - m) towards the next batch's means: p_target from uniform, p_model
    # from the first batch's mean.
    moved = adamatch.update_state(state.algorithm, adamatch.batch_statistics(
        torch.tensor([[0.9, 0.1], [0.9, 0.1]]), torch.tensor([[0.3, 0.7], [0.3, 0.7]])), momentum=0.5)
    assert moved.p_model.tolist() == approx([0.5, 0.5]) and moved.p_target.tolist() == approx([0.7, 0.3])


def test_adamatch_statistics_of_two_halves_summed_are_the_whole_batch():
    from fixmatch_accel.algorithms import adamatch

    g = torch.Generator().manual_seed(3)
    probs_x, probs_u = torch.rand(6, 4, generator=g).softmax(-1), torch.rand(10, 4, generator=g).softmax(-1)
    whole = adamatch.batch_statistics(probs_x, probs_u)
    halves = summed(adamatch.batch_statistics(probs_x[:3], probs_u[:5]),
                    adamatch.batch_statistics(probs_x[3:], probs_u[5:]))
    for k in whole:
        torch.testing.assert_close(halves[k], whole[k])
    # the relative threshold is tau x the mean labeled confidence of the whole batch (USB's, on gathered logits)
    assert adamatch.relative_threshold(halves, 0.95).item() == approx(0.95 * probs_x.max(-1).values.mean().item())


def test_adamatch_refuses_another_alignment():
    from fixmatch_accel.algorithms.objective import Objective

    with pytest.raises(ValueError, match="does not apply to adamatch"):
        Objective("adamatch", num_classes=3, dist_align="uniform")


def test_freematch_clip_caps_the_global_threshold_and_keeps_it_capped():
    """USB's clip_thresh: tau_t = clip(m * tau + (1 - m) * mean max-prob, 0, 0.95), the capped value kept."""
    state = freematch.FreeMatchState.init(2)._replace(time_p=torch.tensor(0.94))
    sure = freematch.batch_statistics(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # mean max-prob 1
    assert freematch.update_state(state, sure, momentum=0.5).time_p.item() == approx(0.97)
    capped = freematch.update_state(state, sure, momentum=0.5, clip=True)
    assert capped.time_p.item() == approx(0.95)
    # the next update starts from the cap: 0.5 * 0.95 + 0.5 * 0.6 = 0.775
    unsure = freematch.batch_statistics(torch.tensor([[0.6, 0.4], [0.4, 0.6]]))
    assert freematch.update_state(capped, unsure, momentum=0.5, clip=True).time_p.item() == approx(0.775)


def test_svhn_presets_clip_freematch_as_usb_does():
    from fixmatch_accel.config import parse_args

    cfg, sources = parse_args(["--preset", "svhn-40", "--algorithm", "freematch"])
    assert cfg.freematch_clip_threshold is True and sources["freematch_clip_threshold"] == "preset:svhn-40"
    assert parse_args(["--preset", "cifar10-40", "--algorithm", "freematch"])[0].freematch_clip_threshold is False
