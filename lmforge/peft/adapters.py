"""Bottleneck adapters (Houlsby et al., 2019): a small trainable detour inside a frozen transformer.

An adapter projects a sublayer's output down to `bottleneck` dimensions, applies a nonlinearity
and projects back up, adding the result to what it read: y + up(gelu(down(y))). It sits after the
attention output projection (`self_attn.o_proj`) and after the feed-forward (`mlp.down_proj`),
before the residual add, so one path serves BERT, GPT-2, Llama and BART alike: they all use those
names. The up-projection starts at zero, so an adapted model computes exactly what the original did
until training moves it; only the adapters (and a task head) then need gradients and storage.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import CheckpointError, ValidationError
from lmforge.nn.inject import replace_modules

ADAPTERS_KEY = "adapters"  # the config.json block that records them, so from_pretrained rebuilds them
FORMAT_VERSION = 1
PLACES = {"attention": ("self_attn.o_proj",), "ffn": ("mlp.down_proj",)}
WHERE = ("attention", "ffn", "both")


class BottleneckAdapter(nn.Module):
    """x → up(gelu(down(x))): `dim` → `bottleneck` → `dim`, with the up-projection zero at init."""

    def __init__(self, dim: int, bottleneck: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck, dim, dtype=dtype, device=device)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)  # the detour adds exactly 0 until it is trained
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x)))


class AdapterLinear(nn.Linear):
    """A Linear layer followed by a residual adapter on its output: y = linear(x); y + adapter(y).

    It keeps the original `weight` and `bias` (the same Parameter objects, under the same names),
    so checkpoints of the plain model load into it unchanged; the adapter's tensors live under
    `<layer>.adapter.`.
    """

    def __init__(self, linear: nn.Linear, bottleneck: int):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.adapter = BottleneckAdapter(linear.out_features, bottleneck, linear.weight.dtype, linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.adapter(y)


def adapter_targets(where: str) -> tuple[str, ...]:
    """The module-name endings adapters follow for `where` = "attention", "ffn" or "both"."""
    if where not in WHERE:
        raise ValidationError(f"adapters go after 'attention', 'ffn' or 'both'; got where={where!r}.")
    return PLACES["attention"] + PLACES["ffn"] if where == "both" else PLACES[where]


def add_adapters(model: nn.Module, bottleneck: int = 64, where: str = "both") -> list[str]:
    """Put a bottleneck adapter after every attention output and/or feed-forward of `model`, in place.

    Returns the names of the wrapped layers. The adapters are recorded in `model.config.extra`, so
    `save_pretrained` writes a folder that `from_pretrained` loads back with them (see
    `prepare_adapter_layers`). Nothing is frozen here: `lmforge.peft.freezing.adapter_tuning` does that.
    """
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValidationError(f"the adapter bottleneck must be an integer >= 1, got {bottleneck!r}.")
    if any(isinstance(module, AdapterLinear) for module in model.modules()):
        raise ValidationError(f"{type(model).__name__} already has adapters; load the original model again to "
                              "add adapters of another size or place.")
    targets = adapter_targets(where)
    names = replace_modules(model, lambda name, module: type(module) is nn.Linear and name.endswith(targets),
                            lambda name, module: AdapterLinear(module, bottleneck))
    if not names:
        raise ValidationError(f"{type(model).__name__} has no nn.Linear layer whose name ends with "
                              f"{' or '.join(targets)}; adapters follow lmforge's canonical module names "
                              "(a quantized model's layers cannot take them: add adapters before quantizing).")
    _record(model, bottleneck, names)
    return names


def _record(model: nn.Module, bottleneck: int, names: list[str]) -> None:
    extra = getattr(getattr(model, "config", None), "extra", None)
    if isinstance(extra, dict):  # a ModelConfig: save_pretrained writes the record into config.json
        extra[ADAPTERS_KEY] = {"format_version": FORMAT_VERSION, "bottleneck": bottleneck, "modules": names}


def read_adapter_block(block: Any, source: str) -> tuple[int, list[str]]:
    """(bottleneck, wrapped layer names) of a config.json adapters block, checked."""
    fix = "re-create the folder with add_adapters + save_pretrained (or `lmforge finetune --method adapter`)."
    if not isinstance(block, dict) or block.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{source}: config.json's {ADAPTERS_KEY!r} must be an object with format_version "
                              f"{FORMAT_VERSION}; {fix}")
    bottleneck, names = block.get("bottleneck"), block.get("modules")
    if (not isinstance(bottleneck, int) or bottleneck < 1 or not isinstance(names, list) or not names
            or not all(isinstance(name, str) for name in names)):
        raise CheckpointError(f"{source}: config.json's {ADAPTERS_KEY!r} needs 'bottleneck' (an integer >= 1) and "
                              f"'modules' (a list of layer names); {fix}")
    return bottleneck, names


def prepare_adapter_layers(model: nn.Module, block: Any, source: str) -> list[str]:
    """Wrap the layers an adapters block lists, before their weights are loaded; returns their names."""
    bottleneck, names = read_adapter_block(block, source)
    modules = dict(model.named_modules())
    for name in names:
        if type(modules.get(name)) is not nn.Linear:
            raise CheckpointError(f"{source}: config.json lists {name!r} as an adapted layer, but "
                                  f"{type(model).__name__} has no Linear layer of that name; load the folder with "
                                  "the class that saved it (config.json 'architectures').")
    wanted = set(names)
    wrapped = replace_modules(model, lambda name, module: name in wanted,
                              lambda name, module: AdapterLinear(module, bottleneck))
    _record(model, bottleneck, wrapped)
    return wrapped


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapters' own parameters (`….adapter.down.weight`, …)."""
    return [f"{module_name}.{name}" for module_name, module in model.named_modules()
            if isinstance(module, BottleneckAdapter) for name, _ in module.named_parameters()]
