"""LoRA (Hu et al., 2021): learn a low-rank update of frozen weight matrices.

A linear layer computes y = W x. LoRA keeps W frozen and adds a trainable detour
through r dimensions: y = W x + (alpha / r) · B A x, with A of shape [r, in] and
B of shape [out, r]. A 4096×4096 layer has 16.8M weights; at rank 8 LoRA trains
4096·8 + 8·4096 = 65,536. A starts random (Kaiming, like nn.Linear) and B at zero,
so training starts from exactly the base model. After training, B A can be added
into W (`merge_lora`): the model is then as fast as the original.

The layer keeps its class's own forward and parameters: `add_lora` turns each
chosen layer into a subclass of its own class (LoraLinear for nn.Linear,
LoraQuantizedLinear for a quantized base, which is QLoRA) that adds `lora_A`,
`lora_B` and `lora_dropout` children. So the base weights keep their names
(`…q_proj.weight`) and base checkpoints load unchanged, and any Linear-like layer
can take an adapter. `merge_and_unload` turns them back into their base class.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.errors import ValidationError
from lmforge.nn.fusion import unfuse_projections
from lmforge.nn.inject import replace_modules
from lmforge.quant.linear import QuantizedLinear

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
LINEAR_TYPES = (nn.Linear, QuantizedLinear)


@dataclass
class LoraConfig:
    """Which layers get a low-rank update and how large it is.

    `target_modules`: layer names (a name matches a module whose full name equals it or ends
    with "." + it, e.g. "q_proj"), or "all-linear" for every linear layer of the backbone
    (not the output head). `lora_alpha / r` scales the update, so the learning rate need not
    change with the rank. `modules_to_save` are trained fully beside LoRA (e.g. a new
    classification head, "classifier").
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: Sequence[str] | str = ("q_proj", "v_proj")
    modules_to_save: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValidationError(f"LoRA rank r must be an integer >= 1, got {self.r!r}.")
        if not self.lora_alpha > 0:
            raise ValidationError(f"lora_alpha must be > 0, got {self.lora_alpha!r}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValidationError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            self.target_modules = (self.target_modules,)
        if not self.target_modules:
            raise ValidationError(f"target_modules is empty; name layers (e.g. ['q_proj', 'v_proj']) or "
                                  f"pass {ALL_LINEAR!r}.")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


class LoraLayer(nn.Module):
    """Mixed into a linear layer's class: its output plus scaling · B(A(dropout(x))).

    `lora_enabled` switches the update off (the base layer alone, e.g. a DPO reference
    model without a second copy in memory); `lora_merged` says B A is already in the weight.
    """

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_dropout: nn.Module
    lora_scaling: float
    lora_enabled: bool
    lora_merged: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = super().forward(x)
        if self.lora_enabled and not self.lora_merged:
            update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
            output = output + (update * self.lora_scaling).to(output.dtype)
        return output

    @classmethod
    def concatenate(cls, layers: list[nn.Module]) -> None:
        """Never fused with its siblings (as plain q/k/v layers are): each adds its own update."""
        return None

    def delta_weight(self) -> torch.Tensor:
        """The update as a full [out, in] matrix: scaling · B A."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.lora_scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_r={self.lora_A.out_features}, lora_scaling={self.lora_scaling:g}"


@functools.cache
def lora_class(base: type) -> type:
    """The LoRA version of a linear layer class (cached, so every LoRA nn.Linear shares one class)."""
    return type(f"Lora{base.__name__}", (LoraLayer, base), {"__doc__": f"{base.__name__} with a LoRA update."})


def base_class(layer: LoraLayer) -> type:
    return next(cls for cls in type(layer).__mro__[1:] if cls is not LoraLayer and not issubclass(cls, LoraLayer))


def _attach(layer: nn.Module, config: LoraConfig, name: str) -> nn.Module:
    if config.r > min(layer.in_features, layer.out_features):
        raise ValidationError(f"LoRA rank {config.r} is larger than layer {name} ({layer.out_features}×"
                              f"{layer.in_features}); a rank above min(out, in) adds nothing. Lower r.")
    reference = layer.weight if isinstance(layer, nn.Linear) else next(layer.buffers())
    # adapters train in the base's float dtype; a quantized base (integer codes) gets float32 ones
    dtype = reference.dtype if reference.is_floating_point() else torch.float32
    device = reference.device
    layer.__class__ = lora_class(type(layer))
    layer.lora_A = nn.Linear(layer.in_features, config.r, bias=False, device=device, dtype=dtype)
    layer.lora_B = nn.Linear(config.r, layer.out_features, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own initialisation
        nn.init.zeros_(layer.lora_B.weight)  # so the update starts at exactly zero
    layer.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
    layer.lora_scaling, layer.lora_enabled, layer.lora_merged = config.scaling, True, False
    return layer


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == target or name.endswith("." + target) for target in targets)


def _backbone_prefix(model: nn.Module) -> str:
    """Layers under this prefix are the backbone's ("model." in lmforge's task models)."""
    return "" if getattr(model, "is_backbone", True) else "model."


def select_targets(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """Names of the linear layers `targets` picks; an error listing the choices when none matches."""
    linear = [name for name, module in model.named_modules()
              if isinstance(module, LINEAR_TYPES) and not isinstance(module, LoraLayer)]
    if targets == ALL_LINEAR:
        chosen = [name for name in linear if name.startswith(_backbone_prefix(model))]
    else:
        chosen = [name for name in linear if _matches(name, targets)]
    if not chosen:
        choices = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValidationError(f"target_modules {list(targets) if targets != ALL_LINEAR else targets} match no linear "
                              f"layer of {type(model).__name__}; its layers are named {choices} "
                              f"(or use {ALL_LINEAR!r}).")
    return chosen


def add_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Give the layers `config.target_modules` names a LoRA update, in place, and freeze everything
    except the LoRA matrices and `config.modules_to_save`; return the adapted layers' names."""
    if any(isinstance(module, LoraLayer) for module in model.modules()):
        raise ValidationError(f"{type(model).__name__} already has LoRA layers; merge_and_unload() them first, or "
                              "load the base model again to start over.")
    unfuse_projections(model)  # a fused q/k/v matmul would bypass the adapted layers
    saved = _modules_to_save(model, config.modules_to_save)
    chosen = set(select_targets(model, config.target_modules))
    names = replace_modules(model, lambda name, module: name in chosen,
                            lambda name, module: _attach(module, config, name))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for layer in lora_layers(model).values():
        for parameter in (layer.lora_A.weight, layer.lora_B.weight):
            parameter.requires_grad_(True)
    for module in saved.values():
        for parameter in module.parameters():
            if parameter.is_floating_point():
                parameter.requires_grad_(True)
    model.lora_config = config
    return names


