"""Where a model's parameters live: architecture facts and a parameter count per component.

A transformer's parameters sit in a few kinds of modules: the token (and position) embeddings,
attention (q/k/v/o projections), the feed-forward MLPs, the norms, and the output head. Counting
them per kind shows where the size of a model comes from, e.g. that a small model's vocabulary
embedding can outweigh all its attention layers. Shared by `lmforge info` and `lmforge explain`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from torch import nn

from lmforge.nn import MLP, Attention, GatedMLP, LayerNorm, RMSNorm, TransformerBlock
from lmforge.tokenizer import Tokenizer

# component → module types that define it; a parameter belongs to its nearest enclosing match.
COMPONENTS: dict[str, tuple[type, ...]] = {
    "embedding": (nn.Embedding,),
    "attention": (Attention,),
    "mlp": (MLP, GatedMLP),
    "norm": (RMSNorm, LayerNorm, nn.LayerNorm),
}
HEAD = "head"  # everything else: LM head, pooler, classifier

def weight_memory(model: nn.Module) -> tuple[int, dict[str, int]]:
    """Bytes the weights take in memory (tied ones once, quantized layers packed) and the modules per format."""
    from lmforge.quant import QuantizedLinear

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    formats: Counter = Counter()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.nbytes()
            formats[module.method] += 1
    formats[str(model.dtype).removeprefix("torch.")] += 1  # everything not quantized
    return total, dict(formats)


def describe(model: nn.Module, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """Architecture, size per component, dtype, context and tokenizer facts, as JSON-ready values."""
    from lmforge.quant import parameter_count

    config = model.config
    weight_bytes, weight_formats = weight_memory(model)
    info: dict[str, Any] = {
        "architecture": config.model_type,
        "class": type(model).__name__,
        "dtype": str(model.dtype).removeprefix("torch."),
        "context_length": config.context_length,
        "vocab_size": getattr(config, "vocab_size", None),
        "blocks": sum(isinstance(m, TransformerBlock) for m in model.modules()),
        "parameters": parameter_count(model),
        "weight_bytes": weight_bytes,
        "weight_formats": weight_formats,
        "components": parameter_components(model),
        "tied": tied_parameters(model),
    }
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["trainable_parameters"], info["frozen_parameters"] = trainable, info["parameters"] - trainable
    info["positional_encoding"] = positional_encoding(config)
    info["diagram"] = block_diagram(model)
    if tokenizer is not None:
        info["tokenizer"] = {
            "vocab_size": tokenizer.vocab_size,
            "chat_template": bool(tokenizer.chat_template),
            "special_tokens": {role: {"token": token, "id": tokenizer.token_to_id(token)}
                               for role, token in tokenizer.special_tokens.items() if token is not None},
        }
    return info


def parameter_components(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Parameters per component (tied weights counted once) and the modules holding them.

    "modules" counts modules per type (e.g. {"Attention": 30}); for the head it names them.
    """
    modules = dict(model.named_modules())
    counts: Counter = Counter()
    holders: dict[str, set[str]] = defaultdict(set)
    for name, parameter in model.named_parameters():  # a tied weight appears once, under its first name
        component, holder = _component_of(modules, name.rpartition(".")[0])
        counts[component] += parameter.numel()
        holders[component].add(holder)
    total = sum(counts.values())
    return {component: {"parameters": counts[component], "share": round(counts[component] / total, 4),
                        "modules": dict(Counter(holder if component == HEAD else type(modules[holder]).__name__
                                                for holder in sorted(holders[component])))}
            for component in [*COMPONENTS, HEAD] if component in counts}


def _component_of(modules: dict[str, nn.Module], path: str) -> tuple[str, str]:
    """(component, module name) of the nearest module at or above `path` that defines a component."""
    start = path
    while True:
        for component, types in COMPONENTS.items():
            if isinstance(modules[path], types):
                return component, path
        if not path:
            return HEAD, start
        path = path.rpartition(".")[0]


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """Parameters that share storage with an earlier one: {alias: the name counted}."""
    first: dict[int, str] = {}
    tied = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            tied[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return tied


def positional_encoding(config) -> str:
    """How the model knows where each token is."""
    if getattr(config, "rope_theta", None) is not None:
        return f"rotary (RoPE): queries and keys rotated by position, theta = {config.rope_theta:g}"
    if config.model_type == "t5":
        return "relative position buckets: a learned bias added to the attention scores"
    return f"learned absolute position embeddings ({config.context_length} positions) added to the token embeddings"


def attention_type(attention: Attention) -> str:
    """MHA (a key/value head per query head), MQA (one for all) or GQA (one per group of query heads)."""
    if attention.num_kv_heads == attention.num_heads:
        return "MHA"
    return "MQA" if attention.num_kv_heads == 1 else "GQA"


def _attention_kind(attention: Attention) -> str:
    kind = attention_type(attention)
    if kind == "MHA":
        return f"multi-head attention (MHA), {attention.num_heads} heads of {attention.head_dim}"
    if kind == "MQA":
        return f"multi-query attention (MQA), {attention.num_heads} query heads sharing 1 key/value head"
    return (f"grouped-query attention (GQA), {attention.num_heads} query heads in {attention.num_kv_heads} groups "
            f"sharing a key/value head, heads of {attention.head_dim}")


def block_diagram(model: nn.Module) -> list[str]:
    """The model's data flow as lines of text, one stage per line (a block's inside shown once)."""
    blocks = [module for module in model.modules() if isinstance(module, TransformerBlock)]
    position = positional_encoding(model.config)
    lines = [f"tokens → token embedding ({model.config.hidden_size} numbers per token); positions: {position}"]
    if blocks:
        block = blocks[0]
        mlp = block.mlp
        kind = "gated MLP (gate × up → down)" if isinstance(mlp, GatedMLP) else "MLP (up → down)"
        norm = type(block.attn_norm).__name__
        inner = [f"{_attention_kind(block.self_attn)}"]
        if block.cross_attn is not None:
            inner.append("cross-attention to the encoder's output")
        inner.append(f"{kind}, activation {getattr(mlp.act, '__name__', type(mlp.act).__name__)}")
        order = "norm → sublayer → add to the residual" if block.pre_norm else "sublayer → add → norm (post-norm)"
        lines.append(f"{len(blocks)} × transformer block, each sublayer {order} ({norm}):")
        lines += [f"    {part}" for part in inner]
    lines.append("→ final norm → output head → logits over the vocabulary" if hasattr(model, "lm_head")
                 else "→ hidden states (and the task head)")
    return lines
