"""Fused CPU kernels for decoding one token: the small operations between the weight matmuls.

Decoding one token is ~4 weight matmuls per layer and ~25 small operations around them (norms,
residual adds, rotary, KV-cache writes, attention over one query, the gated activation). Each small
torch operation costs 10-60 µs on a CPU however little data it touches: the dispatcher's code and
data fall out of the caches while a matmul streams megabytes of weights through them. On a
135M-parameter model that overhead was a third of a decode step. These kernels, JIT-compiled with
numba, do each run of small operations in one call:

- `add_rms_norm`: residual += delta, then normed = RMSNorm(residual) — the end of one sublayer and
  the start of the next;
- `rotary_attention_step`: rotate the new query and key (rotate-half RoPE), store the key and value
  in a preallocated KV cache, and attend each query head over every cached position (grouped-query:
  each key/value head serves `num_heads / kv_heads` query heads);
- `silu_and_mul`: SwiGLU's silu(gate) * up.

Each mirrors a torch reference the tests compare it with (`F.rms_norm`, `apply_rotary` + SDPA,
`F.silu(gate) * up`). They are compiled like every lmforge kernel (lmforge.nn.kernels.jit: serial,
GIL released, machine code cached on disk); arrays are float32 numpy views of torch tensors (no copies).
"""

from __future__ import annotations

import numpy as np

from lmforge.nn.kernels.jit import available, jit

__all__ = ["NO_ROWS", "add_rms_norm", "available", "rotary_attention_heads", "rotary_attention_step", "silu_and_mul"]

NO_ROWS = np.zeros((0, 0), dtype=np.float32)
"""Stands for an absent 2-D argument (no residual delta yet, no attention mask)."""


@jit
def add_rms_norm(residual, delta, weight, eps, normed):
    """residual [B, D] += delta [B, D] (skipped when delta has no rows); normed [B, D] = RMSNorm(residual)."""
    dim = residual.shape[1]
    for row in range(residual.shape[0]):
        squares = np.float32(0)
        for i in range(dim):
            if delta.shape[0]:
                residual[row, i] += delta[row, i]
            squares += residual[row, i] * residual[row, i]
        inverse = np.float32(1) / np.sqrt(squares / dim + eps)
        for i in range(dim):
            normed[row, i] = residual[row, i] * inverse * weight[i]


@jit
def silu_and_mul(gate_up, out):
    """out [B, F] = silu(gate) * up, where gate_up [B, 2F] holds gate then up side by side."""
    width = out.shape[1]
    for row in range(out.shape[0]):
        for i in range(width):
            gate = gate_up[row, i]
            out[row, i] = gate / (np.float32(1) + np.exp(-gate)) * gate_up[row, width + i]


@jit
def rotary_attention_step(qkv, cos, signed_sin, keys, values, position, mask, scale, num_heads, out):
    """One new position per row: rotate, cache, attend (every key/value head; see `rotary_attention_heads`)."""
    rotary_attention_heads(qkv, cos, signed_sin, keys, values, position, mask, scale, num_heads, 0, keys.shape[1], out)


@jit
def rotary_attention_heads(qkv, cos, signed_sin, keys, values, position, mask, scale, num_heads, kv_start, kv_stop,
                           out):
    """One new position per row: rotate, cache, attend, for key/value heads kv_start <= h < kv_stop and the
    query heads they serve (threads sharing a step take disjoint head ranges).

    qkv [B, (H + 2 H_kv) d]: the fused projection's output (query heads, key heads, value heads).
    cos, signed_sin [B, d]: RotaryEmbedding's tables at each row's position (sine's first half negated).
    keys, values [B, H_kv, max_length, d]: the cache; the new key/value go to `position`, and the
    queries attend over positions 0..position. mask [B, position + 1] is added to the scores (or has
    no rows). out [B, H d] receives the heads' outputs side by side.
    """
    batch, kv_heads, _, dim = keys.shape
    half, group, length = dim // 2, num_heads // kv_heads, position + 1
    queries = np.empty((group, dim), np.float32)
    scores = np.empty((group, length), np.float32)
    sums = np.empty((group, dim), np.float32)
    for b in range(batch):
        row, c, s = qkv[b], cos[b], signed_sin[b]
        for kv in range(kv_start, kv_stop):
            key_at, value_at = (num_heads + kv) * dim, (num_heads + kv_heads + kv) * dim
            for i in range(half):
                x1, x2 = row[key_at + i], row[key_at + half + i]
                keys[b, kv, position, i] = x1 * c[i] + x2 * s[i]
                keys[b, kv, position, half + i] = x2 * c[half + i] + x1 * s[half + i]
            for i in range(dim):
                values[b, kv, position, i] = row[value_at + i]
            cached_keys, cached_values = keys[b, kv], values[b, kv]
            for g in range(group):  # the query heads this key/value head serves, rotated and scaled
                query_at = (kv * group + g) * dim
                for i in range(half):
                    x1, x2 = row[query_at + i], row[query_at + half + i]
                    queries[g, i] = (x1 * c[i] + x2 * s[i]) * scale
                    queries[g, half + i] = (x2 * c[half + i] + x1 * s[half + i]) * scale
            for t in range(length):  # each cached key is read once for the whole group
                for g in range(group):
                    score = np.float32(0)
                    for i in range(dim):
                        score += queries[g, i] * cached_keys[t, i]
                    scores[g, t] = score + (mask[b, t] if mask.shape[0] else np.float32(0))
            for g in range(group):  # softmax
                top = scores[g, 0]
                for t in range(1, length):
                    top = max(top, scores[g, t])
                total = np.float32(0)
                for t in range(length):
                    scores[g, t] = np.exp(scores[g, t] - top)
                    total += scores[g, t]
                for t in range(length):
                    scores[g, t] /= total
                sums[g, :] = 0
            for t in range(length):  # probability-weighted sum of the values
                for g in range(group):
                    weight = scores[g, t]
                    for i in range(dim):
                        sums[g, i] += weight * cached_values[t, i]
            for g in range(group):
                out_at = (kv * group + g) * dim
                for i in range(dim):
                    out[b, out_at + i] = sums[g, i]
