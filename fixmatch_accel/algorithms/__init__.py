"""Semi-supervised objectives as pure functions of logits: no loop, data or Accelerator.

Each module named below declares one algorithm and registers it (registry.py), in --help's order.
"""

import importlib

from .registry import ALGORITHMS  # noqa: F401

MODULES = ("fixmatch", "flexmatch", "freematch", "softmatch", "adamatch")
for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")
