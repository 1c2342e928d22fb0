"""BART: an encoder–decoder transformer (denoising autoencoder, summarisation, translation).

The encoder reads the whole source with bidirectional attention; the decoder
writes the target left to right (causal self-attention) and consults the source
through cross-attention on every layer. Both stacks are post-norm, add learned
positions (with BART's 2 reserved rows) and share one token-embedding table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.checkpoint.keymap import KeyMap
from lmforge.config import BartConfig
from lmforge.errors import ConfigError, InputError
from lmforge.models.base import GenerativeModel, ModelOutput, PreTrainedModel
from lmforge.nn import (
    MLP,
    Attention,
    LayerNorm,
    LearnedPositionalEmbedding,
    TokenEmbedding,
    TransformerBlock,
)
from lmforge.nn.block import number_layers
from lmforge.nn.heads import ClassificationHead
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.masks import build_attention_mask
from lmforge.registry import register

# Per-layer names, ours → HF; the same in both stacks (the encoder has no cross-attention).
_LAYER_NAMES = (
    ("self_attn.o_proj.", "self_attn.out_proj."),
    ("attn_norm.", "self_attn_layer_norm."),
    ("cross_attn.o_proj.", "encoder_attn.out_proj."),
    ("cross_attn.", "encoder_attn."),
    ("cross_attn_norm.", "encoder_attn_layer_norm."),
    ("mlp.up_proj.", "fc1."),
    ("mlp.down_proj.", "fc2."),
    ("mlp_norm.", "final_layer_norm."),
)
BART_KEYMAP = KeyMap(
    tuple((f"{stack}.layers.*.{ours}", f"{stack}.layers.*.{hf}") for stack in ("encoder", "decoder")
          for ours, hf in _LAYER_NAMES)
    + tuple((f"{stack}.embed_norm.", f"{stack}.layernorm_embedding.") for stack in ("encoder", "decoder"))
)

# With tie_word_embeddings (every released BART), both stacks read the one `shared` table.
_SHARED_EMBEDDINGS = {
    "encoder.embed_tokens.weight": "shared.weight",
    "decoder.embed_tokens.weight": "shared.weight",
}


def _nested(tied: dict[str, str], prefix: str = "model") -> dict[str, str]:
    return {f"{prefix}.{ours}": f"{prefix}.{source}" for ours, source in tied.items()}


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int | None
                       ) -> torch.Tensor:
    """Teacher forcing: the decoder sees [start, y0, y1, ...] and must predict [y0, y1, y2, ...].

    Label positions ignored by the loss (-100) become padding.
    """
    if pad_token_id is None or decoder_start_token_id is None:
        raise ConfigError("BartConfig: pad_token_id and decoder_start_token_id must be set to build "
                          "decoder_input_ids from input_ids; set them or pass decoder_input_ids.")
    shifted = input_ids.new_empty(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


class BartStack(nn.Module):
    """One side of BART: embeddings (token × scale + learned position → LayerNorm) and post-norm blocks.

    The decoder's blocks carry cross-attention over the encoder's output.
    """

    def __init__(self, config: BartConfig, num_layers: int, num_heads: int, ffn_dim: int, is_decoder: bool):
        super().__init__()
        scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.d_model, config.pad_token_id, scale)
        self.embed_positions = LearnedPositionalEmbedding(config.max_position_embeddings, config.d_model, offset=2)
        self.embed_norm = LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(self._block(config, num_heads, ffn_dim, is_decoder) for _ in range(num_layers))
        number_layers(self.layers)

    @staticmethod
    def _block(config: BartConfig, num_heads: int, ffn_dim: int, is_decoder: bool) -> TransformerBlock:
        def attention() -> Attention:
            return Attention(config.d_model, num_heads, bias=True, dropout=config.attention_dropout)

        mlp = MLP(config.d_model, ffn_dim, act=config.activation_function, dropout=config.activation_dropout)
        return TransformerBlock(
            attention(), mlp, LayerNorm(config.d_model), LayerNorm(config.d_model), pre_norm=False,
            cross_attn=attention() if is_decoder else None,
            cross_attn_norm=LayerNorm(config.d_model) if is_decoder else None,
            dropout=config.dropout,
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                encoder_states: torch.Tensor | None = None, encoder_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [B, T] → hidden states [B, T, D]; masks are additive, built by the caller."""
        past = kv_cache.length if kv_cache is not None else 0
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)  # BART ignores padding
        hidden = self.embed_tokens(input_ids) + self.embed_positions(positions)
        hidden = self.dropout(self.embed_norm(hidden))
        for layer in self.layers:
            hidden = layer(hidden, attention_mask, encoder_states=encoder_states, encoder_mask=encoder_mask,
                           kv_cache=kv_cache)
        if kv_cache is not None:
            kv_cache.advance(input_ids.shape[1])
        return hidden


class BartPreTrainedModel(PreTrainedModel):
    config_class = BartConfig
    hf_prefix = "model"
    backbone_keymap = BART_KEYMAP


