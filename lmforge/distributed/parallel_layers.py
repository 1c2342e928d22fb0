"""Tensor-parallel layers: each process holds a slice of a layer's weight and they compute it together.

Megatron-LM's recipe. A Linear whose *output* features are split across processes is
column-parallel: every process holds the whole input and computes its own slice of the
output, with no communication — so it is an ordinary `nn.Linear` over a slice of the rows.
A Linear whose *input* features are split (`RowParallelLinear`) gives each process a partial
sum of the whole output; one all-reduce adds them. A column-parallel layer followed by a
row-parallel one (q/k/v → attention on the process's own heads → o_proj; gate/up → SwiGLU →
down_proj) therefore costs one all-reduce. The vocabulary is split the same way: each process
embeds the ids in its slice of the table (`VocabParallelEmbedding`, an all-reduce fills in the
rest) and scores its slice of the vocabulary (`VocabParallelHead`, an all-gather joins them).

These layers serve inference: their collectives are not differentiated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmforge.errors import InputError


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input features split: `weight` [out, in / world] reads this process's
    slice of x; the partial products are summed by one all-reduce, then the (whole) bias is added once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape  # this process's share of the inputs
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (this process's slice), out_features={self.out_features}"


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose table rows [vocab_start, vocab_start + rows) live in this process.

    Each process looks up the ids that fall in its rows and writes zeros for the others; the
    all-reduce sums the processes' results, so every id gets exactly its one row.
    """

    def __init__(self, weight: torch.Tensor, vocab_start: int, vocab_size: int, scale: float = 1.0,
                 group: dist.ProcessGroup | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.vocab_start, self.vocab_size = vocab_start, vocab_size
        self.scale = scale
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise InputError(f"token id out of range: ids must lie in [0, {self.vocab_size}) but got "
                             f"min={int(input_ids.min())}, max={int(input_ids.max())}; use the model's own tokenizer.")
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        dist.all_reduce(out, group=self.group)
        return out * self.scale if self.scale != 1.0 else out

    def extra_repr(self) -> str:
        rows, dim = self.weight.shape
        return f"rows [{self.vocab_start}, {self.vocab_start + rows}) of {self.vocab_size}, dim={dim}"


class VocabParallelHead(nn.Module):
    """LM head over this process's slice of the vocabulary; an all-gather joins the slices into the
    full logits [..., vocab]. The model runs it only on the positions that are sampled."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, world_size: int = 1,
                 group: dist.ProcessGroup | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.world_size = world_size
        self.out_features = weight.shape[0] * world_size  # the whole vocabulary
        self.in_features = weight.shape[1]
        self.group = group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight, self.bias).contiguous()
        slices = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(slices, local, group=self.group)
        return torch.cat(slices, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} ({self.weight.shape[0]} here)"
