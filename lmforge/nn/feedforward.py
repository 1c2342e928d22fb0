"""Position-wise feed-forward networks: the per-token "thinking" after attention.

- `MLP`: down(act(up(x))) — GPT-2, BERT, BART (GELU).
- `GatedMLP`: down(act(gate(x)) * up(x)) — SwiGLU in Llama: the gate decides,
  channel by channel, how much of the up-projection passes through.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UnsupportedError
from lmforge.nn.fusion import FusedProjections


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: the tanh approximation 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedError(f"activation {name!r} is not supported; use one of: {', '.join(ACTIVATIONS)}.") from None


class MLP(nn.Module):
    """Two-layer feed-forward: up_proj → activation → (dropout) → down_proj."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.up_proj(x))
        if self.training and self.dropout.p:
            hidden = self.dropout(hidden)
        return self.down_proj(hidden)


class GatedMLP(FusedProjections, nn.Module):
    """Gated feed-forward (SwiGLU with act='silu'): down(act(gate(x)) * up(x))."""

    fused_groups = {"gate_up": ("gate_proj", "up_proj")}

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fused_outputs("gate_up", x) or (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)
