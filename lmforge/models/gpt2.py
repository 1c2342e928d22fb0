"""GPT-2: the decoder-only transformer that made LMs mainstream.

Token + learned absolute position embeddings → N pre-norm blocks (causal
multi-head attention, GELU MLP, LayerNorm) → final LayerNorm → tied LM head.
HF stores GPT-2 with fused QKV in `Conv1D` layers ([in, out] weights); loading
splits and transposes them into lmforge's canonical q/k/v/o_proj `nn.Linear`s.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lmforge.checkpoint.keymap import KeyMap, StoredTensor
from lmforge.config import GPT2Config
from lmforge.models.base import DecoderLM, ModelOutput, PreTrainedModel
from lmforge.nn import (
    MLP,
    Attention,
    LayerNorm,
    LearnedPositionalEmbedding,
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

GPT2_KEYMAP = KeyMap((
    ("embed_tokens.", "wte."),
    ("embed_positions.", "wpe."),
    ("layers.*.attn_norm.", "h.*.ln_1."),
    ("layers.*.mlp_norm.", "h.*.ln_2."),
    ("layers.*.self_attn.o_proj.", "h.*.attn.c_proj."),
    ("layers.*.self_attn.", "h.*.attn."),  # q/k/v_proj, after splitting c_attn
    ("layers.*.mlp.up_proj.", "h.*.mlp.c_fc."),
    ("layers.*.mlp.down_proj.", "h.*.mlp.c_proj."),
    ("norm.", "ln_f."),
))
CONV1D_WEIGHT = re.compile(r"(^|\.)h\.\d+\.(attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
FUSED_QKV = re.compile(r"^(.*h\.\d+\.attn\.)c_attn\.(weight|bias)$")
QKV = ("q_proj", "k_proj", "v_proj")


class GPT2PreTrainedModel(PreTrainedModel):
    config_class = GPT2Config
    hf_prefix = "transformer"
    backbone_keymap = GPT2_KEYMAP

    @classmethod
    def from_hf_layout(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Split fused c_attn into q/k/v and transpose Conv1D [in, out] weights to Linear [out, in]."""
        out = {}
        for name, tensor in state.items():
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers in old checkpoints, not weights
            fused = FUSED_QKV.match(name)
            if fused:
                for part, chunk in zip(QKV, tensor.chunk(3, dim=-1)):
                    out[f"{fused[1]}{part}.{fused[2]}"] = chunk.t().contiguous() if fused[2] == "weight" else chunk
            else:
                out[name] = tensor.t().contiguous() if CONV1D_WEIGHT.search(name) else tensor
        return out

    def stored_tensor(self, name: str) -> StoredTensor:
        """q/k/v are thirds of the fused c_attn (its columns, as Conv1D stores [in, out]); the other Conv1D
        weights are stored transposed."""
        hf_name = self.hf_keymap().to_hf(name)
        part = re.search(r"\.attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$", hf_name)
        if part:
            width, index = self.config.n_embd, QKV.index(part[1])
            return StoredTensor(f"{hf_name[:part.start()]}.attn.c_attn.{part[2]}", transposed=part[2] == "weight",
                                rows=(index * width, (index + 1) * width))
        return StoredTensor(hf_name, transposed=bool(CONV1D_WEIGHT.search(hf_name)))

    @classmethod
    def to_hf_layout(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in state.items():
            parts = re.match(r"^(.*h\.\d+\.attn\.)q_proj\.(weight|bias)$", name)
            if parts:
                chunks = [state[f"{parts[1]}{p}.{parts[2]}"] for p in QKV]
                fused = torch.cat([c.t() for c in chunks], dim=1) if parts[2] == "weight" else torch.cat(chunks)
                out[f"{parts[1]}c_attn.{parts[2]}"] = fused.contiguous()
            elif not re.search(r"\.attn\.(k|v)_proj\.(weight|bias)$", name):  # fused into c_attn above
                out[name] = tensor.t().contiguous() if CONV1D_WEIGHT.search(name) else tensor
        return out


@register("gpt2", "base")
class GPT2Model(GPT2PreTrainedModel):
    hf_architecture = "GPT2Model"
    is_backbone = True

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        dim = config.n_embd
        self.embed_tokens = TokenEmbedding(config.vocab_size, dim)
        self.embed_positions = LearnedPositionalEmbedding(config.n_positions, dim)
        self.dropout = nn.Dropout(config.embd_pdrop)
        self.layers = nn.ModuleList(
            TransformerBlock(
                Attention(dim, config.n_head, bias=True, dropout=config.attn_pdrop),
                MLP(dim, config.intermediate_size, config.activation_function),
                LayerNorm(dim, eps=config.layer_norm_epsilon),
                LayerNorm(dim, eps=config.layer_norm_epsilon),
                pre_norm=True,
                dropout=config.resid_pdrop,
            )
            for _ in range(config.n_layer)
        )
        self.norm = LayerNorm(dim, eps=config.layer_norm_epsilon)
        number_layers(self.layers)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None) -> ModelOutput:
        """As LlamaModel.forward; learned position vectors are added to the token (or `inputs_embeds`) vectors."""
        tokens = embed_inputs(self.embed_tokens, input_ids, inputs_embeds)
        if position_ids is None:
            past = kv_cache.length if kv_cache is not None else 0
            position_ids = default_position_ids(tokens, attention_mask, past)
        hidden = self.dropout(tokens + self.embed_positions(position_ids))
        length = hidden.shape[1]
        mask = decoder_self_attention_mask(attention_mask, length, kv_cache, hidden.dtype, hidden.device)
        for layer in self.layers:
            hidden = layer(hidden, mask, kv_cache=kv_cache)
        if kv_cache is not None:
            kv_cache.advance(length)
        return ModelOutput(last_hidden_state=self.norm(hidden))


@register("gpt2", "causal-lm")
class GPT2LMHeadModel(GPT2PreTrainedModel, DecoderLM):
    hf_architecture = "GPT2LMHeadModel"

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.model = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()


@register("gpt2", "sequence-classification")
class GPT2ForSequenceClassification(GPT2PreTrainedModel):
    """Scores the last real token's hidden state (a decoder has seen the whole text only there)."""

    hf_architecture = "GPT2ForSequenceClassification"

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.model = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        hidden = self.model(input_ids, attention_mask).last_hidden_state
        return ModelOutput(logits=self.score(pool(hidden, attention_mask, "last")), last_hidden_state=hidden)


@register("gpt2", "token-classification")
class GPT2ForTokenClassification(GPT2PreTrainedModel):
    hf_architecture = "GPT2ForTokenClassification"

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.model = GPT2Model(config)
        self.dropout = nn.Dropout(config.extra.get("classifier_dropout") or config.resid_pdrop)
        self.classifier = nn.Linear(config.n_embd, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        hidden = self.model(input_ids, attention_mask).last_hidden_state
        return ModelOutput(logits=self.classifier(self.dropout(hidden)), last_hidden_state=hidden)
