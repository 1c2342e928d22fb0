"""Fused projections: several Linear layers that read the same input, done as one matmul.

q/k/v (and an MLP's gate/up) all multiply the same activations. One matmul over
their concatenated weights reads the input once and replaces three small kernel
launches by one larger, faster one — it matters most when decoding one token.
This is an inference-time transform: the canonical modules (`q_proj`, ...) stay
in place with their names and the same Parameter objects, whose data become views
into the fused matrix (no copy, so checkpoints, optimizers, in-place updates and
LoRA targeting still see them), and `unfuse` undoes it. The fused matmul runs only
while gradients are off (generation, evaluation): a forward that trains goes through
the separate layers, so their parameters get their gradients. Quantized layers whose
class can `concatenate` them (lmforge.quant's QuantizedLinear) fuse the same way, into
one quantized layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusedProjections:
    """Mixin for modules with Linear children that share an input (`fused_groups`: fused name → children)."""

    fused_groups: dict[str, tuple[str, ...]] = {}

    def fuse(self) -> None:
        """Concatenate each group's weights into one buffer; the children's weights become views of it."""
        for fused, names in self.fused_groups.items():
            layers = [getattr(self, name) for name in names]
            if getattr(self, f"{fused}_weight", None) is not None:
                continue  # already fused
            if fused in self.__dict__.get("_fused_modules", {}):
                continue
            if all(type(layer) is type(layers[0]) for layer in layers) and hasattr(layers[0], "concatenate"):
                self._fuse_modules(fused, layers)
                continue
            if not all(type(layer) is nn.Linear for layer in layers):
                continue  # wrapped (e.g. by an adapter): leave it unfused
            has_bias = [layer.bias is not None for layer in layers]
            if any(has_bias) and not all(has_bias):
                continue
            self._fuse_group(fused, layers, all(has_bias))

    def _fuse_group(self, fused: str, layers: list[nn.Linear], bias: bool) -> None:
        with torch.no_grad():
            weight = torch.cat([layer.weight for layer in layers])
            biases = torch.cat([layer.bias for layer in layers]) if bias else None
        self.register_buffer(f"{fused}_weight", weight, persistent=False)
        self.register_buffer(f"{fused}_bias", biases, persistent=False)
        self.__dict__.setdefault("_fused_sizes", {})[fused] = [layer.out_features for layer in layers]
        self._point_children_at(fused, layers)

    def _fuse_modules(self, fused: str, layers: list[nn.Module]) -> None:
        """Layers that know how to stack themselves (quantized ones) become one module of that kind."""
        module = type(layers[0]).concatenate(layers)
        if module is not None:  # kept out of the module tree: the children still own (views of) its tensors
            self.__dict__.setdefault("_fused_modules", {})[fused] = module
            self.__dict__.setdefault("_fused_sizes", {})[fused] = [layer.out_features for layer in layers]

    def _point_children_at(self, fused: str, layers: list[nn.Linear]) -> None:
        weight, bias = getattr(self, f"{fused}_weight"), getattr(self, f"{fused}_bias")
        start = 0
        for layer in layers:
            rows = layer.out_features
            layer.weight.data = weight[start:start + rows]  # the same Parameter: an optimizer keeps tracking it
            if bias is not None:
                layer.bias.data = bias[start:start + rows]
            start += rows

    def unfuse(self) -> None:
        """Give each child its own weight again and drop the fused buffers."""
        for fused in list(self.__dict__.get("_fused_modules", {})):
            for name in self.fused_groups[fused]:
                layer = getattr(self, name)
                layer._apply(lambda t: t.clone())  # own storage again (views of the stacked tensors before)
            del self._fused_modules[fused]
            del self._fused_sizes[fused]
        for fused, names in self.fused_groups.items():
            if getattr(self, f"{fused}_weight", None) is None:
                continue
            for name in names:
                layer = getattr(self, name)
                layer.weight.data = layer.weight.data.clone()
                if layer.bias is not None:
                    layer.bias.data = layer.bias.data.clone()
            delattr(self, f"{fused}_weight")
            delattr(self, f"{fused}_bias")
            del self._fused_sizes[fused]

    def fused_output(self, fused: str, x: torch.Tensor) -> torch.Tensor | None:
        """The group's outputs side by side ([..., sum of out_features]) from one matmul, or None if unfused
        (or if gradients are on: the fused buffers are not the parameters a backward pass must reach)."""
        if fused not in self.__dict__.get("_fused_sizes", {}) or torch.is_grad_enabled():
            return None
        modules = self.__dict__.get("_fused_modules")
        if modules and fused in modules:
            return modules[fused](x)
        buffers = self._buffers
        return F.linear(x, buffers[f"{fused}_weight"], buffers[f"{fused}_bias"])

    def fused_outputs(self, fused: str, x: torch.Tensor) -> list[torch.Tensor] | None:
        """The group's outputs from one matmul, split per layer, or None when the group is not fused."""
        out = self.fused_output(fused, x)
        return None if out is None else list(out.split(self._fused_sizes[fused], dim=-1))

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() convert parameters and buffers separately; re-link the views afterwards. A fused
        # module kept outside the tree would be left behind: drop it (generation fuses again when it starts).
        for fused in list(self.__dict__.get("_fused_modules", {})):
            del self._fused_modules[fused]
            del self._fused_sizes[fused]
        module = super()._apply(fn, recurse)
        for fused, names in self.fused_groups.items():
            if getattr(self, f"{fused}_weight", None) is not None:
                self._point_children_at(fused, [getattr(self, name) for name in names])
        return module


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse q/k/v and gate/up everywhere in `model` (idempotent); returns the model."""
    for module in model.modules():
        if isinstance(module, FusedProjections):
            module.fuse()
    return model


def unfuse_projections(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, FusedProjections):
            module.unfuse()
    return model
