"""QuantizedLinear: a drop-in `nn.Linear` whose weight is stored in a quantized format.

On the CPU, a few rows at a time (decoding) go through a compiled kernel that reads the packed
bits directly (`kernels.py`): that is where quantization pays, since a decode step is bound by
the bytes of weight it reads. Many rows (a prompt) and other devices dequantize the weight and run
an ordinary matmul, which is also the reference the kernels are tested against. Like llama.cpp,
int8 and int4 layers round the activations to int8 (per 32 values) where the CPU multiplies bytes
fast, in the kernels and in the CPU's fp32 matmul, so a row's result does not depend on how many rows
share the call up to the kernels' row limits; beyond them, where the CPU multiplies bf16 much faster
than fp32 (AMX), the matmul takes bfloat16 activations and weights instead. `exact_activations = True`
on a layer (or on the class) keeps float32 throughout, as do gradients (training) and other devices.
The bias, when there is one, stays in floating point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import hardware
from lmforge.errors import ConfigError
from lmforge.quant import kernels
from lmforge.quant.formats import FORMATS, QuantizedWeight

ROW_CHUNK = 4096
"""Rows quantized at a time by `QuantizedLinear.from_linear` (row-wise formats)."""


class QuantizedLinear(nn.Module):
    exact_activations = False
    """Whether the CPU kernels multiply float32 activations (exact to float rounding against the dequantized
    weight) instead of int8-rounded ones (llama.cpp's numerics, several times faster for 4-bit weights)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.method = weight.name
        self.out_features, self.in_features = weight.shape
        # The packed tensors are buffers, so .to(device) moves them and state_dict() saves them.
        self._tensor_names = list(weight.tensors())
        self._settings = {k: v for k, v in vars(weight).items() if k not in self._tensor_names}
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._kernel_weight: kernels.KernelWeight | None = None  # built on the first CPU decode step

    def _apply(self, fn, recurse=True):
        """Moves and casts apply to the bias; the format's scales stay float32 (their precision is part of
        the format: a bfloat16 scale would add error on top of the quantization's own)."""
        super()._apply(fn, recurse)
        self._kernel_weight = None  # the buffers are new tensors now
        for name in self._tensor_names:
            if self._buffers[name].is_floating_point():
                self._buffers[name] = self._buffers[name].float()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_weight = None  # loading may assign new tensors
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def weight_format(self) -> QuantizedWeight:
        """The quantized weight, over the module's current buffers."""
        tensors = {name: getattr(self, name) for name in self._tensor_names}
        return FORMATS[self.method](**tensors, **self._settings)

    @classmethod
    def concatenate(cls, layers: list[QuantizedLinear]) -> QuantizedLinear | None:
        """One layer computing `layers` side by side (q/k/v, gate/up), or None when they cannot share one.

        Rows are independent in the row-major formats (int8, int4), so stacking each packed tensor along
        the rows is exact; the children's buffers become views into the stacked ones (no second copy)."""
        first = layers[0]
        if not FORMATS[first.method].row_wise or any(
                layer.method != first.method or layer._settings != first._settings
                or layer.in_features != first.in_features for layer in layers):
            return None
        if sum(layer.bias is not None for layer in layers) not in (0, len(layers)):
            return None
        tensors = {name: torch.cat([getattr(layer, name) for layer in layers]) for name in first._tensor_names}
        bias = torch.cat([layer.bias for layer in layers]) if first.bias is not None else None
        fused = cls(FORMATS[first.method](**tensors, **first._settings), bias)
        start = 0
        for layer in layers:
            rows = slice(start, start + layer.out_features)
            for name in layer._tensor_names:
                layer._buffers[name] = getattr(fused, name)[rows]
            if bias is not None:
                layer.bias = nn.Parameter(fused.bias[rows], requires_grad=False)
            layer._kernel_weight = None
            start += layer.out_features
        return fused

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, **options) -> QuantizedLinear:
        """Quantize an `nn.Linear` with `method` ("int8", "int4" with group_size, "nf4").

        Formats whose rows are independent (int8, int4) quantize ROW_CHUNK rows at a time: their float
        temporaries stay a few MB instead of several copies of a large matrix (SmolLM2's tied head: 113 MB)."""
        if method not in FORMATS:
            raise ConfigError(f"unknown quantization method {method!r}; use one of: {', '.join(FORMATS)}.")
        fmt, weight = FORMATS[method], linear.weight
        if not fmt.row_wise or weight.dim() != 2 or weight.shape[0] <= ROW_CHUNK:
            return cls(fmt.quantize(weight, **options), linear.bias)
        first = fmt.quantize(weight[:ROW_CHUNK], **options)
        rows = weight.shape[0]  # the whole tensors first, each chunk written into them (no list of parts to join)
        tensors = {name: tensor.new_empty((rows, *tensor.shape[1:])) for name, tensor in first.tensors().items()}
        for start in range(0, rows, ROW_CHUNK):
            part = first if start == 0 else fmt.quantize(weight[start:start + ROW_CHUNK], **options)
            for name, tensor in part.tensors().items():
                tensors[name][start:start + tensor.shape[0]] = tensor
        settings = {k: v for k, v in vars(first).items() if k not in tensors}
        return cls(fmt(**tensors, **settings), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        rows = x.numel() // self.in_features
        kernel = self.cpu_kernel() if x.device.type == "cpu" and not x.requires_grad else None
        if kernel is not None:
            if rows <= kernel.max_rows:
                out = kernel(x.reshape(rows, self.in_features).float())
                out = out.to(x.dtype).view(*x.shape[:-1], self.out_features)
                return out if bias is None else out + bias
            if self._bfloat16_matmul(x):
                out = F.linear(x.bfloat16(), self.weight_format.dequantize().bfloat16()).float()
                return out if bias is None else out + bias
            if kernel.inputs == "int8":  # many rows compute what the kernel would, in one matmul
                x = kernels.round_activations(x).to(x.dtype)
        return F.linear(x, self.weight_format.dequantize().to(device=x.device, dtype=x.dtype), bias)

    def _bfloat16_matmul(self, x: torch.Tensor) -> bool:
        """Whether many float32 rows (a prompt) multiply in bfloat16: where this CPU does bf16 matmuls much faster
        than fp32 (AMX: `hardware.fast_batched_dtype`), unless the layer keeps exact activations. bf16 keeps 8
        significant bits — about the rounding of the kernels' int8 activations — and the matmul sums in float32."""
        return (not self.exact_activations and x.dtype == torch.float32
                and hardware.fast_batched_dtype("cpu") == torch.bfloat16)

    def cpu_kernel(self) -> kernels.KernelWeight | None:
        """The compiled CPU kernel over this layer's buffers (built on first use, and again after a move, a load or
        a change of `exact_activations`), or None where no kernel reads the format."""
        stale = self._kernel_weight is None or self._kernel_weight.exact_activations != self.exact_activations
        if stale and kernels.supports(self.weight_format):
            self._kernel_weight = kernels.KernelWeight(self.weight_format, self.exact_activations)
        return self._kernel_weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.weight_format.name}, bytes={self.weight_format.nbytes()}")


def parameter_count(model: nn.Module) -> int:
    """The model's parameters, counting the weights quantized layers hold packed (buffers, which
    `parameters()` does not list) as the parameters they stand for."""
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return sum(p.numel() for p in model.parameters()) + packed