def _modules_to_save(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    found = {}
    for wanted in names:
        matches = [name for name in modules if name and _matches(name, [wanted])]
        if not matches:
            raise ValidationError(f"modules_to_save {wanted!r} matches no module of {type(model).__name__}; "
                                  f"top-level modules are {sorted(n for n in modules if n and '.' not in n)}.")
        found.update({name: modules[name] for name in matches})
    return found


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _require_lora(model: nn.Module) -> dict[str, LoraLayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValidationError(f"{type(model).__name__} has no LoRA layers; add them with add_lora() or load_lora().")
    return layers


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA update on or off (off: the model computes exactly its base)."""
    for layer in _require_lora(model).values():
        layer.lora_enabled = enabled


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`with lora_disabled(model):` runs the base model, e.g. as the frozen reference of DPO."""
    layers = _require_lora(model)
    before = {name: layer.lora_enabled for name, layer in layers.items()}
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.lora_enabled = before[name]


@torch.no_grad()
def _add_to_weight(layer: LoraLayer, sign: int) -> None:
    if isinstance(layer, QuantizedLinear):
        raise ValidationError("a quantized base cannot merge and keep its adapter apart; use merge_and_unload(), "
                              "which re-quantizes the merged weight.")
    layer.weight += sign * layer.delta_weight().to(layer.weight.dtype)


def merge_lora(model: nn.Module) -> None:
    """Add each B A into its weight (faster inference; `unmerge_lora` takes it out again)."""
    for layer in _require_lora(model).values():
        if not layer.lora_merged:
            _add_to_weight(layer, +1)
            layer.lora_merged = True


def unmerge_lora(model: nn.Module) -> None:
    """Subtract each merged B A from its weight again."""
    for layer in _require_lora(model).values():
        if layer.lora_merged:
            _add_to_weight(layer, -1)
            layer.lora_merged = False


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight and turn the layers back into their base class.

    A quantized base (QLoRA) is dequantized, gets the update added and is quantized again: the
    result carries the format's rounding error on top of the merged weight (a warning says so).
    """
    for name, layer in _require_lora(model).items():
        if isinstance(layer, QuantizedLinear):
            _merge_into_quantized(layer)
            logger.warning("%s: merging LoRA into a %s base re-quantizes the weight; expect that format's "
                           "rounding error on the merged update.", name, layer.method)
        elif layer.lora_merged and not layer.lora_enabled:
            _add_to_weight(layer, -1)
        elif layer.lora_enabled and not layer.lora_merged:
            _add_to_weight(layer, +1)
        for child in ("lora_A", "lora_B", "lora_dropout"):
            delattr(layer, child)
        for attribute in ("lora_scaling", "lora_enabled", "lora_merged"):
            layer.__dict__.pop(attribute, None)
        layer.__class__ = base_class(layer)
    model.__dict__.pop("lora_config", None)
    return model


def _merge_into_quantized(layer: LoraLayer) -> None:
    """Dequantize, add the update, quantize again in the same format and settings."""
    base = layer.weight_format
    merged = base.dequantize()
    if layer.lora_enabled:
        merged = merged + layer.delta_weight().float()
    options = ({"group_size": base.group_size} if hasattr(base, "group_size")
               else {"double_quant": getattr(base, "absmax_q", None) is not None})
    layer.replace_weight(type(base).quantize(merged, **options))
