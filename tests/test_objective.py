"""The Objective: every algorithm behind one step function, its statistics exact across processes."""


import pytest
import torch
from conftest import ROOT, accelerate_launch, run_train
from objective_two_processes import CASES  # every registered algorithm

from fixmatch_accel.algorithms import ALGORITHMS
from fixmatch_accel.algorithms.objective import Objective
from fixmatch_accel.config import parse_args
from fixmatch_accel.runlog import DERIVED, TOTALS


def test_two_processes_hold_the_state_of_one_process_fed_both_batches(tmp_path):
    """Real gloo processes, the run's collectives, eager and compiled (fullgraph): after 4 steps each
    process's state equals one process's fed both halves, to float rounding (FlexMatch's labels exactly)."""
    result = run_train([], launcher=accelerate_launch() + [str(ROOT / "tests" / "objective_two_processes.py"),
                                                           str(tmp_path)], timeout=300)
    # run_train appends train.py's path: the script takes its output folder first and ignores the rest
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank_{r}.pt") for r in (0, 1)]
    single = torch.load(tmp_path / "single.pt")
    assert set(single) == {f"{a}-{align}" for a, align in CASES} >= {f"{a}-none" for a in ALGORITHMS
                                                                    if ALGORITHMS[a].dist_align == "none"}
    for name, alone in single.items():
        for variant in (name, name + "-compiled"):
            for r in ranks:
                assert r[variant]["state"].keys() == alone["state"].keys(), variant
                for k, v in alone["state"].items():
                    if v.dtype == torch.long:
                        assert torch.equal(r[variant]["state"][k], v), (variant, k)
                    else:
                        torch.testing.assert_close(r[variant]["state"][k], v, msg=f"{variant} {k}")
            if ALGORITHMS[name.split("-")[0]].sample_mean_loss:  # the mean of the two losses is the whole batch's
                torch.testing.assert_close((ranks[0][variant]["losses"] + ranks[1][variant]["losses"]) / 2,
                                           alone["losses"], msg=variant)
                for step, grad in enumerate(alone["grads"]):  # each process's mean is over half the samples
                    torch.testing.assert_close(torch.cat([r[variant]["grads"][step] for r in ranks]) / 2, grad)
        # the state changed at all: otherwise the comparison proves nothing
        assert any(k != "dist_align.p_target" for k in alone["state"]) or name.startswith("fixmatch")
    flex = single["flexmatch-none"]["state"]["flexmatch.selected_label"]
    assert (flex >= 0).sum() >= 3


def test_state_round_trips_through_named_tensors_and_refuses_another_shape():
    objective = Objective("flexmatch", num_classes=3, threshold=0.95, temperature=1.0, lambda_u=1.0,
                          dist_align="uniform", num_slots=6, num_unlabeled=4)
    state = objective.init_state()
    saved = {k: v + 1 if v.dtype != torch.long else v for k, v in objective.tensors(state).items()}
    assert set(saved) == {"flexmatch.selected_label", "flexmatch.num_unlabeled", "dist_align.p_model",
                          "dist_align.p_target", "dist_align.steps"}
    loaded = objective.from_tensors(state, saved)
    assert torch.equal(loaded.dist_align.p_model, state.dist_align.p_model + 1)
    with pytest.raises(ValueError, match="flexmatch.selected_label has shape"):
        objective.from_tensors(state, dict(saved, **{"flexmatch.selected_label": torch.zeros(5, dtype=torch.long)}))
    with pytest.raises(KeyError, match="dist_align.p_model"):
        objective.from_tensors(state, {k: v for k, v in saved.items() if k != "dist_align.p_model"})
    fixmatch = Objective("fixmatch", num_classes=3, threshold=0.9, temperature=1.0, lambda_u=1.0)
    assert fixmatch.tensors(fixmatch.init_state()) == {}


def test_flexmatch_unused_count_leaves_out_rows_that_are_not_unlabeled():
    """With labeled rows left out of the unlabeled data, their slots stay -1 but are not 'unused' (eq. 7)."""
    objective = Objective("flexmatch", num_classes=2, threshold=0.95, temperature=1.0, lambda_u=1.0,
                          num_slots=6, num_unlabeled=3)
    state = objective.init_state()
    state = state._replace(algorithm=state.algorithm._replace(selected_label=torch.tensor([0, 0, -1, -1, -1, -1])))
    from fixmatch_accel.algorithms import flexmatch

    # sigma = [2, 0], unused = 3 - 2 = 1 (not 4): beta = [2/2, 0]
    assert flexmatch.learning_effect(state.algorithm, 2).tolist() == [1.0, 0.0]


def test_a_replaced_unreadable_image_never_updates_flexmatch_state():
    objective = Objective("flexmatch", num_classes=2, threshold=0.5, temperature=1.0, lambda_u=1.0, num_slots=4)
    logits_u = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    _, _, state = objective(objective.init_state(), torch.zeros(1, 2), torch.tensor([0]), logits_u, logits_u,
                            torch.tensor([1, 2]), torch.tensor([True, False]))
    assert state.algorithm.selected_label.tolist() == [-1, 0, -1, -1]


@pytest.mark.parametrize("algorithm,extra", [("fixmatch", set()), ("flexmatch", set()), ("freematch", {"loss_f"}),
                                             ("softmatch", {"mean_weight"}), ("adamatch", set())])
def test_every_algorithm_reports_thresholds_and_its_averaged_stats(algorithm, extra):
    objective = Objective(algorithm, num_classes=3, threshold=0.7, temperature=1.0, lambda_u=1.0, num_slots=8)
    g = torch.Generator().manual_seed(1)
    loss, stats, _ = objective(objective.init_state(), torch.randn(2, 3, generator=g), torch.tensor([0, 2]),
                               torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g),
                               torch.arange(4), torch.ones(4, dtype=torch.bool))
    # What the run log averages besides the losses: the stats that are neither totals nor derived from them.
    averaged = set(stats) - set(TOTALS) - set(DERIVED) - {"loss", "loss_x", "loss_u"}
    assert averaged == {"threshold_per_class"} | extra
    for k in averaged:
        assert stats[k].shape == ((3,) if k == "threshold_per_class" else ()), k
    assert torch.isfinite(loss)


def test_algorithm_flags_defaults_and_presets():
    cfg, sources = parse_args(["--dataset_name", "digits", "--algorithm", "softmatch"])
    assert (cfg.dist_align, cfg.stats_momentum, cfg.softmatch_n_sigma) == ("uniform", 0.999, 2.0)
    cfg, _ = parse_args(["--dataset_name", "digits", "--algorithm", "freematch"])
    assert (cfg.dist_align, cfg.freematch_fairness) == ("none", 0.001)
    cfg, _ = parse_args(["--dataset_name", "digits", "--algorithm", "flexmatch", "--dist_align", "labeled",
                         "--no-flexmatch_warmup"])
    assert (cfg.dist_align, cfg.flexmatch_warmup, cfg.threshold) == ("labeled", False, 0.95)
    # a preset sets data and model; the algorithm brings its own defaults
    cfg, sources = parse_args(["--preset", "cifar10-40", "--algorithm", "softmatch"])
    assert (cfg.dataset_name, cfg.model, cfg.num_labeled, cfg.algorithm, cfg.dist_align) == (
        "uoft-cs/cifar10", "wrn28_2", 40, "softmatch", "uniform")
    assert sources["dataset_name"] == "preset:cifar10-40" and sources["algorithm"] == "flag"
