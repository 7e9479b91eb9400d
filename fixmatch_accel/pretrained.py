"""Pretrained weights for a model: timm's (hub or cache) or a local file's, read without unpickling code, with a
new classifier; and the preprocessing the weights expect. Every failure is one line naming the model or file.
"""

import pickle
import re
import textwrap
from typing import Dict, List, Optional

import timm
import torch
from timm.models import clean_state_dict, get_pretrained_cfg, is_model_pretrained
from torch import nn

from .config import BUILTIN_INPUT_SIZES, BUILTIN_MODEL_NAMES
from .errors import UsageError, describe

# Pretrained weights. Nothing unpickles code: timm 1.0.31 reads a `pretrained_cfg_overlay=dict(file=...)` with
# torch.load(weights_only=True) and no unsafe fallback, but that is recent (older timm did not always pass
# weights_only=True, and torch < 2.6, which setup.cfg allows, defaults to False). So the file is read here, as
# safetensors or with torch.load(weights_only=True), and handed to timm as a state dict
# (pretrained_cfg_overlay=dict(state_dict=...)): timm still applies the model's checkpoint filter and input-channel
# adaptation. Hub weights come through timm's own loaders (safetensors, else torch.load with weights_only=True).


def read_weights(path: str) -> Dict[str, torch.Tensor]:
    """The state dict in a safetensors or torch file, read without unpickling code (a UsageError otherwise).

    A training checkpoint's weights are found under state_dict_ema / model_ema / state_dict / model, as timm
    does; DDP's `module.` and torch.compile's `_orig_mod.` prefixes are dropped.
    """
    what = f"--pretrained_file {path!r}"
    fix = ("save the weights alone: safetensors.torch.save_file(model.state_dict(), PATH) or "
           "torch.save(model.state_dict(), PATH)")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            checkpoint = load_file(path, device="cpu")
        else:
            with _allow_namespace():  # timm's training checkpoints keep their argparse.Namespace in `args`
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler refused it: code, objects or not a pickle
        found = _unsafe_globals(path, e)
        if found:
            raise UsageError(f"{what} holds pickled code or objects ({', '.join(found)}), which are never "
                             f"unpickled here; {fix}") from None
        raise UsageError(f"{what} is neither a safetensors file nor a torch file of plain tensors (torch's "
                         f"weights-only loader refused it; code is never unpickled here); {fix}") from None
    except Exception as e:  # truncated, not a weights file, unreadable
        raise UsageError(f"{what} is not a readable safetensors or torch weights file ({describe(e)}); {fix}") from None
    if isinstance(checkpoint, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not checkpoint or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        raise UsageError(f"{what} holds no state dict (a mapping of names to tensors) but a "
                         f"{type(checkpoint).__name__}; {fix}")
    return clean_state_dict(checkpoint)


def _is_safetensors(path: str) -> bool:
    """By name, or by content: 8 bytes of header length, then the JSON header."""
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100 * 2**20


def _allow_namespace():
    import argparse
    import contextlib

    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()


def _unsafe_globals(path: str, error: Exception) -> List[str]:
    """The functions or classes a refused pickle names (torch's scan of a torch.save file, else its message)."""
    try:
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch.save zip file, or torch < 2.5
        found = []
    return found or re.findall(r"GLOBAL ([\w.]+)", str(error))


def load_builtin(model: nn.Module, name: str, path: str) -> None:
    """A built-in model from a run's weights (its model.safetensors): all but `fc`, which keeps its new init."""
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    state_dict = {k: v for k, v in read_weights(path).items() if not k.startswith("fc.")}
    try:
        model.load_state_dict({**state_dict, **head})
    except RuntimeError as e:
        raise UsageError(_wrong_weights(path, name, e)) from None


def timm_from_file(name: str, num_classes: int, in_chans: int, path: str, create=timm.create_model) -> nn.Module:
    """timm's model with the file's weights loaded strictly, then a new classifier.

    timm drops a classifier whose class count differs from its config's and then loads non-strictly: a file
    of another architecture would load nothing, silently. So the file's classifier tensors are swapped here
    for placeholders of the model's shape, the config says `num_classes` classes, and timm loads strictly
    (every tensor present, no extra, same shapes). A file without a classifier (saved with num_classes=0)
    loads strictly into the model built without one.
    """
    state_dict = read_weights(path)
    cfg = get_pretrained_cfg(name)
    classifiers = (cfg.classifier if cfg is not None else None) or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    heads = [c for c in classifiers if c + ".weight" in state_dict]
    for c in heads:
        for key in (c + ".weight", c + ".bias"):
            if key in state_dict:
                t = state_dict[key]
                state_dict[key] = torch.zeros((num_classes, *t.shape[1:]), dtype=t.dtype)
    head_classes = num_classes if heads else 0
    overlay = dict(state_dict=state_dict, num_classes=head_classes, label_offset=0)
    try:
        model = create(name, pretrained=True, num_classes=head_classes, in_chans=in_chans,
                       pretrained_cfg_overlay=overlay)
    except UsageError:  # the model itself refused a flag: said as it is
        raise
    except Exception as e:  # missing, unexpected or misshapen tensors (load_state_dict), or the model's filter
        raise UsageError(_wrong_weights(path, name, e)) from None
    return _new_classifier(model, num_classes)


def timm_from_hub(name: str, num_classes: int, in_chans: int, create=timm.create_model) -> nn.Module:
    """timm's own pretrained weights (Hugging Face cache or download), then a new classifier."""
    cfg = get_pretrained_cfg(name)
    if not is_model_pretrained(name) or cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UsageError(f"--pretrained: timm has no pretrained weights for --model {name} "
                         "(timm.list_pretrained() lists the models that have); give a weights file with "
                         "--pretrained_file PATH, or train from random init without --pretrained")
    try:
        model = create(name, pretrained=True, num_classes=num_classes, in_chans=in_chans)
    except Exception as e:
        if not _is_download_error(e):
            raise
        raise UsageError(_no_hub_weights(name, cfg.hf_hub_id or cfg.url, e)) from None
    return _new_classifier(model, num_classes)


def _new_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """A freshly initialised classifier for the dataset's classes (timm keeps a loaded one whose class count
    matches the weights'); the model's config drops the state dict it was handed (a second copy of the weights)."""
    model.reset_classifier(num_classes)
    cfg = dict(model.pretrained_cfg)
    cfg.pop("state_dict", None)
    model.pretrained_cfg = model.default_cfg = dict(cfg, num_classes=num_classes)
    return model


def _is_download_error(e: BaseException) -> bool:
    """A failure to fetch weights: no network, hub offline and not cached, HTTP errors (gated, missing repo)."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("huggingface_hub", "httpx", "requests",
                                                                           "urllib3")


def _no_hub_weights(name: str, where: str, e: BaseException) -> str:
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        why = f"are not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set ({type(e).__name__})"
    else:
        why = f"could not be downloaded and are not in the Hugging Face cache {cache} ({describe(e)})"
    return (f"--pretrained: timm's weights for --model {name} ({where}) {why}; fetch them once where the hub is "
            f"reachable (they are cached under HF_HOME / HF_HUB_CACHE) and run with HF_HUB_OFFLINE=1, or give a "
            f"local weights file with --pretrained_file PATH")


def _wrong_weights(path: str, name: str, e: BaseException) -> str:
    """`PATH does not hold weights for --model NAME (what differs)`, one line: load_state_dict's report counted."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, RuntimeError) and len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        parts, mismatches = [], [line for line in lines[1:] if line.startswith("size mismatch for ")]
        for line in lines[1:]:
            keys = re.findall(r'"([^"]+)"', line)
            for kind in ("Missing", "Unexpected"):
                if line.startswith(f"{kind} key(s)") and keys:
                    parts.append(f"{len(keys)} {kind.lower()} tensor(s), e.g. {', '.join(keys[:3])}")
        if mismatches:
            m = re.match(r"size mismatch for (\S+): .*?torch\.Size\((\[.*?\])\).*?torch\.Size\((\[.*?\])\)",
                         mismatches[0])
            first = f"{m[1]} {m[2]} in the file, {m[3]} in the model" if m else textwrap.shorten(mismatches[0], 200)
            parts.append(f"{len(mismatches)} of another shape, e.g. {first}")
        detail = "; ".join(parts) or textwrap.shorten(lines[1], 300)
    else:
        detail = describe(e)
    return (f"--pretrained_file {path!r} does not hold weights for --model {name} ({detail}); give weights "
            f"saved from a {name} model")


def model_input_side(name: str) -> Optional[int]:
    """The image side --model was made for, weights or not: a built-in's, else timm's pretrained_cfg input size;
    None when neither knows."""
    if name in BUILTIN_INPUT_SIZES:
        return BUILTIN_INPUT_SIZES[name]
    try:
        data = pretrained_preprocessing(name)
    except Exception:  # not a timm name: create_model says so, naming the flag
        return None
    return data["input_size"][-1] if data else None


def pretrained_preprocessing(name: str) -> Optional[Dict]:
    """How --model's pretrained weights expect images (timm's resolve_data_config of its pretrained_cfg):
    input_size, interpolation, mean, std; None when timm has no pretrained configuration for it."""
    if name in BUILTIN_MODEL_NAMES:
        return None
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(name)
    if pretrained_cfg is None:
        return None
    data = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
    return dict(input_size=list(data["input_size"]), interpolation=data["interpolation"], mean=list(data["mean"]),
                std=list(data["std"]))
