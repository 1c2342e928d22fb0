"""Decoding sessions: run a model one step at a time over a batch, with a KV cache.

A session owns the batch's KV cache and attention mask. `prefill()` runs the
prompts (left-padded so every row's next token lands in the last column) and
returns the next-token logits; `step(tokens)` feeds one new token per row.
`keep(rows)` drops finished rows so they stop costing compute. Decoder-only and
encoder–decoder models differ only in how the first step is prepared.
"""

from __future__ import annotations

import torch

from lmforge.errors import InputError
from lmforge.nn.kv_cache import KVCache


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → ids [B, T] and attention mask [B, T], padded on the left."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


class DecoderSession:
    """Decoder-only models (Llama, GPT-2): the prompt is the start of the sequence."""

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0):
        self.model = model
        self.ids, self.mask = left_pad(prompts, pad_id)
        self.ids, self.mask = self.ids.to(model.device), self.mask.to(model.device)
        self.cache = KVCache.for_model(model, len(prompts), self.ids.shape[1] + max_new_tokens)

    def prefill(self) -> torch.Tensor:
        """Run the prompts; next-token logits [B, V] (float32)."""
        out = self.model(self.ids, self.mask, kv_cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row ([B]) and return the logits after it."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = self.model(tokens[:, None], self.mask, kv_cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1].float()

    def keep(self, rows: torch.Tensor) -> None:
        """Continue with these batch rows only (others finished, or beams reordered)."""
        self.mask = self.mask.index_select(0, rows)
        self.cache.select(rows)


class EncoderDecoderSession:
    """Encoder–decoder models (BART): encode the prompt once, decode from the start token."""

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0):
        start = model.config.decoder_start_token_id
        if start is None:
            raise InputError("the model config has no decoder_start_token_id, which encoder-decoder "
                             "generation starts from; set it in config.json.")
        self.model = model
        ids, self.source_mask = left_pad(prompts, pad_id)
        self.source_mask = self.source_mask.to(model.device)
        self.encoded = model.model.encode(ids.to(model.device), self.source_mask)
        self.start = torch.full((len(prompts), 1), start, dtype=torch.long, device=model.device)
        self.cache = KVCache.for_model(model, len(prompts), 1 + max_new_tokens)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(attention_mask=self.source_mask, decoder_input_ids=tokens,
                         encoder_hidden_states=self.encoded, kv_cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1].float()

    def prefill(self) -> torch.Tensor:
        return self._decode(self.start)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._decode(tokens[:, None])

    def keep(self, rows: torch.Tensor) -> None:
        self.source_mask = self.source_mask.index_select(0, rows)
        self.encoded = self.encoded.index_select(0, rows)
        self.cache.select(rows)


def open_session(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0):
    """The session type that fits `model`."""
    if getattr(model.config, "is_encoder_decoder", False):
        return EncoderDecoderSession(model, prompts, max_new_tokens, pad_id)
    return DecoderSession(model, prompts, max_new_tokens, pad_id)
