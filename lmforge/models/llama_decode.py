"""Llama's one-token decode step on the CPU, with the small operations fused.

Generating text runs the model on one new token per sequence, thousands of times. The matmuls
then read every weight once, and everything between them (norms, residual adds, rotary, the KV
cache write, attention for one query, SwiGLU's gate) is dozens of tiny torch operations per layer
whose fixed cost rivals the matmuls (see lmforge.nn.kernels.cpu_decode). This step computes the
same block — x + attention(norm(x)), then x + mlp(norm(x)) — with those runs fused into three
kernels, while every projection still goes through its own module, so quantized layers, adapters
and fused q/k/v or gate/up projections all work unchanged.

It applies only where the result is the modules' result: inference (no gradients, eval mode), float32
on the CPU, one new token per row over the contiguous `KVCache` (or, for a quantized model, the serving
engine's `PagedKVCache` in a step of decodes only), silu-gated MLPs, the default
attention kernels, and no forward hooks on the blocks (they would be skipped). Anything else takes
the ordinary module path. `LlamaModel.fast_decode = False` turns it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.models import llama_quant_decode
from lmforge.nn.kernels import cpu_decode
from lmforge.nn.kernels.jit import as_array
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.paged_kv_cache import PagedKVCache

FUSED_ATTENTION_KERNELS = ("sdpa", "flash")  # "eager" is the explicit-maths kernel users pick to inspect attention


def applies(model, hidden: torch.Tensor, kv_cache) -> bool:
    """Whether `decode_step` computes exactly what the modules would for this call. The model's structure
    (hooks, attention kernels, activations) is checked on a cache's first decode step and remembered with it:
    the model is not expected to change while one cache is in use. A paged cache (the serving engine) qualifies
    when the step holds decodes only and every projection is quantized (the one-call step; the engine's own
    batched attention serves the rest)."""
    paged = type(kv_cache) is PagedKVCache
    if (not (paged or type(kv_cache) is KVCache) or hidden.dtype != torch.float32
            or hidden.device.type != "cpu" or torch.is_grad_enabled() or model.training
            or not cpu_decode.available() or not getattr(model, "fast_decode", False)
            or torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks):
        return False
    if (hidden.shape[0] != 1 or kv_cache.decode_context() is None) if paged else hidden.shape[1] != 1:
        return False
    structure = getattr(kv_cache, "fused_decode_structure", None)
    if structure is None:
        structure = kv_cache.fused_decode_structure = _structure_allows(model)
    return structure and (not paged or llama_quant_decode.plan_for(model, kv_cache) is not None)


def _structure_allows(model) -> bool:
    for layer in model.layers:
        parts = (layer, layer.self_attn, layer.mlp, layer.attn_norm, layer.mlp_norm)
        if (any(part._forward_hooks or part._forward_pre_hooks for part in parts) or layer.cross_attn is not None
                or layer.self_attn.implementation not in FUSED_ATTENTION_KERNELS or layer.mlp.act is not F.silu):
            return False
    return True


def _projections(module, fused: str, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    """The outputs of a group of projections side by side: one fused matmul, or each module when unfused."""
    out = module.fused_output(fused, x)
    return out if out is not None else torch.cat([getattr(module, name)(x) for name in names], dim=-1)


def decode_step(model, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, kv_cache: KVCache) -> torch.Tensor:
    """The blocks and final norm for one new token per row: hidden [B, 1, D] → normalised [B, 1, D].

    Stores each layer's new key/value at `kv_cache.length`; the caller advances the cache. A paged cache takes
    the engine's packed row instead, hidden [1, N, D]: one new token of each of N sequences.
    """
    if type(kv_cache) is PagedKVCache:
        rows, dim = hidden.shape[1], hidden.shape[2]
        cos, signed_sin = (as_array(table.reshape(rows, -1)) for table in rotary)
        context, lengths = kv_cache.decode_context()
        plan = llama_quant_decode.plan_for(model, kv_cache)
        return plan.paged_step(hidden.reshape(rows, dim).contiguous(), cos, signed_sin, as_array(context),
                               as_array(lengths)).view(1, rows, dim)
    kv_cache.check_room(1)
    batch, _, dim = hidden.shape
    cos, signed_sin = (as_array(table.reshape(batch, -1)) for table in rotary)
    mask_rows = cpu_decode.NO_ROWS if mask is None else as_array(mask.reshape(batch, -1))
    plan = llama_quant_decode.plan_for(model, kv_cache)
    if plan is not None:  # every projection quantized: the whole step in one compiled call
        return plan.step(hidden.reshape(batch, dim).contiguous(), cos, signed_sin, mask_rows,
                         kv_cache.length).view(batch, 1, dim)
    residual = hidden.reshape(batch, dim).clone()  # the residual stream, updated in place by add_rms_norm
    normed = torch.empty_like(residual)
    stream, normed_rows = residual.numpy(), normed.numpy()
    delta = cpu_decode.NO_ROWS  # the last sublayer's output, added to the stream by the next norm
    for layer in model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        norm = layer.attn_norm
        cpu_decode.add_rms_norm(stream, delta, as_array(norm.weight), norm.eps, normed_rows)
        qkv = _projections(attention, "qkv", ("q_proj", "k_proj", "v_proj"), normed)
        heads = torch.empty(batch, attention.num_heads * attention.head_dim)
        index = attention.layer_idx
        cpu_decode.rotary_attention_step(
            as_array(qkv), cos, signed_sin, kv_cache.keys[index].numpy(), kv_cache.values[index].numpy(),
            kv_cache.length, mask_rows, attention.scale, attention.num_heads, heads.numpy())
        delta = as_array(attention.o_proj(heads))
        norm = layer.mlp_norm
        cpu_decode.add_rms_norm(stream, delta, as_array(norm.weight), norm.eps, normed_rows)
        gate_up = _projections(mlp, "gate_up", ("gate_proj", "up_proj"), normed)
        gated = torch.empty(batch, gate_up.shape[-1] // 2)
        cpu_decode.silu_and_mul(as_array(gate_up), gated.numpy())
        delta = as_array(mlp.down_proj(gated))
    cpu_decode.add_rms_norm(stream, delta, as_array(model.norm.weight), model.norm.eps, normed_rows)
    return normed.view(batch, 1, dim)
