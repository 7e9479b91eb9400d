"""What the XLA (TPU) path needs besides accelerate: graph cuts, fixed eval shapes, compile and fallback counts.

torch_xla records operations lazily and compiles each distinct graph once. A run
stays fast only while every training step builds the very same graph: static
shapes, no value read on the host, no operation without an XLA lowering (those
"fall back" to the CPU and are counted as `aten::` counters). `xla_metrics.json`
records the counts at each logging step so a run on a TPU can be checked as the
tests check one on XLA's CPU device (PJRT_DEVICE=CPU).

Nothing here imports torch_xla unless the device is an XLA device.
"""

import json
import os
from typing import Dict, List, Optional

import torch


def is_xla(device: torch.device) -> bool:
    return torch.device(device).type == "xla"


def sync() -> None:
    """End the graph recorded so far and launch it (torch_xla's step marker); nothing is read back."""
    import torch_xla

    torch_xla.sync()


def give_loader_dataset(loader) -> None:
    """accelerate 1.15's XLA loader wrapper lacks `.dataset`, which save_state and load_state read."""
    if not hasattr(loader, "dataset") and hasattr(loader, "dataloader"):
        loader.dataset = loader.dataloader.dataset


def load_models_on_host(models: list, input_dir: str) -> None:
    """accelerate load_state pre-hook: read each model file on the host and copy it into the XLA model.

    safetensors' load_model reads the host pointers of the model's tensors, which XLA
    tensors lack; the models are taken off accelerate's list, which loads the rest.
    """
    from accelerate.utils.constants import SAFE_MODEL_NAME
    from safetensors.torch import load_file

    for i, model in enumerate(models):
        name = f"{SAFE_MODEL_NAME}{f'_{i}' if i else ''}.safetensors"
        model.load_state_dict(load_file(os.path.join(input_dir, name)))
    models.clear()


def counts() -> Dict:
    """Graph compilations and executions, device-to-host transfers and CPU fallbacks (`aten::` counters) so far."""
    import torch_xla.debug.metrics as met

    def samples(name: str) -> int:
        data = met.metric_data(name)
        return int(data[0]) if data else 0

    return dict(compiles=samples("CompileTime"), executions=samples("ExecuteTime"),
                transfers_to_host=samples("TransferFromDeviceTime"),
                fallbacks={n: int(met.counter_value(n)) for n in sorted(met.counter_names()) if n.startswith("aten::")})


class XlaMetricsLog:
    """output_dir/xla_metrics.json: a list of rows {step, compiles, executions, transfers_to_host, fallbacks, ...}.

    Counts are totals of this process since it started (at step `since_step`). Written
    whole (temp file + rename) by the main process at each logging step and once more at
    the end (`end: true`); a resumed run keeps the rows up to its checkpoint's step.
    On a healthy run `compiles` stops growing after the first steps and the first
    evaluation and checkpoint, `transfers_to_host` grows by one a logging step, and the
    only `aten::` counter is `_local_scalar_dense` (values read on the host by
    accelerate's rendezvous and the checkpoint's finite check, outside the step).
    """

    def __init__(self, path: str, resume_step: Optional[int] = None):
        self.path = path
        self.rows: List[Dict] = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                self.rows = [r for r in json.load(f) if r["step"] <= resume_step]

    def write(self, step: int, **extra) -> None:
        self.rows.append(dict(step=step, **counts(), **extra))
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.rows, f, indent=1)
        os.replace(tmp, self.path)
