"""Attention masks: which keys each query may look at.

Two reasons to hide a key: it lies in the future (causal mask, decoders) or it
is padding (attention mask from the tokenizer, batches of unequal lengths).
Both become one additive mask of shape [batch, 1, queries, keys] holding 0 where
attention is allowed and the most negative float where it is not — a finite
value, so a query that may see nothing gets a uniform row instead of NaN.

A third reason serves packing, several short examples laid end to end in one row:
a token must not see another example. The padding mask then numbers the examples
(1, 1, 1, 2, 2, 3, 3, 3, 0 for padding) and a query sees only keys of its own number.

The most common mask of all — a decoder reading one unpadded sequence (training blocks, a
prompt's prefill) — hides only the future. Decoders then pass `CAUSAL` instead of a tensor:
kernels that skip the future by themselves (SDPA's `is_causal`, the flash kernel's key tiles)
do about half the work of reading a [T, T] mask; the others build it.
"""

from __future__ import annotations

import torch


class CausalMask:
    """Stands for the plain causal mask of a self-attention whose queries are its keys (nothing padded)."""

    def as_tensor(self, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The additive [1, 1, length, length] mask it stands for."""
        return build_attention_mask(None, length, length, causal=True, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return "CAUSAL"


CAUSAL = CausalMask()


def build_attention_mask(
    padding_mask: torch.Tensor | None,
    query_length: int,
    key_length: int,
    causal: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Combine causal and padding masks into one additive mask, or None if nothing is hidden.

    `padding_mask` is [batch, key_length] with 1 for real tokens and 0 for padding, or with
    example numbers 1, 2, ... for packed rows (each query then sees its own example's keys only).
    Queries are the last `query_length` positions of the keys (as with a KV cache).
    """
    allowed = None
    if causal and query_length > 1:
        query_positions = torch.arange(key_length - query_length, key_length, device=device)
        key_positions = torch.arange(key_length, device=device)
        allowed = (key_positions[None, :] <= query_positions[:, None])[None, None]  # [1, 1, Tq, Tk]
    if padding_mask is not None and bool(padding_mask.max() > 1):  # packed examples
        keys = padding_mask[:, None, None, :]
        keep = (keys == padding_mask[:, None, -query_length:, None]) & (keys > 0)  # [B, 1, Tq, Tk]
        allowed = keep if allowed is None else allowed & keep
    elif padding_mask is not None and not bool(padding_mask.all()):
        keep = padding_mask[:, None, None, :].bool()  # [B, 1, 1, Tk]
        allowed = keep if allowed is None else allowed & keep
    if allowed is None:
        return None
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def causal_self_attention_mask(padding_mask: torch.Tensor | None, query_length: int, key_length: int,
                               dtype: torch.dtype, device: torch.device) -> torch.Tensor | CausalMask | None:
    """A decoder's self-attention mask: `CAUSAL` when the queries are all the keys and nothing is padded
    or packed, else the additive tensor of `build_attention_mask`."""
    if query_length == key_length > 1 and (padding_mask is None or bool((padding_mask == 1).all())):
        return CAUSAL
    return build_attention_mask(padding_mask, query_length, key_length, causal=True, dtype=dtype, device=device)


def decoder_self_attention_mask(padding_mask: torch.Tensor | None, query_length: int, kv_cache,
                                dtype: torch.dtype, device: torch.device) -> torch.Tensor | CausalMask | None:
    """The causal self-attention mask of a decoder step; with a KV cache the cache builds it, since
    only the cache knows which past positions (contiguous or paged) the new ones may see."""
    if kv_cache is not None:
        return kv_cache.attention_mask(padding_mask, query_length, dtype, device)
    return causal_self_attention_mask(padding_mask, query_length, query_length, dtype, device)
