"""The forward pass, layer by layer: how big the hidden state is, what attention and the MLP add to it, and
which earlier tokens each position reads.

Every block adds two contributions to the residual stream: attention's (a weighted mix of earlier
positions) and the MLP's (a per-position transformation). `trace_forward` runs the prompt and answer once
through the model with the textbook (eager) attention swapped in, so every head's attention weights —
softmax(QK^T/√d + mask), each row summing to 1 — can be kept, and hooks record the mean size (L2 norm)
of the hidden state after each block and of the two contributions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lmforge.errors import InputError, UnsupportedError
from lmforge.nn import Attention, TransformerBlock
from lmforge.nn.kernels.eager import attention_weights


@dataclass(frozen=True)
class LayerStats:
    layer: int
    hidden_norm: float  # mean L2 norm of the hidden state after the block
    attention_norm: float  # mean L2 norm of what self-attention adds
    mlp_norm: float  # mean L2 norm of what the MLP adds


@dataclass
class ForwardTrace:
    """`attention[layer]` is a float32 [heads, T, T] tensor: row i is what position i reads."""

    tokens: list[str]
    layers: list[LayerStats]
    attention: list[torch.Tensor]

    @property
    def num_layers(self) -> int:
        return len(self.attention)

    @property
    def num_heads(self) -> int:
        return self.attention[0].shape[0]

    def check(self, layer: int | None = None, head: int | None = None) -> None:
        """A clear error for a layer or head index this model does not have."""
        if layer is not None and not 0 <= layer < self.num_layers:
            raise InputError(f"layer {layer} is out of range: this model has layers 0..{self.num_layers - 1}.")
        if head is not None and not 0 <= head < self.num_heads:
            raise InputError(f"head {head} is out of range: this model has heads 0..{self.num_heads - 1}.")

    def most_read(self, position: int, count: int = 3) -> list[tuple[int, float]]:
        """The earlier positions `position` attends to most, averaged over every layer and head: (position, weight)."""
        row = torch.stack([weights[:, position, :position + 1].mean(0) for weights in self.attention]).mean(0)
        values, positions = row.topk(min(count, position + 1))
        return [(int(p), float(v)) for v, p in zip(values, positions)]


def _blocks(model) -> list[TransformerBlock]:
    blocks = [module for module in model.modules() if isinstance(module, TransformerBlock)]
    if any(block.cross_attn is not None for block in blocks) or not blocks:
        raise UnsupportedError("the forward-pass trace covers decoder-only models; this one has an encoder–decoder "
                               "(or no transformer blocks).")
    return blocks


@contextmanager
def _recording_attention(attentions: list[Attention], store: list[torch.Tensor]):
    """Swap every attention kernel for the eager one that also keeps its weights (batch row 0)."""

    def kernel(q, k, v, mask, scale, dropout=0.0):
        weights = attention_weights(q, k, mask, scale)
        store.append(weights[0].detach().cpu())
        if v.shape[1] != q.shape[1]:
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return torch.matmul(weights.to(q.dtype), v)

    try:
        for attention in attentions:
            attention.kernel = kernel
        yield
    finally:
        for attention in attentions:
            attention.set_implementation(attention.implementation)


def trace_forward(model, tokenizer, ids: list[int]) -> ForwardTrace:
    """One forward pass over `ids` with every block's statistics and every head's attention weights kept."""
    if len(ids) > model.context_window:
        raise InputError(f"{len(ids)} tokens do not fit the model's context of {model.context_window}.")
    blocks = _blocks(model)
    sizes: dict[tuple[int, str], float] = {}
    hooks = []
    for index, block in enumerate(blocks):
        for part, module in (("hidden", block), ("attention", block.self_attn), ("mlp", block.mlp)):
            def record(module, inputs, output, key=(index, part)):
                sizes[key] = float(output[0].float().norm(dim=-1).mean())
            hooks.append(module.register_forward_hook(record))
    weights: list[torch.Tensor] = []
    try:
        with torch.inference_mode(), _recording_attention([block.self_attn for block in blocks], weights):
            model(torch.tensor([ids], device=model.device))
    finally:
        for hook in hooks:
            hook.remove()
    layers = [LayerStats(i, sizes[(i, "hidden")], sizes[(i, "attention")], sizes[(i, "mlp")])
              for i in range(len(blocks))]
    return ForwardTrace([tokenizer.decode([i]) for i in ids], layers, weights)
