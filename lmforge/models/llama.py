"""Llama: a decoder-only transformer with RMSNorm, rotary positions, GQA and SwiGLU.

Covers Llama 2/3, Mistral, Qwen2-style configs (attention bias) and SmolLM2
(tied embeddings). Flow: token embedding → N pre-norm blocks (causal GQA
attention with RoPE, SwiGLU MLP) → final RMSNorm → head.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.checkpoint.keymap import KeyMap
from lmforge.config import LlamaConfig
from lmforge.models import llama_decode
from lmforge.models.base import DecoderLM, ModelOutput, PreTrainedModel
from lmforge.nn import (
    Attention,
    GatedMLP,
    RMSNorm,
    RotaryEmbedding,
    TokenEmbedding,
    TransformerBlock,
)
from lmforge.nn.block import number_layers
from lmforge.nn.embedding import embed_inputs
from lmforge.nn.heads import pool
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.masks import decoder_self_attention_mask
from lmforge.nn.positions import default_position_ids
from lmforge.registry import register

LLAMA_KEYMAP = KeyMap((
    ("layers.*.attn_norm.", "layers.*.input_layernorm."),
    ("layers.*.mlp_norm.", "layers.*.post_attention_layernorm."),
))


class LlamaPreTrainedModel(PreTrainedModel):
    config_class = LlamaConfig
    hf_prefix = "model"
    backbone_keymap = LLAMA_KEYMAP


@register("llama", "base")
class LlamaModel(LlamaPreTrainedModel):
    hf_architecture = "LlamaModel"
    is_backbone = True
    fast_decode = True  # one-token CPU steps through lmforge.models.llama_decode's fused kernels

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self._block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling)
        number_layers(self.layers)
        self.post_init()

    @staticmethod
    def _block(config: LlamaConfig) -> TransformerBlock:
        attention = Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                              config.head_dim, bias=config.attention_bias)
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
        return TransformerBlock(attention, mlp, RMSNorm(config.hidden_size, config.rms_norm_eps),
                                RMSNorm(config.hidden_size, config.rms_norm_eps), pre_norm=True)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [B, T] (attention_mask 1 = token, 0 = padding) → hidden states [B, T, D].

        With a `kv_cache`, `input_ids` are the new tokens only and `attention_mask` covers the
        cached positions too ([B, past + T]). A `PagedKVCache` takes a packed batch: every
        scheduled token of every sequence in one row ([1, N]) with explicit `position_ids`.
        `inputs_embeds` [B, T, D] replaces `input_ids` with ready-made token vectors.
        """
        hidden = embed_inputs(self.embed_tokens, input_ids, inputs_embeds)
        if position_ids is None:
            past = kv_cache.length if kv_cache is not None else 0
            position_ids = default_position_ids(hidden, attention_mask, past)
        rotary = self.rotary(position_ids, hidden.dtype)
        length = hidden.shape[1]
        mask = decoder_self_attention_mask(attention_mask, length, kv_cache, hidden.dtype, hidden.device)
        if llama_decode.applies(self, hidden, kv_cache):
            hidden = llama_decode.decode_step(self, hidden, rotary, mask, kv_cache)
        else:
            for layer in self.layers:
                hidden = layer(hidden, mask, rotary, kv_cache=kv_cache)
            hidden = self.norm(hidden)
        if kv_cache is not None:
            kv_cache.advance(length)
        return ModelOutput(last_hidden_state=hidden)


@register("llama", "causal-lm")
class LlamaForCausalLM(LlamaPreTrainedModel, DecoderLM):
    hf_architecture = "LlamaForCausalLM"

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class _LlamaScoreHead(LlamaPreTrainedModel):
    """Backbone + a linear `score` layer, as in HF's Llama classification heads."""

    pooling: str | None = None  # "last" for sequence classification, None for per-token
    score_bias: bool = False

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=self.score_bias)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        hidden = self.model(input_ids, attention_mask).last_hidden_state
        features = pool(hidden, attention_mask, self.pooling) if self.pooling else hidden
        return ModelOutput(logits=self.score(features), last_hidden_state=hidden)


@register("llama", "sequence-classification")
class LlamaForSequenceClassification(_LlamaScoreHead):
    hf_architecture = "LlamaForSequenceClassification"
    pooling = "last"


@register("llama", "token-classification")
class LlamaForTokenClassification(_LlamaScoreHead):
    hf_architecture = "LlamaForTokenClassification"
    score_bias = True
