"""`objective_two_processes.py OUT_DIR`, under accelerate launch with 2 CPU processes (gloo).

For every algorithm (and distribution alignment): each process feeds its half of the same seeded
batches to an Objective whose statistics are reduced by the run's collectives (launch.step_collectives),
eager and under torch.compile(fullgraph=True); process 0 also feeds the whole batches to an Objective
on its own (no collective). Each process writes its final states and step losses to OUT_DIR/rank_<r>.pt,
process 0 the single-process ones to OUT_DIR/single.pt, for the test to compare.
"""

import sys

import torch
from accelerate import Accelerator

from fixmatch_accel.algorithms import ALGORITHMS
from fixmatch_accel.algorithms.objective import Objective
from fixmatch_accel.launch import step_collectives

# Every registered algorithm with its default alignment, and the two other alignments once each.
CASES = [(a.name, a.dist_align) for a in ALGORITHMS.values()] + [("fixmatch", "labeled"), ("flexmatch", "uniform")]
C, B, N, STEPS, SLOTS = 5, 3, 8, 4, 12  # classes, labeled and unlabeled samples per process, steps, examples


def batches():
    """The same STEPS whole batches (both processes' samples, process 0's first) on every process."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        out.append(dict(
            logits_x=torch.randn(2 * B, C, generator=g), targets_x=torch.randint(0, C, (2 * B,), generator=g),
            # scaled so that some samples pass 0.95 and FlexMatch's per-example state fills up
            logits_u_w=4 * torch.randn(2 * N, C, generator=g), logits_u_s=torch.randn(2 * N, C, generator=g),
            indices=torch.randint(0, SLOTS, (2 * N,), generator=g),
            targets_u=torch.randint(0, C, (2 * N,), generator=g),
        ))
    return out


def half(batch, rank):
    return {k: v[rank * len(v) // 2:(rank + 1) * len(v) // 2] for k, v in batch.items()}


def run(objective, steps, step_fn):
    state, losses, grads = objective.init_state(), [], []
    for b in steps:
        logits_u_s = b["logits_u_s"].clone().requires_grad_()
        loss, stats, state = step_fn(state, b["logits_x"], b["targets_x"], b["logits_u_w"], logits_u_s,
                                     b["indices"], torch.ones_like(b["indices"], dtype=torch.bool), b["targets_u"])
        loss.backward()
        losses.append(loss.detach())
        grads.append(logits_u_s.grad)
    return dict(state=objective.tensors(state), losses=torch.stack(losses), grads=grads)


def main(out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    rank, whole = accelerator.process_index, batches()
    labeled_labels = torch.tensor([0, 0, 1, 2, 3, 4, 4, 4])
    results, single = {}, {}
    for algorithm, align in CASES:
        kw = dict(num_classes=C, threshold=0.95, temperature=1.0, lambda_u=1.0, dist_align=align, stats_momentum=0.9,
                  num_slots=SLOTS, dist_target=labeled_labels.bincount(minlength=C).float())
        name = f"{algorithm}-{align}"
        shared = Objective(algorithm, **kw, all_sum=step_collectives(accelerator)[0],
                           all_gather=step_collectives(accelerator)[1])
        mine = [half(b, rank) for b in whole]
        results[name] = run(shared, mine, shared)
        torch._dynamo.reset()
        results[name + "-compiled"] = run(shared, mine, torch.compile(shared.__call__, fullgraph=True,
                                                                      backend="aot_eager"))
        if rank == 0:
            alone = Objective(algorithm, **kw)
            single[name] = run(alone, whole, alone)
    torch.save(results, f"{out_dir}/rank_{rank}.pt")
    if rank == 0:
        torch.save(single, f"{out_dir}/single.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
