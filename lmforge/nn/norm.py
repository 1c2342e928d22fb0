"""Normalisation layers: LayerNorm (mean and variance) and RMSNorm (scale only).

Normalising the residual stream keeps activations at a stable scale layer after
layer. LayerNorm centres and scales; RMSNorm (Llama) only rescales by the root
mean square, which is cheaper and works as well in practice.
"""

import torch
import torch.nn.functional as F
from torch import nn

LayerNorm = nn.LayerNorm


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel instead of five small ones
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        normalized = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normalized.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
