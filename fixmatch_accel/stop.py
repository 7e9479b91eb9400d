"""What ends a run early: a stop signal (after a checkpoint) or a non-finite loss or weight."""

import signal
from typing import Optional, Tuple

import torch

from .data.pipeline import STOP_SIGNALS
from .launch import processes_with


class Stopped(Exception):
    """Ends a run early with a message and an exit code; `error` False for a stop that was asked for (a signal)."""

    def __init__(self, message: str, exit_code: int, error: bool = True):
        super().__init__(message)
        self.exit_code = exit_code
        self.error = error


class StopSignal:
    """SIGTERM / SIGINT / SIGUSR1 ask the loop to finish its step, checkpoint and exit; a second SIGINT aborts.

    One process stops at once (its window logged first); several agree at a logging step,
    so that they write one checkpoint together. The DataLoader workers ignore these signals
    (data.pipeline), so one sent to the whole process group stops the run the same way.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.signum = None
        self.previous = {}
        for sig in STOP_SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. in a notebook's worker): leave signals alone
                pass

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def forces_log(self) -> bool:
        """A single process logs its window at once when signalled."""
        return self.accelerator.num_processes == 1 and self.signum is not None

    def agreed(self, logged: bool, main_flag: bool = False) -> Tuple[bool, bool]:
        """Whether the run stops after this step, and process 0's `main_flag` (read at logging steps only), known to
        every process: with several, one collective at logging steps, where the run syncs anyway."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return self.signum is not None, logged and main_flag
        if not logged:
            return False, False
        flags = torch.tensor([self.signum is not None, main_flag and accelerator.is_main_process],
                             dtype=torch.float32, device=accelerator.device)
        stop, flag = accelerator.reduce(flags, reduction="sum").tolist()
        return stop > 0, flag > 0

    def stopped(self, step: int, checkpoint: str) -> Stopped:
        name = signal.Signals(self.signum).name if self.signum else "a signal on another process"
        return Stopped(f"stopped by {name} after step {step}; checkpoint {checkpoint}; "
                       "continue with --resume_from_checkpoint latest",
                       # 130 after Ctrl-C and 138 after SIGUSR1, the shell's status for an interrupted command
                       # (scripts and schedulers can tell it from a finished run: a batch script requeues on
                       # 138), yet a stop asked for, not an error
                       0 if self.signum in (None, signal.SIGTERM) else 128 + self.signum, error=False)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def all_finite(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (a host sync and a collective)."""
    return processes_with(accelerator, torch.isfinite(loss.detach())) == accelerator.num_processes


def finite_weights(model: torch.nn.Module, loss_sum: Optional[torch.Tensor]) -> bool:
    """Finite weights now and a finite loss sum since the last log (a host sync: only when saving)."""
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    if loss_sum is not None:
        flags.append(torch.isfinite(loss_sum))
    return bool(torch.stack(flags).all())


def nonfinite(step: int, since: int, last_checkpoint: Optional[str], mixed_precision: str) -> Stopped:
    return Stopped(f"the loss or the weights are not finite at step {step} (checked since step {since}); "
                   f"stopped without saving. Last good checkpoint: {last_checkpoint or 'none'}. "
                   "Try a lower --learning_rate" + (" or --mixed_precision bf16 instead of fp16"
                                                     if mixed_precision == "fp16" else "") + ".", 1)
