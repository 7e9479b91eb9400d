"""The Accelerator of a launch (processes, precision, trackers) and the few collectives the run needs."""

import datetime
import os
from typing import Tuple

import torch

from .errors import UsageError
from .xla import is_xla


def make_accelerator(cfg, log_with):
    """The run's Accelerator; refuses a launch whose processes do not see each other."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # A multi-process launch on a machine without GPUs must use gloo on the CPU;
    # otherwise every process would train alone, believing it is the only one.
    cpu = world_size > 1 and not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_XLA") is None
    mixed_precision = cfg.mixed_precision
    join_restarted_group(not torch.cuda.is_available(), cfg.ddp_timeout)
    if mixed_precision is None and "1" in (os.environ.get("XLA_USE_BF16"), os.environ.get("XLA_DOWNCAST_BF16")):
        # accelerate's TPU launcher hands a config's bf16 on only as these variables, which torch_xla 2.6+ ignores.
        mixed_precision = "bf16"
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_dir=cfg.output_dir,
        # The schedule counts optimizer steps, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # Every optimizer step takes N micro-batches, also across the end of a pass over the data.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
        # A peer that stops answering (a machine lost without a connection reset) fails the next collective
        # after this long instead of the backend default; a peer that crashed fails it at once.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.ddp_timeout))],
    )
    # XLA's launcher (xmp.spawn) starts its processes without WORLD_SIZE.
    if accelerator.num_processes != world_size and not is_xla(accelerator.device):
        raise UsageError(
            f"the launcher started {world_size} processes but accelerate sees {accelerator.num_processes}: "
            "on a machine without GPUs launch with "
            "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N"
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # accelerate would run fp32
        raise UsageError("--mixed_precision fp16 does not run on a CPU (accelerate trains in fp32 there); "
                         "use bf16 or no")
    if cfg.compile and is_xla(accelerator.device):
        raise UsageError("--compile (torch.compile) is not for XLA devices: there every training step is already "
                         "traced and compiled as one graph; leave it out")
    return accelerator


def join_restarted_group(cpu: bool, timeout_s: int) -> None:
    """After a restart by torchrun's agent, join the process group through a store prefix of its own (accelerate then
    uses that group).

    The agent's store outlives its workers and torch (2.14) adds no prefix per attempt: the restarted
    processes could read their dead predecessors' addresses from it and fail to connect (gloo:
    "connectFullMesh failed ... Connection refused"), using up a restart.
    """
    restart, world = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), int(os.environ.get("WORLD_SIZE", "1"))
    if restart == "0" or world == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    dist.init_process_group("gloo" if cpu else "nccl", store=dist.PrefixStore(f"restart_{restart}", store),
                            rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)


def check_same_start(accelerator, resume_step: int) -> None:
    """Refuse a launch whose processes chose different checkpoints to continue (-1: none), each having looked at
    --output_dir on its own (one collective, at set-up)."""
    if accelerator.num_processes == 1:
        return
    steps = accelerator.gather(torch.tensor([resume_step], device=accelerator.device)).tolist()
    if len(set(steps)) > 1:
        chose = ", ".join(f"process {r}: {f'step {s}' if s >= 0 else 'a new run'}" for r, s in enumerate(steps))
        raise UsageError(f"--resume_from_checkpoint: the processes found different checkpoints ({chose}); "
                         "--output_dir must be one folder that every process sees (a disk all machines share)")


def restart_count() -> Tuple[int, int]:
    """(restarts so far, restarts allowed) of torchrun's elastic agent (`accelerate launch --max_restarts N`)."""
    return (int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")))


def num_machines(world: int) -> int:
    """torchrun's count of machines (its agents); else (mpirun) processes in all / processes on this machine."""
    return int(os.environ.get("GROUP_WORLD_SIZE") or world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def processes_with(accelerator, flag) -> int:
    """How many processes hold a true `flag` (a collective and a host sync: call only where allowed)."""
    count = torch.as_tensor(flag, dtype=torch.float32, device=accelerator.device)
    return int(accelerator.reduce(count, reduction="sum"))


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (CPU work is done when queued; XLA waits when read)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def from_main_process(accelerator, module: torch.nn.Module) -> None:
    """Give every process process 0's weights and buffers of `module` (a no-op on one process)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast

    tensors = list(module.state_dict().values())
    for mine, main in zip(tensors, broadcast(tensors, from_process=0)):
        if main is not mine:  # XLA's broadcast returns new tensors
            mine.copy_(main)


def step_collectives(accelerator):
    """`(all_sum, all_gather)` for statistics reduced inside the training step, or None on one process.

    torch.distributed's functional collectives: they trace into a torch.compile graph (no graph break) and
    are the same numbers eager. XLA's lazy tensors take accelerate's reduce / gather, which trace into the
    step's graph there.
    """
    if accelerator.num_processes == 1:
        return None
    if is_xla(accelerator.device):
        return (lambda t: accelerator.reduce(t, reduction="sum")), accelerator.gather
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as funcol

    group = dist.group.WORLD
    return (lambda t: funcol.all_reduce(t, "sum", group)), (lambda t: funcol.all_gather_tensor(t, 0, group))
