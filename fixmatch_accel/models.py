"""Models: Wide ResNets as in the FixMatch paper, a small CNN for the demo, any timm model (pretrained too).

The WRNs follow the paper's code (pre-activation blocks, BatchNorm momentum 0.001,
LeakyReLU 0.1); timm has Wide ResNets only in the ImageNet layout, so these are
written here.
"""

import pickle
import re
import textwrap
from functools import partial
from typing import Dict, List, Optional

import timm
import torch
from timm.models import clean_state_dict, get_pretrained_cfg, is_model_pretrained
from torch import nn

from .config import builtin_without_weights
from .errors import UsageError, describe

BN_MOMENTUM = 0.001  # PyTorch momentum = 1 - TF decay 0.999, as in the paper's code.


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, activate_before_residual: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes, momentum=BN_MOMENTUM)
        self.relu1 = nn.LeakyReLU(0.1, inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes, momentum=BN_MOMENTUM)
        self.relu2 = nn.LeakyReLU(0.1, inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x):
        # The first block of the network feeds the activated input to the shortcut too.
        if not self.equal_in_out and self.activate_before_residual:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return out + (x if self.equal_in_out else self.shortcut(x))


class WideResNet(nn.Module):
    """WRN-d-k: `groups` stages of n pre-activation blocks, widths 16k, 32k, 64k, ...

    depth = 2*groups*n + groups + 1 (6n+4 for the usual three stages at 32x32; 8n+5 for
    the four stages of the paper's STL-10 network at 96x96). `first_stride` 2 halves the
    input in the first stage (USB's `wrn_var_37_2`) so a 96x96 image ends at 6x6.
    """

    def __init__(self, num_classes: int, depth: int = 28, widen_factor: int = 2, in_chans: int = 3,
                 groups: int = 3, first_stride: int = 1):
        super().__init__()
        if (depth - groups - 1) % (2 * groups):
            raise ValueError(f"a {groups}-stage WRN needs depth {2 * groups}n+{groups + 1}, got {depth}")
        n = (depth - groups - 1) // (2 * groups)
        widths = [16] + [16 * widen_factor << g for g in range(groups)]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for g in range(groups):
            stride = first_stride if g == 0 else 2
            for i in range(n):
                blocks.append(
                    _BasicBlock(
                        widths[g] if i == 0 else widths[g + 1],
                        widths[g + 1],
                        stride if i == 0 else 1,
                        activate_before_residual=(g == 0 and i == 0),
                    )
                )
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[-1], momentum=BN_MOMENTUM)
        self.relu = nn.LeakyReLU(0.1, inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.num_features = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallCNN(nn.Module):
    """Five 3x3 conv layers (32-64-128 wide) with BN and LeakyReLU: the CPU demo's model."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32):
        super().__init__()

        def conv(i, o):
            return [nn.Conv2d(i, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o), nn.LeakyReLU(0.1, inplace=True)]

        w = width
        self.features = nn.Sequential(
            *conv(in_chans, w), *conv(w, w), nn.MaxPool2d(2),
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w, num_classes)
        self.num_features = 4 * w

    def forward(self, x):
        return self.fc(self.features(x))


# name -> constructor(num_classes, in_chans)
BUILTIN_MODELS = {
    "wrn28_2": lambda c, i: WideResNet(c, 28, 2, i),
    "wrn28_8": lambda c, i: WideResNet(c, 28, 8, i),
    # STL-10 (96x96) in the paper: its TF `resnet` with 4 stages of 4 blocks, filters 32.
    "wrn37_2": lambda c, i: WideResNet(c, 37, 2, i, groups=4, first_stride=2),
    "small_cnn": lambda c, i: SmallCNN(c, i),
}


def create_model(name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False,
                 pretrained_file: Optional[str] = None, image_size: Optional[int] = None) -> nn.Module:
    """A built-in model by name, else a timm model: random init, or pretrained weights with a new classifier.

    `pretrained`: timm's own weights for `name` (Hugging Face cache, else downloaded). `pretrained_file`
    (implies `pretrained`): the weights of a local safetensors or weights-only torch file, for a timm model
    or, from a run's model.safetensors, for a built-in one. Either way every tensor but the classifier's
    comes from the weights, and the classifier is new, sized to `num_classes`. `image_size`: the input side,
    for timm models built for one (ViTs: timm resamples pretrained position embeddings to it).
    """
    if name in BUILTIN_MODELS:
        if pretrained and pretrained_file is None:
            raise UsageError(builtin_without_weights(name))
        model = BUILTIN_MODELS[name](num_classes, in_chans)
        if pretrained_file is not None:
            _load_builtin(model, name, pretrained_file)
        return model
    if not timm.is_model(name):
        raise UsageError(
            f"--model {name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a timm model name"
        )
    create = partial(_timm_create, image_size=image_size)
    if pretrained_file is not None:
        return _timm_from_file(name, num_classes, in_chans, pretrained_file, create)
    if pretrained:
        return _timm_from_hub(name, num_classes, in_chans, create)
    return create(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)


def _timm_create(name: str, image_size: Optional[int] = None, **kwargs) -> nn.Module:
    """timm.create_model, built for `image_size` when that is not the model's own and the model takes an
    img_size (ViTs and the like; a convnet takes any size and refuses the argument before loading anything)."""
    cfg = get_pretrained_cfg(name)
    if image_size is not None and (cfg is None or tuple(cfg.input_size[-2:]) != (image_size, image_size)):
        try:
            return timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(name, **kwargs)


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


def _load_builtin(model: nn.Module, name: str, path: str) -> None:
    """A built-in model from a run's weights (its model.safetensors): all but `fc`, which keeps its new init."""
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    state_dict = {k: v for k, v in read_weights(path).items() if not k.startswith("fc.")}
    try:
        model.load_state_dict({**state_dict, **head})
    except RuntimeError as e:
        raise UsageError(_wrong_weights(path, name, e)) from None


def _timm_from_file(name: str, num_classes: int, in_chans: int, path: str, create=timm.create_model) -> nn.Module:
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
    except Exception as e:  # missing, unexpected or misshapen tensors (load_state_dict), or the model's filter
        raise UsageError(_wrong_weights(path, name, e)) from None
    return _new_classifier(model, num_classes)


def _timm_from_hub(name: str, num_classes: int, in_chans: int, create=timm.create_model) -> nn.Module:
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


def pretrained_preprocessing(name: str) -> Optional[Dict]:
    """How --model's pretrained weights expect images (timm's resolve_data_config of its pretrained_cfg):
    input_size, interpolation, mean, std; None when timm has no pretrained configuration for it."""
    if name in BUILTIN_MODELS:
        return None
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(name)
    if pretrained_cfg is None:
        return None
    data = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
    return dict(input_size=list(data["input_size"]), interpolation=data["interpolation"], mean=list(data["mean"]),
                std=list(data["std"]))
