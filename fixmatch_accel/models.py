"""Models: Wide ResNets as in the FixMatch paper, a small CNN for the demo, any timm model (pretrained too).

The WRNs follow the paper's code (pre-activation blocks, BatchNorm momentum 0.001,
LeakyReLU 0.1); timm has Wide ResNets only in the ImageNet layout, so these are
written here.
"""

from functools import partial
from typing import Dict, Optional

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

from .config import builtin_without_weights
from .errors import UsageError
from .pretrained import load_builtin, timm_from_file, timm_from_hub

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
            load_builtin(model, name, pretrained_file)
        return model
    if not timm.is_model(name):
        raise UsageError(
            f"--model {name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a timm model name"
        )
    create = partial(_timm_create, image_size=image_size)
    if pretrained_file is not None:
        return timm_from_file(name, num_classes, in_chans, pretrained_file, create)
    if pretrained:
        return timm_from_hub(name, num_classes, in_chans, create)
    return create(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)


def _timm_create(name: str, image_size: Optional[int] = None, **kwargs) -> nn.Module:
    """timm.create_model, built for `image_size` when that is not the model's own and the model takes an
    img_size (ViTs and the like; a convnet takes any size and refuses the argument before loading anything)."""
    cfg = get_pretrained_cfg(name)
    if image_size is not None and (cfg is None or tuple(cfg.input_size[-2:]) != (image_size, image_size)):
        try:
            model = timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
        else:
            check_patches_tile(name, model, image_size)
            return model
    return timm.create_model(name, **kwargs)


def model_args(model: nn.Module) -> Dict:
    """What timm needs, besides the architecture, to build the model again from a run folder (config.json's
    `model_args`, read by timm.create_model("local-dir:RUN")): a patch model's image size, which sizes its
    position embeddings."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return {"img_size": list(size)} if size is not None else {}


def check_patches_tile(name: str, model: nn.Module, image_size: int):
    """A patch model's patches must tile the image: timm would silently drop the pixels past the last patch."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None and image_size % patch[0]:
        smaller, larger = image_size // patch[0] * patch[0], (image_size // patch[0] + 1) * patch[0]
        raise UsageError(f"--image_size {image_size} is not a multiple of {name}'s patch size {patch[0]}: "
                         f"use {f'{smaller} or ' if smaller else ''}{larger}")
