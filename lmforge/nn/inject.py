"""Module injection: swap chosen submodules of a model for new ones, in place.

Quantization replaces `nn.Linear` layers with quantized ones; adapters and LoRA wrap them. All of
them walk the model the same way: pick modules by name and type, build the replacement from the
original, and set it where the original was.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def replace_modules(root: nn.Module, select: Callable[[str, nn.Module], bool],
                    build: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace every submodule `select(name, module)` picks by `build(name, module)`; return their names.

    Only names are kept between replacements, so a replaced module (and, say, its float weights) is freed as
    soon as it is replaced, not when the last one is."""
    chosen = [name for name, module in root.named_modules() if name and select(name, module)]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, build(name, getattr(parent, child)))
    return chosen