@register("bart", "base")
class BartModel(BartPreTrainedModel):
    """Encoder + decoder; returns the decoder's final hidden states (and the encoder's)."""

    hf_architecture = "BartModel"
    is_backbone = True
    tied_weights = _SHARED_EMBEDDINGS

    def __init__(self, config: BartConfig):
        super().__init__(config)
        self.shared = TokenEmbedding(config.vocab_size, config.d_model, config.pad_token_id)
        self.encoder = BartStack(config, config.encoder_layers, config.encoder_attention_heads,
                                 config.encoder_ffn_dim, is_decoder=False)
        self.decoder = BartStack(config, config.decoder_layers, config.decoder_attention_heads,
                                 config.decoder_ffn_dim, is_decoder=True)
        self.post_init()

    def _mask(self, padding_mask: torch.Tensor | None, query_length: int, key_length: int, causal: bool
              ) -> torch.Tensor | None:
        return build_attention_mask(padding_mask, query_length, key_length, causal, self.dtype, self.device)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids [B, S] (attention_mask 1 = token, 0 = padding) → encoder states [B, S, D]."""
        length = input_ids.shape[1]
        return self.encoder(input_ids, self._mask(attention_mask, length, length, causal=False))

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
               attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
               kv_cache: KVCache | None = None) -> torch.Tensor:
        """Target ids [B, T] attending causally to themselves and to the encoder states [B, S, D] → [B, T, D].

        `attention_mask` is the source padding mask, hiding padded encoder positions from cross-attention.
        With a `kv_cache`, `decoder_input_ids` are the new tokens and `decoder_attention_mask` covers
        the cached ones too.
        """
        target, source = decoder_input_ids.shape[1], encoder_hidden_states.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        self_mask = self._mask(decoder_attention_mask, target, past + target, causal=True)
        cross_mask = self._mask(attention_mask, target, source, causal=False)
        return self.decoder(decoder_input_ids, self_mask, encoder_hidden_states, cross_mask, kv_cache)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> ModelOutput:
        """Encode `input_ids` (unless `encoder_hidden_states` are given) and decode `decoder_input_ids`.

        Without `decoder_input_ids` the decoder reads `input_ids` shifted right, as in BART's denoising
        pretraining.
        """
        if decoder_input_ids is None:
            if input_ids is None:
                raise InputError("BART needs input_ids, or decoder_input_ids together with encoder_hidden_states.")
            decoder_input_ids = shift_tokens_right(input_ids, self.config.pad_token_id,
                                                   self.config.decoder_start_token_id)
        if encoder_hidden_states is None:
            if input_ids is None:
                raise InputError("BART needs input_ids to encode, or precomputed encoder_hidden_states.")
            encoder_hidden_states = self.encode(input_ids, attention_mask)
        hidden = self.decode(decoder_input_ids, encoder_hidden_states, attention_mask, decoder_attention_mask,
                             kv_cache)
        return ModelOutput(last_hidden_state=hidden, encoder_last_hidden_state=encoder_hidden_states)


@register("bart", "seq2seq-lm")
class BartForConditionalGeneration(BartPreTrainedModel, GenerativeModel):
    """BART + LM head (tied to the shared embedding) + a fixed per-token logit bias, as in fairseq."""

    hf_architecture = "BartForConditionalGeneration"
    tied_weights = {"lm_head.weight": "model.shared.weight", **_nested(_SHARED_EMBEDDINGS)}
    defaulted_weights = frozenset({"final_logits_bias"})  # bare BartModel checkpoints lack it; zeros are right

    def __init__(self, config: BartConfig):
        super().__init__(config)
        self.model = BartModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))  # persistent: HF saves it
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                logits_to_keep: int | None = None) -> ModelOutput:
        out = self.model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_hidden_states,
                         kv_cache)
        hidden = out.last_hidden_state
        sampled = hidden if logits_to_keep is None else hidden[:, -logits_to_keep:]
        return ModelOutput(logits=self.lm_head(sampled) + self.final_logits_bias, last_hidden_state=hidden,
                           encoder_last_hidden_state=out.encoder_last_hidden_state)

    def decoder_attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.decoder.layers]


@register("bart", "sequence-classification")
class BartForSequenceClassification(BartPreTrainedModel):
    """Classify from the decoder state at each sequence's last end-of-sequence token."""

    hf_architecture = "BartForSequenceClassification"
    tied_weights = _nested(_SHARED_EMBEDDINGS)

    def __init__(self, config: BartConfig):
        super().__init__(config)
        self.model = BartModel(config)
        dropout = config.extra.get("classifier_dropout") or 0.0
        self.classification_head = ClassificationHead(config.d_model, config.num_labels, dropout)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None) -> ModelOutput:
        out = self.model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        is_eos = input_ids.eq(self.config.eos_token_id)
        if not bool(is_eos.any(-1).all()):
            raise InputError(f"every sequence must contain the end-of-sequence token (id {self.config.eos_token_id}),"
                             " which BART classifies from; tokenize with the model's tokenizer.")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_eos = (is_eos * positions).argmax(-1)
        hidden = out.last_hidden_state
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_eos]
        return ModelOutput(logits=self.classification_head(pooled), last_hidden_state=hidden,
                           encoder_last_hidden_state=out.encoder_last_hidden_state)
