"""BERT: an encoder-only transformer that reads the whole text at once.

No causal mask: every token attends to every other, so each output vector describes
its token in full context. Flow: token + position + segment (token type) embeddings
→ LayerNorm → N post-norm blocks → a head: masked-token prediction (pretraining),
[CLS]-pooled or per-token classification, or mean-pooled sentence embeddings (all-MiniLM).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lmforge.checkpoint.keymap import KeyMap
from lmforge.config import BertConfig
from lmforge.models.base import ModelOutput, PreTrainedModel
from lmforge.nn import (
    MLP,
    Attention,
    LayerNorm,
    LearnedPositionalEmbedding,
    TokenEmbedding,
    TransformerBlock,
)
from lmforge.nn.feedforward import activation
from lmforge.nn.heads import pool, sentence_embedding
from lmforge.nn.masks import build_attention_mask
from lmforge.registry import register

BERT_KEYMAP = KeyMap((
    ("embed_tokens.", "embeddings.word_embeddings."),
    ("embed_positions.", "embeddings.position_embeddings."),
    ("embed_token_types.", "embeddings.token_type_embeddings."),
    ("embed_norm.", "embeddings.LayerNorm."),
    ("layers.*.self_attn.q_proj.", "encoder.layer.*.attention.self.query."),
    ("layers.*.self_attn.k_proj.", "encoder.layer.*.attention.self.key."),
    ("layers.*.self_attn.v_proj.", "encoder.layer.*.attention.self.value."),
    ("layers.*.self_attn.o_proj.", "encoder.layer.*.attention.output.dense."),
    ("layers.*.attn_norm.", "encoder.layer.*.attention.output.LayerNorm."),
    ("layers.*.mlp.up_proj.", "encoder.layer.*.intermediate.dense."),
    ("layers.*.mlp.down_proj.", "encoder.layer.*.output.dense."),
    ("layers.*.mlp_norm.", "encoder.layer.*.output.LayerNorm."),
))

MASKED_LM_KEYMAP = KeyMap((
    ("head.norm.", "cls.predictions.transform.LayerNorm."),
    ("head.", "cls.predictions.transform."),
    ("lm_head.weight", "cls.predictions.decoder.weight"),
    ("lm_head.bias", "cls.predictions.bias"),
))

# Buffers that older transformers versions saved next to the weights; they hold no learned values.
LEGACY_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


class BertPreTrainedModel(PreTrainedModel):
    config_class = BertConfig
    hf_prefix = "bert"
    backbone_keymap = BERT_KEYMAP
    # Checkpoints of heads that do not use the pooler (masked LM, token classification) omit it.
    optional_backbone_weights = ("pooler.",)

    @classmethod
    def from_hf_layout(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t for name, t in state.items() if not name.endswith(LEGACY_BUFFERS)}


class BertPooler(nn.Module):
    """dense → tanh on the first ([CLS]) token: one vector per sequence, trained by next-sentence prediction."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(pool(hidden, None, "first")))


@register("bert", "base")
class BertModel(BertPreTrainedModel):
    hf_architecture = "BertModel"
    is_backbone = True

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.embed_positions = LearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size)
        self.embed_token_types = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.embed_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(self._block(config) for _ in range(config.num_hidden_layers))
        self.pooler = BertPooler(config.hidden_size) if add_pooling_layer else None
        self.post_init()

    @staticmethod
    def _block(config: BertConfig) -> TransformerBlock:
        attention = Attention(config.hidden_size, config.num_attention_heads, bias=True,
                              dropout=config.attention_probs_dropout_prob)
        mlp = MLP(config.hidden_size, config.intermediate_size, act=config.hidden_act)
        return TransformerBlock(attention, mlp, LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
                                LayerNorm(config.hidden_size, eps=config.layer_norm_eps), pre_norm=False,
                                dropout=config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [B, T] (attention_mask 1 = token, 0 = padding) → hidden states [B, T, D] (+ pooled [B, D])."""
        batch, length = input_ids.shape
        if position_ids is None:  # BERT pads on the right, so positions simply count columns
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, -1)
        if token_type_ids is None:  # segment A everywhere: a single sentence
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.embed_tokens(input_ids) + self.embed_token_types(token_type_ids)
        hidden = self.embed_dropout(self.embed_norm(hidden + self.embed_positions(position_ids)))
        mask = build_attention_mask(attention_mask, length, length, causal=False, dtype=hidden.dtype,
                                    device=hidden.device)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return ModelOutput(last_hidden_state=hidden, pooler_output=pooled)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              normalize: bool = True) -> torch.Tensor:
        """Sentence embeddings [B, D]: the mean of the real tokens' vectors, unit length if `normalize`."""
        hidden = self(input_ids, attention_mask).last_hidden_state
        return sentence_embedding(hidden, attention_mask, normalize)


class BertPredictionTransform(nn.Module):
    """dense → activation → LayerNorm, applied to every token before the vocabulary projection."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))


@register("bert", "masked-lm")
class BertForMaskedLM(BertPreTrainedModel):
    """Predicts the tokens hidden behind [MASK] from both sides of the context."""

    hf_architecture = "BertForMaskedLM"
    head_keymap = MASKED_LM_KEYMAP
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.model = BertModel(config, add_pooling_layer=False)
        self.head = BertPredictionTransform(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    @classmethod
    def from_hf_layout(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # HF's decoder.bias is an alias of cls.predictions.bias (saved files keep only the latter).
        state = super().from_hf_layout(state)
        alias = state.pop("cls.predictions.decoder.bias", None)
        if alias is not None:
            state.setdefault("cls.predictions.bias", alias)
        return state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> ModelOutput:
        hidden = self.model(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state
        return ModelOutput(logits=self.lm_head(self.head(hidden)), last_hidden_state=hidden)


class _BertClassifier(BertPreTrainedModel):
    """Backbone → dropout → linear `classifier`, on the pooled [CLS] vector or on every token."""

    per_token: ClassVar[bool]

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.model = BertModel(config, add_pooling_layer=not self.per_token)
        dropout = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> ModelOutput:
        out = self.model(input_ids, attention_mask, token_type_ids, position_ids)
        features = out.last_hidden_state if self.per_token else out.pooler_output
        out.logits = self.classifier(self.dropout(features))
        return out


@register("bert", "sequence-classification")
class BertForSequenceClassification(_BertClassifier):
    hf_architecture = "BertForSequenceClassification"
    per_token = False


@register("bert", "token-classification")
class BertForTokenClassification(_BertClassifier):
    hf_architecture = "BertForTokenClassification"
    per_token = True
