"""Prompt tuning and prefix tuning: learn a few virtual tokens instead of any weight.

Both freeze the whole model and learn P "virtual tokens" that every input is read after.

- Prompt tuning (Lester et al., 2021) learns P input vectors, a soft prompt [P, D], fed to the
  model as if they were the embeddings of P tokens before the text. SmolLM2-135M with P = 20
  trains 20 × 576 = 11,520 numbers. Started from the embeddings of a text that describes the task
  ("init_text"), it begins as an ordinary hard prompt and training moves it off the vocabulary.
- Prefix tuning (Li & Liang, 2021) learns, at every layer, the keys and values that P virtual
  positions leave for the real tokens to attend to: L × 2 × P × (kv_heads · head_dim) numbers
  (30 × 2 × 20 × 192 = 230,400 for SmolLM2). Optionally they are produced by a small MLP from P
  embeddings during training (`prefix_projection`), which the paper found steadier.

In a causal decoder a real token meets the virtual tokens only through the keys and values they
leave in each layer's attention. So both methods place those at the first P positions of the KV
cache before the real tokens run: prefix tuning writes its learned keys/values there; prompt
tuning runs the frozen model over the soft prompt (once per forward, batch of one, since every row
shares it) and keeps what the layers computed. The real tokens then proceed exactly as if they
continued a cached text: P visible positions are added to the attention mask and their positions
are counted after the virtual ones. Training uses a `GrowingKVCache`, through which gradients
reach the virtual tokens; generation seeds its ordinary `KVCache` the same way, so sampling,
stop strings, batching and beam search all work unchanged.

`add_prompt_tuning` / `add_prefix_tuning` turn a decoder LM into its `VirtualTokensLM` subclass
in place (the weights keep their names and stay frozen) and add the trainable `prompt_encoder`.
Virtual tokens cannot be merged into the weights; save them with `lmforge.peft.save_peft_adapter`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import UnsupportedError, ValidationError
from lmforge.nn.kv_cache import GrowingKVCache, KVCache
from lmforge.peft.lora import LoraLayer
from lmforge.quant.embedding import QuantizedEmbedding

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values [B, kv_heads, P, head_dim]


def _check_count(num_virtual_tokens: int) -> None:
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValidationError(f"num_virtual_tokens must be an integer >= 1, got {num_virtual_tokens!r}.")


@dataclass
class PromptTuningConfig:
    """A soft prompt of `num_virtual_tokens` vectors, started from the embeddings of `init_text`
    (its tokens repeated or cut to length; needs the tokenizer) or of random vocabulary tokens."""

    num_virtual_tokens: int = 20
    init_text: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_count(self.num_virtual_tokens)


@dataclass
class PrefixTuningConfig:
    """Learned keys/values for `num_virtual_tokens` positions at every layer.

    They start as the keys/values the model itself computes for `init_text` (or random
    vocabulary tokens). With `prefix_projection` they are produced during training by an MLP
    (embedding [P, D] → Linear(D, encoder_hidden_size) → tanh → Linear(…, L·2·kv_dim)) from
    P embeddings started the same way.
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None  # the MLP's width; default: the model's hidden size
    init_text: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_count(self.num_virtual_tokens)
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValidationError(f"encoder_hidden_size must be >= 1, got {self.encoder_hidden_size!r}.")


class SoftPrompt(nn.Module):
    """P learned input vectors [P, D] the frozen model reads before every input."""

    peft_type = "PROMPT_TUNING"

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embedding = nn.Parameter(embeddings.detach().clone())

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def key_values(self, model: nn.Module, batch_size: int) -> KeyValues:
        """What every layer's attention keeps of the soft prompt, for `batch_size` rows."""
        return [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
                for k, v in _run_virtual_tokens(model, self.embedding[None])]

    def saved_tensor(self) -> torch.Tensor:
        """What PEFT stores as `prompt_embeddings`: the soft prompt itself."""
        return self.embedding.detach()


