"""A token embedding that reads its table from a tied, quantized LM head.

With tied embeddings the token table and the output head are one [vocab, dim] matrix. Once the
head is quantized, keeping a float copy for lookups would cost more memory than all the quantized
layers together (SmolLM2: 113 MB in float32). `QuantizedEmbedding` looks tokens up in the head's
own packed rows instead, dequantizing only the rows a batch asks for.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import InputError
from lmforge.nn.kernels.threads import torch_on_one_thread
from lmforge.quant.linear import QuantizedLinear


class QuantizedEmbedding(nn.Module):
    def __init__(self, head: QuantizedLinear, dtype: torch.dtype, scale: float = 1.0):
        super().__init__()
        self._head = [head]  # a plain list: the head is registered where it lives (lm_head), not twice
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.output_dtype = dtype
        self.scale = scale

    def _apply(self, fn, recurse=True):
        self.output_dtype = fn(torch.empty(0, dtype=self.output_dtype)).dtype  # follow .to(dtype) of the model
        return super()._apply(fn, recurse)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.num_embeddings):
            raise InputError(f"token id out of range: ids must lie in [0, {self.num_embeddings}) but got "
                             f"min={int(input_ids.min())}, max={int(input_ids.max())}; use the model's own tokenizer.")
        with torch_on_one_thread():  # a few small ops: woken, torch's thread pool would spin on the decode step's cores
            rows = self._head[0].select_rows(input_ids.flatten()).dequantize()
        out = rows.view(*input_ids.shape, self.embedding_dim).to(self.output_dtype)
        return out * self.scale if self.scale != 1.0 else out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows read from the tied quantized head"


def tied_modules(model: nn.Module) -> dict[str, str]:
    """Modules whose weight is another module's (a head → the token embedding it shares), when the config ties them."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    return {target.removesuffix(".weight"): source.removesuffix(".weight")
            for target, source in getattr(model, "tied_weights", {}).items()}


def use_quantized_head(model: nn.Module, head: str, quantized: QuantizedLinear) -> None:
    """Put `quantized` in place of the tied head `head`; the embedding tied to it reads its rows from then on."""
    source = tied_modules(model)[head]
    table = model.get_submodule(source)
    model.set_submodule(head, quantized)
    model.set_submodule(source, QuantizedEmbedding(quantized, table.weight.dtype, getattr(table, "scale", 1.0)))
