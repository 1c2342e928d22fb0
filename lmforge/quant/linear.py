"""QuantizedLinear: a drop-in `nn.Linear` whose weight is stored in a quantized format.

The forward pass dequantizes the weight and runs an ordinary matmul: correct on every device,
and the reference that faster fused kernels (which never materialise the fp32 weight) must
match. The bias, when there is one, stays in floating point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.quant.formats import FORMATS, QuantizedWeight


class QuantizedLinear(nn.Module):
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

    @property
    def weight_format(self) -> QuantizedWeight:
        """The quantized weight, over the module's current buffers."""
        tensors = {name: getattr(self, name) for name in self._tensor_names}
        return FORMATS[self.method](**tensors, **self._settings)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, **options) -> QuantizedLinear:
        """Quantize an `nn.Linear` with `method` ("int8", "int4" with group_size, "nf4")."""
        if method not in FORMATS:
            raise ConfigError(f"unknown quantization method {method!r}; use one of: {', '.join(FORMATS)}.")
        return cls(FORMATS[method].quantize(linear.weight, **options), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_format.dequantize().to(device=x.device, dtype=x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.weight_format.name}, bytes={self.weight_format.nbytes()}")