class PrefixEncoder(nn.Module):
    """The keys/values of P virtual positions at every layer, stored flat as [P, L · 2 · kv_heads · head_dim]
    (PEFT's layout: per position, layer by layer, keys then values), or produced by an MLP."""

    peft_type = "PREFIX_TUNING"

    def __init__(self, flat: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int,
                 embeddings: torch.Tensor | None = None, encoder_hidden_size: int | None = None):
        super().__init__()
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        if embeddings is None:
            self.embedding = nn.Parameter(flat.detach().clone())
            self.transform = None
        else:
            self.embedding = nn.Parameter(embeddings.detach().clone())
            width = encoder_hidden_size or embeddings.shape[1]
            out = nn.Linear(width, flat.shape[1], dtype=flat.dtype, device=flat.device)
            self.transform = nn.Sequential(nn.Linear(embeddings.shape[1], width, dtype=flat.dtype, device=flat.device),
                                           nn.Tanh(), out)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def flat(self) -> torch.Tensor:
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def key_values(self, model: nn.Module, batch_size: int) -> KeyValues:
        grid = self.flat().view(self.num_virtual_tokens, 2 * self.num_layers, self.num_kv_heads, self.head_dim)
        grid = grid.permute(1, 2, 0, 3)  # [2L, kv_heads, P, head_dim]
        return [(grid[2 * i][None].expand(batch_size, -1, -1, -1), grid[2 * i + 1][None].expand(batch_size, -1, -1, -1))
                for i in range(self.num_layers)]

    def saved_tensor(self) -> torch.Tensor:
        """What PEFT stores as `prompt_embeddings`: the flat keys/values (after the MLP, if any)."""
        return self.flat().detach()


def _run_virtual_tokens(model: nn.Module, embeddings: torch.Tensor) -> KeyValues:
    """Run the backbone over vectors [B, P, D] at positions 0..P-1; the keys/values each layer kept."""
    cache = GrowingKVCache.for_model(model)
    model.model(inputs_embeds=embeddings, kv_cache=cache)
    return list(zip(cache.keys, cache.values))


def flatten_key_values(key_values: KeyValues) -> torch.Tensor:
    """Per-layer keys/values [1, kv_heads, P, head_dim] → PEFT's flat prefix [P, L · 2 · kv_heads · head_dim]."""
    grid = torch.stack([t[0] for pair in key_values for t in pair])  # [2L, kv_heads, P, head_dim]
    return grid.permute(2, 0, 1, 3).reshape(grid.shape[2], -1)


class VirtualTokensLM(nn.Module):
    """Mixed into a decoder LM's class: each forward first places the virtual tokens in the KV cache.

    Without a cache (training, scoring) a differentiable `GrowingKVCache` is used; an empty cache
    (the first step of generation) is seeded; a cache that already holds them is used as it is.
    `attention_mask` and `position_ids` describe the real tokens only, as for the plain model, and
    the logits cover the real tokens only.
    """

    prompt_encoder: SoftPrompt | PrefixEncoder

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_encoder.num_virtual_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                logits_to_keep: int | torch.Tensor | None = None):
        if kv_cache is None:
            kv_cache = GrowingKVCache.for_model(self)
        elif not isinstance(kv_cache, KVCache):
            raise UnsupportedError(f"{type(kv_cache).__name__} is not supported with prefix or prompt tuning; "
                                   "generate with model.generate() (the contiguous KV cache).")
        virtual = self.num_virtual_tokens
        if kv_cache.length == 0:
            for layer, (keys, values) in enumerate(self.prompt_encoder.key_values(self, input_ids.shape[0])):
                kv_cache.update(layer, keys, values)
            kv_cache.advance(virtual)
        if attention_mask is not None:
            if bool(attention_mask.max() > 1):
                raise UnsupportedError("packed rows (an attention mask numbering examples) cannot share virtual "
                                       "tokens, which every example must see; train without packing.")
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], virtual), attention_mask], 1)
        if position_ids is not None:
            position_ids = position_ids + virtual
        return super().forward(input_ids, attention_mask, position_ids, kv_cache, logits_to_keep)


@functools.cache
def virtual_tokens_class(base: type) -> type:
    """The virtual-token version of a decoder LM class (cached: one per base class)."""
    return type(f"{base.__name__}WithVirtualTokens", (VirtualTokensLM, base),
                {"__doc__": f"{base.__name__} reading learned virtual tokens before every input."})


def _require_decoder(model: nn.Module) -> None:
    from lmforge.models.base import DecoderLM  # here: lmforge.models imports lmforge.peft

    if not isinstance(model, DecoderLM):
        raise UnsupportedError(f"prefix and prompt tuning need a decoder-only language model (Llama, GPT-2); "
                               f"{type(model).__name__} is not one. Use LoRA for encoders and encoder-decoders.")
    if isinstance(model, VirtualTokensLM):
        raise ValidationError(f"{type(model).__name__} already has virtual tokens; load the base model again to "
                              "start over.")
    if any(isinstance(module, LoraLayer) for module in model.modules()):
        raise UnsupportedError("this model has LoRA layers; combine virtual tokens with a plain model only "
                               "(merge_and_unload() the LoRA update first).")


def init_token_ids(model: nn.Module, count: int, text: str | None, tokenizer, seed: int) -> torch.Tensor:
    """`count` token ids to start virtual tokens from: `text`'s tokens repeated or cut to length, or
    random vocabulary tokens drawn with `seed`."""
    if text is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(model.config.vocab_size, (count,), generator=generator)
    if tokenizer is None:
        raise ValidationError("init_text needs the model's tokenizer to turn it into tokens; pass tokenizer=.")
    ids = tokenizer.encode(text)
    if not ids:
        raise ValidationError("init_text has no tokens; give a short description of the task, or leave it out.")
    return torch.tensor((ids * (count // len(ids) + 1))[:count], dtype=torch.long)


def _install(model: nn.Module, encoder: nn.Module) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.__class__ = virtual_tokens_class(type(model))
    model.prompt_encoder = encoder.to(model.device)
    return model


def add_prompt_tuning(model: nn.Module, config: PromptTuningConfig, tokenizer=None) -> nn.Module:
    """Freeze `model` (a decoder LM) and give it a trainable soft prompt, in place; returns it."""
    _require_decoder(model)
    ids = init_token_ids(model, config.num_virtual_tokens, config.init_text, tokenizer, config.seed)
    with torch.no_grad():
        embeddings = model.model.embed_tokens(ids.to(model.device))
    return _install(model, SoftPrompt(embeddings))


def add_prefix_tuning(model: nn.Module, config: PrefixTuningConfig, tokenizer=None) -> nn.Module:
    """Freeze `model` (a decoder LM) and give it trainable keys/values at every layer, in place; returns it."""
    _require_decoder(model)
    ids = init_token_ids(model, config.num_virtual_tokens, config.init_text, tokenizer, config.seed)
    with torch.no_grad():
        embeddings = model.model.embed_tokens(ids.to(model.device))
        flat = flatten_key_values(_run_virtual_tokens(model, embeddings[None]))
    attention = model.decoder_attention_layers()[0]
    encoder = PrefixEncoder(flat, len(model.decoder_attention_layers()), attention.num_kv_heads, attention.head_dim,
                            embeddings if config.prefix_projection else None, config.encoder_hidden_size)
    return _install(model, encoder)


def load_virtual_tokens(model: nn.Module, peft_type: str, tensor: torch.Tensor) -> nn.Module:
    """Give `model` the virtual tokens a saved `prompt_embeddings` tensor holds (for inference), in place."""
    _require_decoder(model)
    attention = model.decoder_attention_layers()
    if peft_type == SoftPrompt.peft_type:
        expected = (tensor.shape[0], model.config.hidden_size)
        encoder = SoftPrompt(tensor)
    elif peft_type == PrefixEncoder.peft_type:
        expected = (tensor.shape[0], len(attention) * 2 * attention[0].num_kv_heads * attention[0].head_dim)
        encoder = PrefixEncoder(tensor, len(attention), attention[0].num_kv_heads, attention[0].head_dim)
    else:
        raise UnsupportedError(f"peft_type {peft_type!r} is not a virtual-token method; expected "
                               f"{SoftPrompt.peft_type} or {PrefixEncoder.peft_type}.")
    if tensor.dim() != 2 or tuple(tensor.shape) != expected:
        raise ValidationError(f"the saved virtual tokens have shape {tuple(tensor.shape)} but this model needs "
                              f"{expected}; load them onto the base model they were trained on.")
    return _install(model, encoder.to(_float_dtype(model)))


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (its token embeddings', float even when its linear layers are
    quantized): virtual tokens are stored and trained in it."""
    embeddings = model.model.embed_tokens
    return embeddings.output_dtype if isinstance(embeddings, QuantizedEmbedding) else embeddings.weight.dtype
